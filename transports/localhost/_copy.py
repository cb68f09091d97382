"""Host copies into pool slots: the one copy a CPU payload makes on its way to a peer.

Copies are plain ``memcpy`` through numpy, which releases the GIL, so a copy on a worker thread does
not stall the event loop. With ``threads > 1`` a large copy started with :meth:`Copier.submit` is
cut into that many pieces, all handed to the copy threads at once; that helps where one core
cannot saturate memory bandwidth, and hurts on a busy host with few cores
(``benchmarks/localhost_probe.py --copy-threads N`` measures it). :meth:`Copier.copy`, for small
frames, copies on the calling thread alone.

Concurrency: :meth:`Copier.copy` and :meth:`Copier.submit` may be called from any thread, several at
once.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
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


class _Gather:
    """Completes ``whole`` once ``count`` pieces are done: with the first error to arrive, if any failed."""

    def __init__(self, whole: concurrent.futures.Future[None], count: int) -> None:
        self._whole = whole
        self._left = count
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        if not count:
            whole.set_result(None)

    def piece_done(self, piece: concurrent.futures.Future[None]) -> None:
        """A piece finished (a pool future's done callback)."""
        if piece.cancelled():  # the copy threads were stopped before it ran
            error: BaseException | None = RuntimeError("the copy was cancelled: the sidecar is shutting down")
        else:
            error = piece.exception()
        self._settle(1, error)

    def give_up(self, count: int, error: BaseException) -> None:
        """``count`` pieces will never run."""
        self._settle(count, error)

    def _settle(self, count: int, error: BaseException | None) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
            self._left -= count
            if self._left:
                return
        if self._error is not None:
            self._whole.set_exception(self._error)
        else:
            self._whole.set_result(None)


def copy_piece(target: np.ndarray, source: np.ndarray) -> None:
    """Copy one piece (every byte a :class:`Copier` moves goes through here)."""
    np.copyto(target, source)


class Copier:
    """Copies host buffers into slots, optionally with several threads.

    Args:
        threads: Threads that share one large copy (1: the calling thread alone).
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        # Nothing run here waits for anything else run here, so one pool serves every copy.
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sidecar-copy")

    def submit(
        self, slot: memoryview, buffers: Sequence[Buffer], offsets: Sequence[int]
    ) -> concurrent.futures.Future[None]:
        """Start the copy on the worker threads; the future completes once every byte is in place.

        The pieces of a split copy all go to the pool at once, so the threads share them evenly
        (a frame of several large buffers included) and none waits for another to hand it out.
        Never raises: a failure (a bad buffer, the pool shut down meanwhile) fails the future, once
        every piece already handed out is done. The future cannot be cancelled.
        """
        whole: concurrent.futures.Future[None] = concurrent.futures.Future()
        whole.set_running_or_notify_cancel()  # under way, as a pool's future would be: not cancellable
        try:
            pieces = self._pieces(slot, buffers, offsets)
        except Exception as exc:
            whole.set_exception(exc)
            return whole
        gather = _Gather(whole, len(pieces))
        for index, (target, source) in enumerate(pieces):
            try:
                piece = self._pool.submit(copy_piece, target, source)
            except Exception as exc:  # the pool shut down meanwhile
                gather.give_up(len(pieces) - index, exc)
                break
            piece.add_done_callback(gather.piece_done)
        return whole

    def copy(self, slot: memoryview, buffers: Sequence[Buffer], offsets: Sequence[int]) -> None:
        """Copy each buffer to ``slot[offset:]`` on the calling thread; returns when every byte is in place.

        For small frames (the transport passes at most a few MiB): handing pieces to the copy threads
        would make the caller wait behind their large copies.
        """
        for target, source in self._pieces(slot, buffers, offsets, split=False):
            copy_piece(target, source)

    def _pieces(
        self, slot: memoryview, buffers: Sequence[Buffer], offsets: Sequence[int], *, split: bool = True
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(target, source) pairs covering every buffer: large ones cut into one piece per thread if ``split``."""
        dst = np.frombuffer(slot, dtype=np.uint8)
        pieces: list[tuple[np.ndarray, np.ndarray]] = []
        for buf, offset in zip(buffers, offsets, strict=True):
            src = as_array(buf)
            if not src.size:
                continue
            target = dst[offset : offset + src.size]
            if not split or self.threads == 1 or src.size < SPLIT_BYTES:
                pieces.append((target, src))
                continue
            step = -(-src.size // self.threads)
            pieces.extend((target[i : i + step], src[i : i + step]) for i in range(0, src.size, step))
        return pieces

    def close(self) -> None:
        """Stop the worker threads once the copies already started are done."""
        self._pool.shutdown(wait=False)
