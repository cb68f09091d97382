"""Who reads the transport's sockets: the event loop, or a thread waiting in ``recv_sync`` (or on a send).

The loop does not watch each connection's socket itself. It watches one epoll instance (the gate)
that holds one other, which holds the sockets (:class:`Readers`), so that a thread that is about to
wait for a chunk (or for the acknowledgement of its send) can take the sockets from it without a
hop through the loop: :meth:`Readers.poll_here` takes each connection's read lock, silences all the
sockets for the loop with one ``epoll_ctl`` on the gate, polls the inner epoll without sleeping for
a short budget, handles on its own thread the messages that are safe there (inline frames, and
acknowledgements: those of frames sent on the loop are handed to it) and gives the sockets back as
soon as its chunk has arrived or the budget is spent. Every other message, a hang-up, and anything
on a socket the thread did not take (a connection closing, or one holding messages for the loop)
ends the poll there and goes to the loop, which reads on from there.

Silencing the sockets one by one took two ``epoll_ctl`` calls per connection and wait; the gate
takes two in all, however many peers there are (2 cores, two-process echo, old and new
alternating five times: int p50 94.8 → 93.9 µs, the dict 98.5 → 96.8 µs, medians).

Why: on a machine whose CPUs go idle between messages, a reply that wakes the loop thread, which
then wakes the waiting thread, is handled on cold caches twice. Read and handled by the thread that
waits for it, still running, a small-object round trip took about half as long on 2 cores and on a
32-core host (``docs/architecture.md``, "The localhost transport").

Concurrency: :meth:`Readers.watch`, :meth:`Readers.forget`, :meth:`Readers.close` and the dispatch
run on the loop thread; :meth:`Readers.poll_here` on any other thread, one thread at a time (a
second one returns at once and waits for its future as usual). A channel is read by one thread at
a time: whoever reads it holds its ``read_lock``. Reading, the loop only tries that lock (a loop
woken just before the gate closed finds the thread's channels taken and leaves them); a polling
thread taking a channel waits for a read of the loop's that is under way, and so does closing a
channel. The polling thread never changes a socket's registration, so a closed channel's number,
taken by a new connection, is never touched.
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
        # The loop watches the sockets' epoll through this one: a polling thread silences them all
        # with one call on it.
        self._gate = select.epoll()
        self._gate.register(self._epoll.fileno(), select.EPOLLIN)
        self._channels: dict[int, Channel] = {}
        self._lock = threading.Lock()  # guards _channels against the polling thread's snapshot
        self._polling = threading.Lock()  # held by the one thread in poll_here
        loop.add_reader(self._gate.fileno(), self._dispatch)

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
        connection that fails, ends or sends something only the loop handles goes back to the loop,
        and so does everything else as soon as a socket this thread does not hold has something.
        """
        if seconds <= 0 or not self._polling.acquire(blocking=False):
            return
        owned: dict[int, Channel] = {}
        silenced = False
        try:
            with self._lock:
                channels = list(self._channels.values())
            for channel in channels:
                if channel.direct and self._take(channel, seconds):
                    owned[channel.fileno] = channel
            if not owned:
                return
            self._gate.modify(self._epoll.fileno(), 0)
            silenced = True
            end = time.perf_counter() + seconds
            while not ready() and time.perf_counter() < end:
                events = self._epoll.poll(0)
                if not events:
                    os.sched_yield()  # let the loop thread, or anyone, run on this CPU
                    continue
                for fd, _ in events:
                    held = owned.get(fd)
                    if held is None:
                        return  # a socket this thread does not hold: the loop reads it, and the rest
                    try:
                        keep = held.read_here()
                    except Exception:  # a bug, or the loop closed under it: the loop takes the channel back
                        logger.exception("%s: reading on a waiting thread failed", held.name)
                        keep = False
                    if not keep:
                        return  # what it left goes to the loop (see _give_back)
        except (OSError, ValueError):  # ValueError: the transport closed its epoll under this thread
            pass
        finally:
            for channel in owned.values():
                self._give_back(channel)
            if silenced:  # after the channels: a loop woken now finds none of them still held
                with contextlib.suppress(OSError, ValueError):
                    self._gate.modify(self._epoll.fileno(), select.EPOLLIN)
            self._polling.release()

    def _take(self, channel: Channel, seconds: float) -> bool:
        """Take ``channel`` from the loop; ``False`` if it is closing, holds messages for the loop, or stays busy.

        The lock waits for a read of the loop's that is under way, for ``seconds`` at most (the loop
        thread may be stuck in a user's callback); while this thread holds it the loop, woken before
        the sockets were silenced, only tries it and leaves the channel alone.
        """
        if not channel.read_lock.acquire(timeout=seconds):
            return False
        if channel.closed is None and not channel.needs_loop:
            return True
        channel.read_lock.release()  # a channel left with needs_loop was already handed to the loop
        return False

    def _give_back(self, channel: Channel) -> None:
        """Let the loop read ``channel`` again, and hand it what this thread left for it."""
        channel.read_lock.release()
        if channel.needs_loop and channel.closed is None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is the channel
                self._loop.call_soon_threadsafe(channel.resume)

    def close(self) -> None:
        """Stop reading (loop thread, after every channel closed)."""
        self._loop.remove_reader(self._gate.fileno())
        self._gate.close()
        self._epoll.close()
