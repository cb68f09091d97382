"""Shared memory: this process's send pool, and the peers' pools it maps.

Each sidecar owns one *pool*: a ``memfd`` region that its sends copy large payloads into (the one
copy on the way). A peer receives the pool's file descriptor once per connection (``SCM_RIGHTS``),
maps it, and hands the store zero-copy views of the slots. The peer tells the owner when a slot is
no longer read (``RELEASE``, after ``mark_done``); only the owner allocates and frees.

Why ``memfd`` rather than files in ``/dev/shm``: a memfd has no name, so nobody can guess or open
it, and nothing is left behind when a process is killed; the kernel returns the memory once the last
process that holds the descriptor or a mapping exits. The region is sealed against shrinking, so a
peer's mapping can never fault on a truncated file.

Page faults: slots are allocated first-fit from the lowest address, so steady traffic reuses the
same pages, and pages are populated in bulk (``MADV_POPULATE_*``) as the pool's high-water mark
grows, never one fault per page. The pool never grows past its capacity: when it is full, senders
wait for releases. :meth:`Pool.trim` gives the pages above the highest slot in use back to the
system (the transport calls it once sends have been idle for a while), so a burst of large sends
does not hold its memory for the process's lifetime.

Concurrency: slots are taken on the event-loop thread, or on a thread that sends a frame to an open
connection itself (:meth:`Pool.try_acquire`, under the pool's lock); they are freed (:meth:`Lease.release`)
and the pool trimmed on the loop thread only, since freeing wakes the loop's waiting senders.
Worker threads only write into slots they were given.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Callable
from typing import cast

import torch

from sidecar_core import CapacityError
from transports.localhost._protocol import ProtocolError

logger = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
MFD_NAME = "sidecar-pool"
#: Linux 5.14+; older kernels refuse them and pages fault in on first touch instead.
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
_POPULATE_STEP = 2 << 20
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _populate(region: mmap.mmap, advice: int, start: int, end: int) -> None:
    with contextlib.suppress(OSError):
        region.madvise(advice, start, end - start)


class Lease:
    """A slot of the pool, reference counted: a broadcast shares one slot among destinations."""

    __slots__ = ("offset", "on_free", "pool", "refs", "size")

    def __init__(self, pool: Pool, offset: int, size: int) -> None:
        self.pool = pool
        self.offset = offset
        self.size = size
        self.refs = 1
        #: Called once the slot went back to the pool.
        self.on_free: Callable[[], None] | None = None

    def view(self) -> memoryview:
        """The slot's bytes (writable)."""
        return self.pool.view[self.offset : self.offset + self.size]

    def retain(self) -> None:
        """Add a holder."""
        self.refs += 1

    def release(self) -> None:
        """Drop a holder; the last one returns the slot to the pool (loop thread)."""
        self.refs -= 1
        if self.refs == 0:
            self.pool.free(self)
            if self.on_free is not None:
                self.on_free()


