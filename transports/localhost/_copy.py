"""Host copies into pool slots: the one copy a CPU payload makes on its way to a peer.

:meth:`Copier.submit` runs a frame's copy on one of the copy threads, so that ``send`` returns at
once; there each writable buffer of :data:`PARALLEL_BYTES` or more is copied by torch
(``Tensor.copy_``), which spreads the copy over its intra-op threads and releases the GIL, and other
buffers by numpy. :meth:`Copier.copy`, for small frames, copies with numpy on the calling thread.

Why torch's threads: the copy threads used to cut a large copy into one piece per thread. On the
2-core development machine the second piece often started only after the first had finished
(each woken Python thread first needs the GIL, and its CPU may be idle and slow to wake), so two
threads copied no faster than one (``docs/architecture.md``, "Copies by torch's threads").
torch's threads need no GIL, and the copying thread copies its share at once.

Why only on the copy threads: GNU OpenMP, which torch's CPU builds use, does not survive ``fork``.
A thread that has run a parallel region keeps a team of OpenMP threads; in a forked child that
team is gone, and the thread's next parallel region never returns. The copy threads are the
sidecar's own (a child starts its own); the callers' threads and the loop's are not, so nothing
here starts OpenMP on them. Each copy thread takes torch's intra-op thread count
(``torch.set_num_threads``, ``OMP_NUM_THREADS``) as it is at its first copy, and keeps it.

Concurrency: :meth:`Copier.copy` and :meth:`Copier.submit` may be called from any thread, several at
once; the copies of up to ``threads`` frames run at the same time.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
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


def copy_piece(target: np.ndarray, source: np.ndarray, *, parallel: bool = False) -> None:
    """Copy one buffer (every byte a :class:`Copier` moves goes through here).

    ``parallel`` (copy threads only, see the module docstring): large writable buffers go through
    torch's intra-op threads. Read-only ones stay with numpy: torch warns when it wraps them.
    """
    if parallel and source.size >= PARALLEL_BYTES and source.flags.writeable:
        torch.from_numpy(target).copy_(torch.from_numpy(source))
    else:
        np.copyto(target, source)


class _Job:
    """A submitted copy: started by a copy thread or abandoned by its submitter, whichever comes first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "queued"

    def claim(self, state: str) -> bool:
        """Move from ``queued`` to ``state`` (``running`` or ``abandoned``); ``False`` if already moved."""
        with self._lock:
            if self._state != "queued":
                return False
            self._state = state
            return True


class Copier:
    """Copies host buffers into slots.

    Args:
        threads: How many frames' copies may run at once on the copy threads.
    """

    def __init__(self, threads: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sidecar-copy")

    def submit(
        self, slot: memoryview, buffers: Sequence[Buffer], offsets: Sequence[int]
    ) -> concurrent.futures.Future[None]:
        """Start the copy on a copy thread; the future completes once every byte is in place.

        Never raises: a failure (a bad buffer, the copier closed meanwhile, a copy thread that
        could not start) fails the future, and then nothing is written to the slot. The future
        cannot be cancelled.
        """
        whole: concurrent.futures.Future[None] = concurrent.futures.Future()
        whole.set_running_or_notify_cancel()  # under way, as a pool's future would be: not cancellable
        job = _Job()
        try:
            self._pool.submit(self._fill, job, whole, slot, buffers, offsets)
        except Exception as exc:  # closed, or no thread could start (the copy may be queued all the same)
            if job.claim("abandoned"):  # else a copy thread has it and completes the future
                whole.set_exception(exc)
        return whole

    def _fill(
        self,
        job: _Job,
        whole: concurrent.futures.Future[None],
        slot: memoryview,
        buffers: Sequence[Buffer],
        offsets: Sequence[int],
    ) -> None:
        if not job.claim("running"):  # its submitter gave up on it and reused the slot
            return
        try:
            self._copy(slot, buffers, offsets, parallel=True)
        except BaseException as exc:  # the future reports it; nothing else would
            whole.set_exception(exc)
        else:
            whole.set_result(None)

    def copy(self, slot: memoryview, buffers: Sequence[Buffer], offsets: Sequence[int]) -> None:
        """Copy each buffer to ``slot[offset:]`` on the calling thread; returns when every byte is in place.

        With numpy alone (see the module docstring). Every buffer is checked before the first byte
        is written.

        Raises:
            ValueError: A buffer does not fit the slot at its offset.
        """
        self._copy(slot, buffers, offsets, parallel=False)

    def _copy(self, slot: memoryview, buffers: Sequence[Buffer], offsets: Sequence[int], *, parallel: bool) -> None:
        dst = np.frombuffer(slot, dtype=np.uint8)
        pieces: list[tuple[np.ndarray, np.ndarray]] = []
        for buf, offset in zip(buffers, offsets, strict=True):
            source = as_array(buf)
            if offset < 0 or offset + source.size > dst.size:
                raise ValueError(f"a buffer of {source.size} bytes at offset {offset} overruns a slot of {dst.size}")
            pieces.append((dst[offset : offset + source.size], source))
        for target, source in pieces:
            copy_piece(target, source, parallel=parallel)

    def close(self) -> None:
        """Stop the copy threads once the copies already submitted are done."""
        self._pool.shutdown(wait=False)
