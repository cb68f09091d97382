"""Host copies into pool slots: the one copy a CPU payload makes on its way to a peer.

A buffer of :data:`PARALLEL_BYTES` or more is copied by torch (``Tensor.copy_``), which spreads the
copy over its intra-op threads (``torch.set_num_threads``, ``OMP_NUM_THREADS``) and releases the
GIL; smaller buffers, and read-only ones (``bytes``), by numpy on the calling thread. The copy
threads here only take copies off the sender's thread: :meth:`Copier.submit` runs a frame's copy on
one of them, so that ``send`` returns at once, while :meth:`Copier.copy`, for small frames, copies
on the calling thread.

Why torch's threads: the copy threads used to cut a large copy into one piece per thread. On the
2-core development machine the second piece often started only after the first had finished
(each woken Python thread first needs the GIL, and its CPU may be idle and slow to wake), so two
threads copied no faster than one (``docs/architecture.md``, "Copies by torch's threads").
torch's threads need no GIL, and the calling thread copies its share at once.

Concurrency: :meth:`Copier.copy` and :meth:`Copier.submit` may be called from any thread, several at
once; the copies of up to ``threads`` frames run at the same time.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence

import numpy as np
import torch

from sidecar_core import Buffer

#: Buffers from this size on are copied by torch over its intra-op threads; waking them costs
#: more than it saves below it.
PARALLEL_BYTES = 1 << 20


def default_copy_threads() -> int:
    """Two threads (one on a single CPU): a frame's copy need not wait for another frame's."""
    return min(2, len(os.sched_getaffinity(0)))


def as_array(buf: Buffer) -> np.ndarray:
    """A flat ``uint8`` array over a host buffer's bytes (no copy)."""
    if isinstance(buf, torch.Tensor):
        return buf.detach().numpy().reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def copy_piece(target: np.ndarray, source: np.ndarray) -> None:
    """Copy one buffer (every byte a :class:`Copier` moves goes through here)."""
    if source.size >= PARALLEL_BYTES and source.flags.writeable:
        torch.from_numpy(target).copy_(torch.from_numpy(source))
    else:  # torch refuses to wrap read-only memory without a warning
        np.copyto(target, source)


class Copier:
    """Copies host buffers into slots.

    Args:
        threads: How many frames' copies may run at once on the copy threads.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sidecar-copy")

    def submit(
        self, slot: memoryview, buffers: Sequence[Buffer], offsets: Sequence[int]
    ) -> concurrent.futures.Future[None]:
        """Start the copy on a copy thread; the future completes once every byte is in place.

        Never raises: a failure (a bad buffer, the copier closed meanwhile) fails the future. The
        future cannot be cancelled.
        """
        whole: concurrent.futures.Future[None] = concurrent.futures.Future()
        whole.set_running_or_notify_cancel()  # under way, as a pool's future would be: not cancellable
        try:
            self._pool.submit(self._fill, whole, slot, buffers, offsets)
        except RuntimeError as exc:  # the copier was closed
            whole.set_exception(exc)
        return whole

    def _fill(
        self,
        whole: concurrent.futures.Future[None],
        slot: memoryview,
        buffers: Sequence[Buffer],
        offsets: Sequence[int],
    ) -> None:
        try:
            self.copy(slot, buffers, offsets)
        except BaseException as exc:  # the future reports it; nothing else would
            whole.set_exception(exc)
        else:
            whole.set_result(None)

    def copy(self, slot: memoryview, buffers: Sequence[Buffer], offsets: Sequence[int]) -> None:
        """Copy each buffer to ``slot[offset:]``; returns when every byte is in place.

        On the calling thread (and torch's threads, for large buffers). Every buffer is checked
        before the first byte is written.

        Raises:
            ValueError: A buffer does not fit the slot at its offset.
        """
        dst = np.frombuffer(slot, dtype=np.uint8)
        pieces: list[tuple[np.ndarray, np.ndarray]] = []
        for buf, offset in zip(buffers, offsets, strict=True):
            source = as_array(buf)
            if offset < 0 or offset + source.size > dst.size:
                raise ValueError(f"a buffer of {source.size} bytes at offset {offset} overruns a slot of {dst.size}")
            pieces.append((dst[offset : offset + source.size], source))
        for target, source in pieces:
            copy_piece(target, source)

    def close(self) -> None:
        """Stop the copy threads once the copies already submitted are done."""
        self._pool.shutdown(wait=False)