class Pool:
    """This process's send pool (see the module docstring).

    Args:
        capacity: Bytes of the region (``SIDECAR_LOCALHOST__POOL_BYTES``).

    The region is created on first use. :meth:`close` unmaps it; its memory returns to the system
    once every peer has unmapped it too (peers unmap when the connection closes).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = _round_up(capacity, PAGE)
        self.fd = -1
        self._region: mmap.mmap | None = None
        self.view = memoryview(b"")
        #: Guards the free blocks, the populated mark, the counters and closing (see the module docstring).
        self._lock = threading.Lock()
        self._closed = False
        self._free_blocks: list[tuple[int, int]] = [(0, self.capacity)]
        self._populated = 0
        self._trim_all = False  # see trim_all_next
        #: Sends waiting for room, in order: the slot size each needs and the future that gets it.
        self._waiters: list[tuple[int, asyncio.Future[Lease]]] = []
        self.used = 0
        #: Slots handed out so far (the transport trims only after a period without any).
        self.acquired = 0

    @property
    def is_open(self) -> bool:
        """Whether the region exists."""
        return self._region is not None

    @property
    def region(self) -> mmap.mmap:
        """The mapped region (created on first use)."""
        if self._region is None:
            self._open()
        assert self._region is not None
        return self._region

    def _open(self) -> None:
        fd = os.memfd_create(MFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, self.capacity)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            region = mmap.mmap(fd, self.capacity, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise CapacityError(
                f"cannot map a shared-memory pool of {self.capacity} bytes ({exc.strerror or exc}); lower "
                "SIDECAR_LOCALHOST__POOL_BYTES"
            ) from exc
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):
            region.madvise(mmap.MADV_HUGEPAGE)
        self.fd, self._region = fd, region
        self.view = memoryview(region)

    def try_acquire(self, nbytes: int) -> Lease | None:
        """A slot of at least ``nbytes`` bytes (page aligned), or ``None``; any thread.

        ``None`` when no slot is free now, and also while sends wait in :meth:`acquire`: they get
        room first, so a later frame never takes the room an earlier one waits for.
        """
        with self._lock:
            if self._closed or self._waiters:
                return None
            return self._take(_round_up(max(nbytes, 1), PAGE))

    def _take(self, size: int) -> Lease | None:
        """The first free block of ``size`` bytes, or ``None`` (with the lock held)."""
        region = self.region
        for index, (offset, length) in enumerate(self._free_blocks):
            if length >= size:
                if length == size:
                    del self._free_blocks[index]
                else:
                    self._free_blocks[index] = (offset + size, length - size)
                self.used += size
                self.acquired += 1
                if offset + size > self._populated:
                    end = min(self.capacity, _round_up(offset + size, _POPULATE_STEP))
                    _populate(region, MADV_POPULATE_WRITE, self._populated, end)
                    self._populated = end
                return Lease(self, offset, size)
        return None

    async def acquire(self, nbytes: int, timeout: float, holders: Callable[[], str]) -> Lease:
        """A slot of at least ``nbytes`` bytes, waiting up to ``timeout`` seconds for one to be freed.

        Waiting sends get room in the order they started waiting: a frame that does not fit yet
        holds back later ones, so none waits forever behind a stream of smaller frames. Cancelling
        the wait leaves the pool unchanged.

        Raises:
            CapacityError: No slot was freed in time (the message says who holds the pool and what to do).
        """
        if nbytes > self.capacity:
            raise CapacityError(
                f"a frame of {nbytes} bytes cannot fit the {self.capacity}-byte shared-memory pool; raise "
                "SIDECAR_LOCALHOST__POOL_BYTES"
            )
        size = _round_up(max(nbytes, 1), PAGE)
        waiter: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        with self._lock:
            lease = None if self._waiters else self._take(size)
            if lease is not None:
                return lease
            self._waiters.append((size, waiter))
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # granted in the loop turn the deadline came (3.12+)
                return waiter.result()
            raise CapacityError(
                f"the shared-memory pool is full: no room for {nbytes} bytes after waiting {timeout:.3g}s "
                f"({self.used} of {self.capacity} bytes are held {holders()}). Receivers must call "
                "mark_done on chunks they have consumed; or raise SIDECAR_LOCALHOST__POOL_BYTES"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                waiter.result().release()  # granted just as the wait was cancelled
            raise
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove((size, waiter))
            self._grant()  # the next waiter may fit where this one did not

    def free(self, lease: Lease) -> None:
        """Return a slot and hand room to waiting senders (use :meth:`Lease.release`; loop thread)."""
        with self._lock:
            self.used -= lease.size
            start, end = lease.offset, lease.offset + lease.size
            index = bisect.bisect(self._free_blocks, (start, 0))
            if index < len(self._free_blocks) and self._free_blocks[index][0] == end:
                end += self._free_blocks.pop(index)[1]
            if index > 0 and sum(self._free_blocks[index - 1]) == start:
                index -= 1
                start = self._free_blocks.pop(index)[0]
            self._free_blocks.insert(index, (start, end - start))
        self._grant()

    def _grant(self) -> None:
        """Give free room to the waiting senders in order, until the first that does not fit (loop thread)."""
        granted: list[tuple[asyncio.Future[Lease], Lease]] = []
        with self._lock:
            while self._waiters and not self._closed:
                size, waiter = self._waiters[0]
                if waiter.done():  # timed out or cancelled; acquire removes it
                    self._waiters.pop(0)
                    continue
                lease = self._take(size)
                if lease is None:
                    break
                self._waiters.pop(0)
                granted.append((waiter, lease))
        for waiter, lease in granted:
            waiter.set_result(lease)

    def trim_all_next(self) -> None:
        """Make the next :meth:`trim` free everything above the slots in use, up to the capacity.

        A peer page-locking its mapping faults the whole pool in, not just the pages this
        process's slots populated (which :meth:`trim` otherwise frees).
        """
        with self._lock:
            self._trim_all = True

    def trim(self) -> int:
        """Give the populated pages above the highest slot in use back to the system.

        They are populated again when a later slot needs them. Peers' stale views of freed slots
        there read zeros afterwards (a view is only valid until ``mark_done``).

        Returns:
            The bytes given back (0 if nothing was above the slots in use, or the kernel refused).
        """
        with self._lock:
            if self._region is None or not self._free_blocks:
                return 0
            start, length = self._free_blocks[-1]
            top = self.capacity if self._trim_all else self._populated
            if start + length != self.capacity or start >= top:
                return 0  # the top of the pool is in use, or nothing above the slots in use is populated
            try:
                self._region.madvise(mmap.MADV_REMOVE, start, top - start)
            except OSError as exc:
                logger.debug("could not give pool pages back: %s", exc)
                return 0
            released, self._populated, self._trim_all = top - start, min(self._populated, start), False
            return released

    def close(self) -> None:
        """Unmap and close the region (views still held elsewhere keep their mapping alive)."""
        with self._lock:
            self._closed = True
        if self._region is None:
            return
        self.view.release()
        with contextlib.suppress(BufferError):
            self._region.close()
        os.close(self.fd)
        self.fd, self._region = -1, None


class PeerPool:
    """A peer's pool, mapped into this process to give the store zero-copy views of its slots.

    The 2 MiB steps a slot covers are read in (``MADV_POPULATE_READ``) the first time a slot needs
    them, and only those: the peer's region may be sparse, and reading in a hole allocates it.

    Args:
        fd: The pool's descriptor as received; it is closed here (the mapping keeps the memory).
        size: The size the peer announced.

    Raises:
        ProtocolError: The descriptor is not a sealed region of the announced size.
    """

    def __init__(self, fd: int, size: int) -> None:
        try:
            actual = os.fstat(fd).st_size
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if actual != size or size <= 0 or not seals & fcntl.F_SEAL_SHRINK:
                raise ProtocolError(
                    f"the peer's pool descriptor is not a sealed region of {size} bytes (size {actual}, seals {seals})"
                )
            self._region = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise ProtocolError(f"cannot map the peer's pool: {exc}") from None
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            self._region.madvise(mmap.MADV_HUGEPAGE)
        self.size = size
        self.view = memoryview(self._region)
        # Which populate steps of the region were read in. Only slots' own steps are: a peer's pool
        # may be sparse, and reading in a hole allocates it here.
        self._populated = bytearray(-(-size // _POPULATE_STEP))

    @property
    def region(self) -> mmap.mmap:
        """The mapping."""
        return self._region

    def slot(self, offset: int, span: int) -> memoryview:
        """The bytes of a slot, checked against the region's bounds.

        Raises:
            ProtocolError: The slot lies outside the region.
        """
        if offset % PAGE or offset + span > self.size:
            raise ProtocolError(f"slot [{offset}, {offset + span}) is outside the peer's {self.size}-byte pool")
        first, last = offset // _POPULATE_STEP, -(-(offset + span) // _POPULATE_STEP)
        if not all(self._populated[first:last]):
            _populate(self._region, MADV_POPULATE_READ, first * _POPULATE_STEP, min(self.size, last * _POPULATE_STEP))
            self._populated[first:last] = b"\x01" * (last - first)
        return self.view[offset : offset + span]

    def close(self) -> None:
        """Unmap, unless views are still held (then the last view's release unmaps)."""
        self.view.release()
        with contextlib.suppress(BufferError):
            self._region.close()


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor (no copy; it keeps the tensor alive)."""
    return memoryview(cast(bytes, tensor.numpy())).cast("B")
