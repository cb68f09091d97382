"""The localhost transport's CUDA paths, with real peer processes on a GPU host.

Staged (default): GPU → pinned shared memory → GPU (or a CPU view where the receiver lands on the
CPU). CUDA IPC (``SIDECAR_LOCALHOST__CUDA_IPC=1``): the receiver maps the sender's GPU memory; the
sender keeps the tensor alive until the receiver's ``mark_done``. Every test is skipped with the
reason "no CUDA device" where there is none.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from _checkout import checkout_env
from _waiting import wait_until

from sidecar_core import Sidecar, SidecarConfig
from sidecar_core.testing import PeerProcess
from transports.localhost import LocalhostTransport

pytestmark = [pytest.mark.gpu, pytest.mark.multiprocess, pytest.mark.transport("localhost")]

WAIT = 30.0
MiB = 1 << 20


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _pattern(nbytes: int, seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator).to(device)


def _in_pool(tensor: torch.Tensor) -> bool:
    pointer = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "memfd:sidecar-pool" in line:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= pointer < end:
                return True
    return False


# -- run in peer processes -----------------------------------------------------------------------

_KEPT: dict[str, Any] = {}


def peer_recv(sidecar: Sidecar, id: str, keep: bool = False) -> dict[str, Any]:
    value = sidecar.recv_sync(id, timeout=WAIT)
    tensors = value if isinstance(value, list) else [value]
    result = {
        "digests": [_digest(t) for t in tensors],
        "devices": [str(t.device) for t in tensors],
        "in_pool": [t.device.type == "cpu" and _in_pool(t) for t in tensors],
    }
    if keep:
        _KEPT[id] = value
    else:
        sidecar.mark_done_sync(id)
    return result


def peer_kept_digest(sidecar: Sidecar, id: str) -> str:
    return _digest(_KEPT[id])


def peer_release(sidecar: Sidecar, id: str) -> None:
    _KEPT.pop(id, None)
    sidecar.mark_done_sync(id)


def peer_send_pattern(sidecar: Sidecar, nbytes: int, seed: int, device: str, id: str, dst: int) -> None:
    sidecar.send(_pattern(nbytes, seed, device), id, dst).result(WAIT)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {
        **LocalhostTransport.test_environment(tmp_path_factory.mktemp("lh-gpu")),
        "SIDECAR_TRANSPORT": "localhost",
        "SIDECAR_CONNECT_TIMEOUT": "5",
        "SIDECAR_SEND_TIMEOUT": "60",
        "SIDECAR_LOCALHOST__POOL_BYTES": str(256 * MiB),
    }


@contextlib.contextmanager
def _local(env: dict[str, str], rank: int) -> Iterator[Sidecar]:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        sidecar = Sidecar(SidecarConfig(sidecar_rank=rank))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield sidecar
    finally:
        sidecar.shutdown_sync()


@pytest.fixture(scope="module")
def sender(env: dict[str, str]) -> Iterator[Sidecar]:
    with _local({**env, "SIDECAR_LOCALHOST__CUDA_IPC": "1"}, 0) as sidecar:
        yield sidecar


@pytest.fixture(scope="module")
def gpu_peer(env: dict[str, str]) -> Iterator[PeerProcess]:
    """Rank 1 lands on cuda:0 and accepts CUDA IPC."""
    with PeerProcess(1, {**env, "SIDECAR_RECV_DEVICE": "cuda:0", "SIDECAR_LOCALHOST__CUDA_IPC": "1"}) as peer:
        yield peer


@pytest.fixture(scope="module")
def cpu_peer(env: dict[str, str]) -> Iterator[PeerProcess]:
    """Rank 2 lands on the CPU."""
    with PeerProcess(2, {**env, "SIDECAR_RECV_DEVICE": "cpu"}) as peer:
        yield peer


@pytest.fixture(scope="module")
def second_gpu_peer(env: dict[str, str]) -> Iterator[PeerProcess]:
    """Rank 3 lands on cuda:1 and accepts CUDA IPC."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    with PeerProcess(3, {**env, "SIDECAR_RECV_DEVICE": "cuda:1", "SIDECAR_LOCALHOST__CUDA_IPC": "1"}) as peer:
        yield peer


