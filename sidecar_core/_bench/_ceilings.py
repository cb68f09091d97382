"""The ceilings every peer is compared with, each measured in one process.

- ``memcpy``: single-thread host copy (``numpy.copyto``) into a preallocated, touched buffer.
- ``cuda-d2d``: ``copy_`` from a tensor on the sender's GPU into a preallocated one on the receiver's.
- ``cuda-h2d-pinned``: ``copy_`` from pinned host memory into a preallocated tensor on the receiver's GPU.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from sidecar_core._bench._endpoint import check_received, make_source

CEILINGS = ("memcpy", "cuda-d2d", "cuda-h2d-pinned")


def _sync(*devices: torch.device) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def measure_ceiling(
    name: str, nbytes: int, warmup: int, count: int, src: torch.device, dst: torch.device
) -> list[float]:
    """Time ``warmup + count`` copies of ``nbytes`` and return the last ``count`` durations in seconds.

    Each copy reads a freshly made source (made before the clock starts) into one destination
    buffer allocated and touched before the first copy.

    Raises:
        ValueError: ``name`` is not a ceiling, or a copy produced wrong bytes.
    """
    if name not in CEILINGS:
        raise ValueError(f"unknown ceiling {name!r}; expected one of {', '.join(CEILINGS)}")
    src_device = torch.device("cpu") if name != "cuda-d2d" else src
    dst_device = torch.device("cpu") if name == "memcpy" else dst
    dst_tensor = make_source(nbytes, 0, dst_device)
    dst_array = dst_tensor.numpy() if name == "memcpy" else None
    times: list[float] = []
    for i in range(warmup + count):
        value = i % 250 + 1
        source = make_source(nbytes, value, src_device, pinned=name == "cuda-h2d-pinned")
        src_array = source.numpy() if dst_array is not None else None
        start = time.perf_counter()
        if dst_array is not None and src_array is not None:
            np.copyto(dst_array, src_array)
        else:
            dst_tensor.copy_(source, non_blocking=True)
            _sync(src_device, dst_device)
        elapsed = time.perf_counter() - start
        check_received(dst_tensor, nbytes, value, name)
        del source, src_array  # before the next one is made: one source at a time
        if i >= warmup:
            times.append(elapsed)
    return times
