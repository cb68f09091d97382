"""Who reads the transport's sockets: the event loop, or a thread waiting in ``recv_sync`` (or on a send).

The loop does not watch each connection's socket itself. It watches one epoll instance that holds
them all (:class:`Readers`), so that a thread that is about to wait for a chunk (or for the
acknowledgement of its send) can take the sockets from it without a hop through the loop:
:meth:`Readers.poll_here` sets their events there to none (``epoll_ctl`` from that thread), polls
them without sleeping for a short budget, handles on its own thread the messages that are safe there
(inline frames, and acknowledgements: those of frames sent on the loop are handed to it) and
restores their events as soon as its chunk has arrived or the budget is spent. Every other message
stops the thread at that connection and goes to the loop, which reads on from there.

A socket with no events still reports a hang-up. Then the loop wakes, finds the channel's lock
taken and leaves it, until the polling thread, which sees the same hang-up, hands the channel back;
the loop closes it. Modifying the events costs half of removing and adding the socket, and the
thread keeps its poll object from one wait to the next: a wait's set-up and hand-back took 5.0 µs
instead of 7.3 on 2 cores (``wait_setup`` in ``benchmarks/localhost_probe.py``).

Why: on a machine whose CPUs go idle between messages, a reply that wakes the loop thread, which
then wakes the waiting thread, is handled on cold caches twice. Read and handled by the thread that
waits for it, still running, a small-object round trip took about half as long on 2 cores and on a
32-core host (``docs/architecture.md``, "The localhost transport").

Concurrency: :meth:`Readers.watch`, :meth:`Readers.forget`, :meth:`Readers.close` and the dispatch
run on the loop thread; :meth:`Readers.poll_here` on any other thread, one thread at a time (a
second one returns at once and waits for its future as usual). A channel is read by one thread at
a time: whoever reads it holds its ``read_lock``. Reading, the loop only tries that lock, since a
socket with no events stops waking it; a polling thread taking a channel waits for a read of the
loop's that is under way, and so does closing a channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transports.localhost._channel import Channel

logger = logging.getLogger(__name__)


class Readers:
    """The sockets the loop reads, and the hand-over to a waiting thread (see the module docstring).

    Args:
        loop: The event loop that reads the sockets while no thread polls them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._channels: dict[int, Channel] = {}
        self._lock = threading.Lock()  # guards _channels against the polling thread's snapshot
        self._polling = threading.Lock()  # held by the one thread in poll_here
        # The polling thread's poll object and the sockets it holds (only that thread uses them).
        self._poller = select.poll()
        self._polled: frozenset[int] = frozenset()
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def watch(self, channel: Channel) -> None:
        """Start reading ``channel`` on the loop (loop thread)."""
        with self._lock:
            self._channels[channel.fileno] = channel
        self._epoll.register(channel.fileno, select.EPOLLIN)

    def forget(self, channel: Channel) -> None:
        """Stop reading ``channel``, which is closing (loop thread)."""
        with self._lock:
            if self._channels.get(channel.fileno) is channel:
                del self._channels[channel.fileno]
        # OSError: not registered any more, or its socket already closed; ValueError: this object closed.
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(channel.fileno)

    def _dispatch(self) -> None:
        for fd, _ in self._epoll.poll(0):
            channel = self._channels.get(fd)
            if channel is not None:
                channel.on_readable()

    def poll_here(self, ready: Callable[[], bool], seconds: float) -> None:
        """Read the sockets on this thread until ``ready()`` or for ``seconds``, without sleeping.

        Any thread but the loop's. Returns at once if another thread is polling. Never raises: a
        connection that fails, ends or sends something only the loop handles goes back to the loop.
        """
        if seconds <= 0 or not self._polling.acquire(blocking=False):
            return
        owned: dict[int, Channel] = {}
        try:
            with self._lock:
                channels = list(self._channels.values())
            for channel in channels:
                if channel.direct and self._take(channel):
                    owned[channel.fileno] = channel
            poller = self._poller_for(owned)
            end = time.perf_counter() + seconds
            while owned and not ready() and time.perf_counter() < end:
                events = poller.poll(0)
                if not events:
                    os.sched_yield()  # let the loop thread, or anyone, run on this CPU
                    continue
                for fd, _ in events:
                    channel = owned[fd]
                    try:
                        keep = channel.read_here()
                    except Exception:  # a bug, or the loop closed under it: the loop takes the channel back
                        logger.exception("%s: reading on a waiting thread failed", channel.name)
                        keep = False
                    if not keep:
                        poller.unregister(fd)
                        self._polled = frozenset()  # the poll object no longer matches: build it again
                        self._give_back(owned.pop(fd))
        finally:
            for channel in owned.values():
                self._give_back(channel)
            self._polling.release()

    def _poller_for(self, owned: dict[int, Channel]) -> select.poll:
        """A poll object for the sockets in ``owned``, kept from the last wait while they are the same."""
        if self._polled != owned.keys():
            self._poller = select.poll()
            for fd in owned:
                self._poller.register(fd, select.POLLIN)
            self._polled = frozenset(owned)
        return self._poller

    def _take(self, channel: Channel) -> bool:
        """Take ``channel`` from the loop; ``False`` if it is closing or holds messages for the loop.

        The lock comes first (it waits for a read of the loop's that is under way): a channel cannot
        close while it is held, so the descriptor whose events are set to none is still this
        channel's. A closed channel's number may already belong to a new connection, which must not
        be silenced.
        """
        channel.read_lock.acquire()
        if channel.closed is None and not channel.needs_loop:
            try:
                self._epoll.modify(channel.fileno, 0)
                return True
            except (OSError, ValueError):  # ValueError: this object closed, and with it the transport
                pass
        channel.read_lock.release()  # a channel left with needs_loop was already handed to the loop
        return False

    def _give_back(self, channel: Channel) -> None:
        """Let the loop read ``channel`` again, and hand it what this thread left for it.

        The socket's events are restored before the lock is released, so the channel cannot close in
        between (closing waits for the lock).
        """
        try:
            if channel.closed is None:
                with contextlib.suppress(OSError, ValueError):  # ValueError: the transport closed
                    self._epoll.modify(channel.fileno, select.EPOLLIN)
        finally:
            channel.read_lock.release()
        if channel.needs_loop and channel.closed is None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is the channel
                self._loop.call_soon_threadsafe(channel.resume)

    def close(self) -> None:
        """Stop reading (loop thread, after every channel closed)."""
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