def _holds(sidecar: Sidecar, rank: int) -> int:
    links = cast(LocalhostTransport, sidecar._transport)._links
    return links[rank].held if rank in links else 0


# -- staged --------------------------------------------------------------------------------------


def test_staged_gpu_to_gpu_is_exact(env: dict[str, str], gpu_peer: PeerProcess) -> None:
    with _local(env, 10) as staged:  # CUDA IPC off on this sender
        tensor = _pattern(64 * MiB + 123, 1, "cuda:0")
        call = gpu_peer.submit(peer_recv, "staged")
        staged.send(tensor, "staged", 1).result(WAIT)
        got = call.result(WAIT)
    assert got["digests"] == [_digest(tensor)]
    assert got["devices"] == ["cuda:0"]


def test_staged_gpu_to_cpu_is_a_view_of_shared_memory(env: dict[str, str], cpu_peer: PeerProcess) -> None:
    with _local(env, 11) as staged:
        tensor = _pattern(16 * MiB, 2, "cuda:0")
        call = cpu_peer.submit(peer_recv, "to-cpu")
        staged.send(tensor, "to-cpu", 2).result(WAIT)
        got = call.result(WAIT)
    assert got["digests"] == [_digest(tensor)]
    assert got["devices"] == ["cpu"]
    assert got["in_pool"] == [True]


def test_staged_list_of_tensors_and_small_tensor(env: dict[str, str], gpu_peer: PeerProcess) -> None:
    with _local(env, 12) as staged:
        tensors = [_pattern(3 * MiB + 1, 3, "cuda:0"), _pattern(17, 4, "cuda:0"), _pattern(9 * MiB, 5, "cuda:0")]
        call = gpu_peer.submit(peer_recv, "list")
        staged.send(tensors, "list", 1).result(WAIT)
        assert call.result(WAIT)["digests"] == [_digest(t) for t in tensors]
        small = _pattern(100, 6, "cuda:0")  # below the threshold: inline on the socket
        call = gpu_peer.submit(peer_recv, "small")
        staged.send(small, "small", 1).result(WAIT)
        got = call.result(WAIT)
    assert got["digests"] == [_digest(small)]
    assert got["devices"] == ["cuda:0"]


def test_cpu_tensor_lands_on_the_receivers_gpu(env: dict[str, str], gpu_peer: PeerProcess) -> None:
    with _local(env, 13) as cpu_sender:
        tensor = _pattern(8 * MiB, 7, "cpu")
        call = gpu_peer.submit(peer_recv, "cpu-to-gpu")
        cpu_sender.send(tensor, "cpu-to-gpu", 1).result(WAIT)
        got = call.result(WAIT)
    assert got["digests"] == [_digest(tensor)]
    assert got["devices"] == ["cuda:0"]


def test_a_pool_a_gpu_receiver_reads_is_not_trimmed(env: dict[str, str], gpu_peer: PeerProcess) -> None:
    # The receiver page-locks its mapping of the sender's pool to copy from it to the GPU. Trimmed
    # by an idle CPU sender, the pool's pages parted from the locked ones: the next frame landed on
    # the GPU with the old bytes.
    with _local({**env, "SIDECAR_LOCALHOST__POOL_TRIM_SECONDS": "0.2"}, 15) as cpu_sender:
        for round, seed in enumerate((21, 22)):
            tensor = _pattern(8 * MiB, seed, "cpu")
            call = gpu_peer.submit(peer_recv, f"after-idle-{round}")
            cpu_sender.send(tensor, f"after-idle-{round}", 1).result(WAIT)
            assert call.result(WAIT)["digests"] == [_digest(tensor)], f"round {round}"
            time.sleep(1.0)  # idle for several trim periods
        # Once that receiver is gone, the idle pool is trimmed again (it stayed full for good).
        transport = cast(LocalhostTransport, cpu_sender._transport)
        resident = _resident(transport)
        assert resident >= 8 * MiB, "nothing was trimmed while the GPU receiver was connected"
        cpu_sender._loop_thread.call(transport._links[1].close())
        wait_until(lambda: _resident(transport) < 8 * MiB, "the idle pool is trimmed", pause=0.05)
        # All of it: page-locking faulted in the whole pool, not just the pages the slots used.
        assert _resident(transport) < 8 * MiB, "the idle pool is trimmed once the GPU receiver left"


