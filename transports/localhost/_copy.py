"""Host copies into pool slots: the one copy a CPU payload makes on its way to a peer.

Copies are plain ``memcpy`` through numpy, which releases the GIL, so a copy on a worker thread does
not stall the event loop. With ``threads > 1`` a large copy is cut into that many pieces copied at
once; that helps where one core cannot saturate memory bandwidth, and hurts on a busy host with
few cores (``benchmarks/localhost_probe.py --copy-threads N`` measures it).

Concurrency: :meth:`Copier.copy` and :meth:`Copier.submit` may be called from any thread, several at
once.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence

import numpy as np
import torch

from sidecar_core import Buffer

#: Copies smaller than this are not worth splitting.
SPLIT_BYTES = 8 << 20
#: The most threads the automatic choice uses.
MAX_AUTO_THREADS = 8


def default_copy_threads() -> int:
    """A quarter of the CPUs this process may run on, at least 2 where there are 2, at most :data:`MAX_AUTO_THREADS`.

    Two threads pay even on a 2-core machine: the receiver sleeps while the sender copies, and one
    core does not saturate memory bandwidth (64 MiB on 2 cores: 0.74x single-thread memcpy with one
    copy thread, 0.79-0.90x with two).
    """
    usable = len(os.sched_getaffinity(0))
    return max(min(2, usable), min(MAX_AUTO_THREADS, usable // 4))


def as_array(buf: Buffer) -> np.ndarray:
    """A flat ``uint8`` array over a host buffer's bytes (no copy)."""
    if isinstance(buf, torch.Tensor):
        return buf.detach().numpy().reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


class Copier:
    """Copies host buffers into slots, optionally with several threads.

    Args:
        threads: Threads that share one large copy (1: the calling thread alone).
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._helpers = (
            concurrent.futures.ThreadPoolExecutor(threads - 1, thread_name_prefix="sidecar-copy")
            if threads > 1
            else None
        )
        # Whole copies started with submit(); separate from the helpers, which they may wait for.
        self._jobs = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sidecar-copy-job")

    def submit(
        self, slot: memoryview, buffers: Sequence[Buffer], offsets: Sequence[int]
    ) -> concurrent.futures.Future[None]:
        """Start :meth:`copy` on a worker thread; the future completes once every byte is in place."""
        return self._jobs.submit(self.copy, slot, buffers, offsets)

    def copy(self, slot: memoryview, buffers: Sequence[Buffer], offsets: Sequence[int]) -> None:
        """Copy each buffer to ``slot[offset:]``; returns when every byte is in place."""
        dst = np.frombuffer(slot, dtype=np.uint8)
        pieces: list[tuple[np.ndarray, np.ndarray]] = []
        for buf, offset in zip(buffers, offsets, strict=True):
            src = as_array(buf)
            if src.size:
                pieces.extend(self._split(dst[offset : offset + src.size], src))
        if self._helpers is None or len(pieces) < 2:
            for target, source in pieces:
                np.copyto(target, source)
            return
        futures = [self._helpers.submit(np.copyto, target, source) for target, source in pieces[1:]]
        np.copyto(*pieces[0])
        for future in futures:
            future.result()

    def _split(self, target: np.ndarray, source: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._helpers is None or source.size < SPLIT_BYTES:
            return [(target, source)]
        step = -(-source.size // self.threads)
        return [(target[i : i + step], source[i : i + step]) for i in range(0, source.size, step)]

    def close(self) -> None:
        """Stop the worker threads once the copies already started are done."""
        self._jobs.shutdown(wait=False)
        if self._helpers is not None:
            self._helpers.shutdown(wait=False)
