"""GPU 0 in one process to GPU 1 in another, through every transport path that can do it.

Runs on a host with two CUDA devices: the ucx transport (cuda_ipc over NVLink where UCX picks
it), the localhost transport's staged path (pinned shared memory) and its CUDA IPC path. Each
test checks the bytes that arrive on GPU 1. Skipped with the reason where CUDA is absent or only
one device is present.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sidecar_core import Sidecar
from sidecar_core.testing import Deployment

pytestmark = [pytest.mark.gpu, pytest.mark.multiprocess]

MiB = 1 << 20
PATHS = {
    "ucx": ("ucx", {}),
    "localhost-staged": ("localhost", {}),
    "localhost-cuda-ipc": ("localhost", {"SIDECAR_LOCALHOST__CUDA_IPC": "1"}),
}


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def peer_recv_on_gpu1(sidecar: Sidecar, id: str) -> tuple[str, str, list[int], str]:
    value = sidecar.recv_sync(id, timeout=60)
    torch.cuda.synchronize(value.device)
    result = (str(value.device), str(value.dtype), list(value.shape), _digest(value))
    sidecar.mark_done_sync(id)
    return result


@pytest.fixture(params=sorted(PATHS))
def gpu_deployment(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Deployment]:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices, found {torch.cuda.device_count()}")
    transport, extra = PATHS[request.param]
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    deployment = Deployment(transport, tmp_path)
    deployment.env.update(extra)
    try:
        yield deployment
    finally:
        deployment.close()


@pytest.mark.parametrize("size", [4096, MiB, 64 * MiB])
def test_gpu0_to_gpu1_bytes_arrive_on_gpu1(gpu_deployment: Deployment, size: int) -> None:
    peer = gpu_deployment.spawn(1, {"SIDECAR_RECV_DEVICE": "cuda:1"})
    try:
        generator = torch.Generator().manual_seed(size)
        sent = torch.randn(size // 4, generator=generator).to("cuda:0")
        expected = _digest(sent)
        id = f"cross-gpu-{size}"
        call = peer.submit(peer_recv_on_gpu1, id)
        gpu_deployment.sidecar.send(sent, id, [[1]]).result(timeout=60)
        device, dtype, shape, digest = call.result(timeout=90)
    finally:
        peer.close()
    assert device == "cuda:1"
    assert (dtype, shape) == ("torch.float32", [size // 4])
    assert digest == expected