def _resident(transport: LocalhostTransport) -> int:
    """Bytes of memory the transport's pool holds now."""
    return int(os.fstat(transport._pool.fd).st_blocks) * 512


def test_gpu_peer_sends_to_this_process(env: dict[str, str], gpu_peer: PeerProcess) -> None:
    with _local({**env, "SIDECAR_RECV_DEVICE": "cuda:0"}, 14) as receiver:
        gpu_peer.call(peer_send_pattern, 32 * MiB, 8, "cuda:0", "from-peer", 14)
        got = receiver.recv_sync("from-peer", timeout=WAIT)
        assert got.device == torch.device("cuda:0")
        assert _digest(got) == _digest(_pattern(32 * MiB, 8, "cpu"))
        receiver.mark_done_sync("from-peer")


# -- CUDA IPC ------------------------------------------------------------------------------------


def test_ipc_is_zero_copy_and_kept_alive_until_mark_done(sender: Sidecar, gpu_peer: PeerProcess) -> None:
    tensor = _pattern(8 * MiB, 9, "cuda:0")
    sender.send(tensor, "ipc", 1).result(WAIT)
    got = gpu_peer.call(peer_recv, "ipc", True)
    assert got["digests"] == [_digest(tensor)]
    assert got["devices"] == ["cuda:0"]
    assert _holds(sender, 1) == 1, "the sender must keep the tensor until the receiver's mark_done"
    # The receiver maps the sender's memory: a write here shows there (only to prove it is zero-copy).
    tensor[:4] = 0
    torch.cuda.synchronize()
    modified = _digest(tensor)
    assert gpu_peer.call(peer_kept_digest, "ipc") == modified
    # Dropping the sender's own reference frees nothing: new allocations cannot take the memory.
    del tensor
    torch.cuda.empty_cache()
    filler = torch.full((8 * MiB,), 7, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    assert gpu_peer.call(peer_kept_digest, "ipc") == modified
    del filler
    gpu_peer.call(peer_release, "ipc")
    wait_until(lambda: not _holds(sender, 1), "the sender released its tensor", 10)
    assert _holds(sender, 1) == 0, "mark_done on the receiver must release the sender's tensor"


def test_ipc_across_gpus(sender: Sidecar, second_gpu_peer: PeerProcess) -> None:
    tensor = _pattern(16 * MiB, 10, "cuda:0")
    sender.send(tensor, "ipc-cross", 3).result(WAIT)
    got = second_gpu_peer.call(peer_recv, "ipc-cross")
    assert got["digests"] == [_digest(tensor)]
    assert got["devices"] == ["cuda:1"]


def test_staged_across_gpus(env: dict[str, str], second_gpu_peer: PeerProcess) -> None:
    with _local(env, 15) as staged:
        tensor = _pattern(16 * MiB, 11, "cuda:0")
        call = second_gpu_peer.submit(peer_recv, "staged-cross")
        staged.send(tensor, "staged-cross", 3).result(WAIT)
        got = call.result(WAIT)
    assert got["digests"] == [_digest(tensor)]
    assert got["devices"] == ["cuda:1"]


def test_a_cuda_receive_device_leaves_cuda_to_forked_children(tmp_path: Path) -> None:
    # The sidecar checks at start that SIDECAR_RECV_DEVICE exists; torch.cuda.is_available() would
    # initialise CUDA there, and a process forked after that cannot use CUDA at all.
    script = textwrap.dedent(
        """
        import os, sys, torch
        from sidecar_core import Sidecar, SidecarConfig

        sidecar = Sidecar(SidecarConfig(sidecar_rank=70))
        pid = os.fork()
        if pid == 0:
            try:
                torch.zeros(1, device="cuda")
            except Exception as exc:
                print(f"child: {type(exc).__name__}: {exc}")
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        sidecar.shutdown_sync()
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    env = checkout_env(
        {
            "SIDECAR_TRANSPORT": "localhost",
            "SIDECAR_RECV_DEVICE": "cuda",
            "SIDECAR_LOCALHOST__SOCKET_DIR": str(tmp_path / "sockets"),
        }
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
