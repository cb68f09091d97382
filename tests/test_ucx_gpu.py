"""The ucx transport's CUDA paths, with real peer processes on a GPU host.

CUDA tensors go from GPU memory and land in GPU memory (UCX moves them by CUDA IPC between
processes of one host) when the receiver's ``SIDECAR_RECV_DEVICE`` is a GPU, or in host memory when
it is ``cpu``. Every test is skipped with the reason "no CUDA device" where there is none.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from sidecar_core import Sidecar, SidecarConfig
from sidecar_core.testing import PeerProcess
from transports.ucx import UcxTransport, _inbound

pytestmark = [pytest.mark.gpu, pytest.mark.multiprocess, pytest.mark.transport("ucx")]

WAIT = 60.0
MiB = 1 << 20


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def pattern(nbytes: int, seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator).to(device)


# -- run in peer processes -----------------------------------------------------------------------


def peer_recv(sidecar: Sidecar, id: str) -> dict[str, Any]:
    value = sidecar.recv_sync(id, timeout=WAIT)
    result = {
        "device": str(value.device),
        "dtype": str(value.dtype),
        "shape": list(value.shape),
        "digest": digest(value),
    }
    sidecar.mark_done_sync(id)
    return result


def peer_send_pattern(sidecar: Sidecar, nbytes: int, seed: int, device: str, id: str, dst: int) -> None:
    sidecar.send(pattern(nbytes, seed, device), id, dst).result(WAIT)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {
        **UcxTransport.test_environment(Path(tmp_path_factory.mktemp("ucx-gpu"))),
        "SIDECAR_TRANSPORT": "ucx",
        "SIDECAR_CONNECT_TIMEOUT": "10",
        "SIDECAR_SEND_TIMEOUT": "60",
        "SIDECAR_RECV_TIMEOUT": "60",
    }


@contextlib.contextmanager
def peer_on(env: Mapping[str, str], rank: int, recv_device: str) -> Iterator[PeerProcess]:
    with PeerProcess(rank, {**env, "SIDECAR_RECV_DEVICE": recv_device}) as process:
        yield process


@pytest.fixture(scope="module")
def gpu_peer(env: dict[str, str]) -> Iterator[PeerProcess]:
    with peer_on(env, 1, "cuda:0") as process:
        yield process


@pytest.fixture(scope="module")
def sender(env: dict[str, str]) -> Iterator[Sidecar]:
    sidecar = Sidecar(SidecarConfig(sidecar_rank=0, settings={"recv_device": "cuda:0"}))
    yield sidecar
    sidecar.shutdown_sync()


@pytest.fixture(scope="module", autouse=True)
def _env_for_local_sidecars(env: dict[str, str]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield


# -- tests ---------------------------------------------------------------------------------------


def test_cuda_to_cuda_on_one_gpu(sender: Sidecar, gpu_peer: PeerProcess) -> None:
    data = pattern(64 * MiB, 1, "cuda:0").view(torch.float16).view(4096, 8192)
    sender.send(data, "gpu-gpu", 1).result(WAIT)
    got = gpu_peer.call(peer_recv, "gpu-gpu")
    assert got == {"device": "cuda:0", "dtype": "torch.float16", "shape": [4096, 8192], "digest": digest(data)}


def test_cuda_from_a_peer_lands_on_this_gpu(sender: Sidecar, gpu_peer: PeerProcess) -> None:
    gpu_peer.call(peer_send_pattern, 256 * MiB, 2, "cuda:0", "gpu-in", 0)
    received = sender.recv_sync("gpu-in", timeout=WAIT)
    assert received.device == torch.device("cuda:0")
    assert digest(received) == digest(pattern(256 * MiB, 2, "cpu"))
    sender.mark_done_sync("gpu-in")


def test_cuda_frames_into_a_busy_gpu_land_after_its_queued_work(
    sender: Sidecar, gpu_peer: PeerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    waited: list[str] = []
    wait = _inbound.wait_cuda_idle

    async def recording_wait(buffers: Any) -> None:
        waited.append(str(buffers[0].device))
        await wait(buffers)

    monkeypatch.setattr(_inbound, "wait_cuda_idle", recording_wait)
    torch.cuda._sleep(2_000_000_000)  # about a second of work queued on this process's default stream
    gpu_peer.call(peer_send_pattern, 64 * MiB, 6, "cuda:0", "gpu-busy", 0)
    received = sender.recv_sync("gpu-busy", timeout=WAIT)
    assert waited == ["cuda:0"]  # the payload receive was posted once the queued work was done
    assert digest(received) == digest(pattern(64 * MiB, 6, "cpu"))
    sender.mark_done_sync("gpu-busy")


def test_cuda_to_a_host_receiver(env: dict[str, str], sender: Sidecar) -> None:
    data = pattern(8 * MiB, 3, "cuda:0")
    with peer_on(env, 2, "cpu") as host_peer:
        sender.send(data, "gpu-host", 2).result(WAIT)
        got = host_peer.call(peer_recv, "gpu-host")
    assert got["device"] == "cpu"
    assert got["digest"] == digest(data)


def test_host_tensor_to_a_gpu_receiver(sender: Sidecar, gpu_peer: PeerProcess) -> None:
    data = pattern(8 * MiB, 4, "cpu")
    sender.send(data, "host-gpu", 1).result(WAIT)
    got = gpu_peer.call(peer_recv, "host-gpu")
    assert got["device"] == "cuda:0"
    assert got["digest"] == digest(data)


@pytest.mark.parametrize("source", ["cuda:0", "cpu"])
def test_parts_assemble_on_the_gpu(gpu_peer: PeerProcess, source: str) -> None:
    # Each part is received straight into the message's GPU memory (from the host, UCX copies it there).
    data = pattern(10 * MiB + 3, 5, source)
    with Sidecar(SidecarConfig(sidecar_rank=4, settings={"chunk_size": 1 * MiB})) as chunker:
        chunker.send(data, f"parts-from-{source}", 1).result(WAIT)
    got = gpu_peer.call(peer_recv, f"parts-from-{source}")
    assert got["device"] == "cuda:0"
    assert got["digest"] == digest(data)


def test_cuda_parts_land_in_place_on_a_host_receiver(env: dict[str, str]) -> None:
    data = pattern(10 * MiB + 3, 8, "cuda:0")
    with (
        peer_on(env, 2, "cpu") as host_peer,
        Sidecar(SidecarConfig(sidecar_rank=4, settings={"chunk_size": 1 * MiB})) as chunker,
    ):
        chunker.send(data, "gpu-parts-host", 2).result(WAIT)
        got = host_peer.call(peer_recv, "gpu-parts-host")
    assert got["device"] == "cpu"
    assert got["digest"] == digest(data)


def test_gpu0_to_gpu1(env: dict[str, str], sender: Sidecar) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"no CUDA device to receive on: needs 2 CUDA devices, found {torch.cuda.device_count()}")
    data = pattern(64 * MiB, 6, "cuda:0")
    with peer_on(env, 3, "cuda:1") as second:
        sender.send(data, "gpu0-gpu1", 3).result(WAIT)
        got = second.call(peer_recv, "gpu0-gpu1")
    assert got["device"] == "cuda:1"
    assert got["digest"] == digest(data)
