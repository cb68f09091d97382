"""Protocol messages over one connected Unix stream socket, driven by the event loop.

A :class:`Channel` reads with ``recvmsg`` (so file descriptors passed with ``SCM_RIGHTS`` are never
lost) and writes with ``sendmsg`` (scatter/gather: an envelope, a header and payload views go out in
one system call, without joining them first).

Concurrency: every method runs on the event-loop thread, except :meth:`Channel.write_threadsafe`
(any thread) and :meth:`Channel.read_here`, which a thread polling in ``recv_sync`` calls while it
holds :attr:`Channel.read_lock` (see :mod:`._readers`); the messages it handles may call
:meth:`Channel.write`, which only queues there, since the read holds writes back until it returns.
Reading and writing are callbacks of the loop's selector (no task per connection, no task per
message). While a read callback dispatches messages, writes are batched ("corked") and
flushed together when it returns, so a burst of frames is acknowledged with one system call.
``write_threadsafe`` lets a caller's thread put a small message on the socket itself, without a hop
through the loop: :attr:`Channel.lock` serialises it with the loop's writes. Under that lock a message
goes straight to the socket when nothing is queued, and what the socket does not take is queued;
otherwise the whole message is queued behind what is there. So messages never interleave and keep
the order they were written in, and the loop flushes whatever is queued.

Cancellation: nothing here awaits except :meth:`Channel.drain`; a message passed to :meth:`write` is
always written whole or not at all (if the connection breaks), never half, so a cancelled caller
cannot leave a torn message on the socket.

Closing: :meth:`close` is idempotent. It stops reading at once, optionally flushes what is queued
(bounded by a timeout), closes the socket and any received descriptors nobody took, and calls
``on_close`` exactly once with the reason.
"""

from __future__ import annotations

import array
import asyncio
import collections
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sidecar_core import FrameError
from transports.localhost._protocol import ENVELOPE, Msg, ProtocolError, envelope, parse_envelope, problem_body

if TYPE_CHECKING:
    from transports.localhost._readers import Readers

logger = logging.getLogger(__name__)

_MAX_FDS = 8
_ANC_SPACE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
_INITIAL = 1 << 18
_MIN_ROOM = 1 << 16
_FLUSH_TIMEOUT = 2.0
#: Buffers per ``sendmsg`` (the kernel takes at most ``IOV_MAX``, 1024).
_MAX_PARTS = 64
#: As a plain int: testing ``flags & socket.MSG_CTRUNC`` runs ``IntFlag`` code on every read.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
#: Descriptors passed with a message arrive close-on-exec: a child started by another thread of this
#: process meanwhile must not inherit the peer's pool.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)

#: ``on_message(kind, arg, body)``; ``body`` is a fresh ``bytearray`` the callee may keep.
OnMessage = Callable[[Msg, int, bytearray], None]
OnClose = Callable[[str], None]
Bytes = bytes | bytearray | memoryview


class Channel:
    """One connection's message I/O (see the module docstring for the rules).

    Args:
        sock: A connected ``AF_UNIX`` stream socket; the channel owns it from now on.
        loop: The event loop that drives it.
        allowed: Message types this side accepts; anything else is a protocol error.
        on_message: Called for each complete message. A :class:`FrameError` it raises is treated as
            malformed input (see ``reply_errors``).
        on_close: Called once when the channel closes, with the reason.
        reply_errors: Answer malformed input with an ``ERROR`` message before closing (the listening
            side does; the connecting side just closes).
        name: Used in log messages.
    """

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        readers: Readers,
        *,
        allowed: frozenset[Msg],
        on_message: OnMessage,
        on_close: OnClose,
        reply_errors: bool,
        name: str,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self._fileno = sock.fileno()
        self._loop = loop
        self._allowed = allowed
        self._on_message = on_message
        self._on_close = on_close
        self._reply_errors = reply_errors
        self._buf = bytearray(_INITIAL)
        self._start = 0
        self._end = 0
        self._need = 0
        self._fds: collections.deque[int] = collections.deque()
        # Descriptors come only with POOL, once per connection; a peer that passes more is malformed
        # (they would otherwise pile up here until the connection closes).
        self._fds_left = 1 if Msg.POOL in allowed else 0
        self._out: collections.deque[tuple[memoryview, Sequence[int]]] = collections.deque()
        self._writing = False
        self._corked = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        #: Guards the write queue, the socket's writes and ``closed`` against ``write_threadsafe``.
        self.lock = threading.Lock()
        self.closed: str | None = None
        self._linger: asyncio.TimerHandle | None = None
        #: Held by whichever thread reads and parses (the loop, or a polling thread: see ``._readers``).
        self.read_lock = threading.RLock()
        #: Message kinds a polling thread may handle; the owner widens it once the handshake is done.
        self.direct: frozenset[Msg] = frozenset()
        #: A polling thread stopped here and left the rest to the loop (:meth:`resume`).
        self.needs_loop = False
        self._left: tuple[FrameError, int] | str | None = None  # what it left: malformed input, or a break
        self._readers = readers
        readers.watch(self)

    @property
    def fileno(self) -> int:
        """The socket's file descriptor."""
        return self._fileno

    # -- reading ------------------------------------------------------------------------------

    def take_fd(self) -> int:
        """Pop the oldest file descriptor received and not yet taken (the caller owns it).

        Raises:
            ProtocolError: None arrived with the message that needs one.
        """
        if not self._fds:
            raise ProtocolError("a POOL message arrived without its file descriptor")
        return self._fds.popleft()

    def on_readable(self) -> None:
        """The socket is readable (loop thread): read and handle what arrived, unless a polling thread has it."""
        self.resume()

    def _read(self) -> None:
        try:
            eof, broke = self._receive()
        except FrameError as exc:
            self._malformed(exc, 0)
            return
        self._parse()
        if broke is not None:
            self.close(broke)
        elif eof and self.closed is None:
            pending = self._end - self._start
            if pending:
                self._malformed(
                    FrameError(f"truncated message: the connection closed {pending} bytes into a message"), 0
                )
            else:
                self.close("the peer closed the connection")

    def _receive(self) -> tuple[bool, str | None]:
        """Read what the socket holds now (at most 8 reads) into the buffer, keeping passed descriptors.

        Returns:
            Whether the peer closed the connection, and why it broke (``None``: it did not).

        Raises:
            FrameError: Descriptors passed with a message were truncated.
        """
        try:
            for _ in range(8):
                if len(self._buf) - self._end < max(_MIN_ROOM, self._need - (self._end - self._start)):
                    self._make_room()
                with memoryview(self._buf) as view:
                    room = len(view) - self._end
                    nbytes, ancdata, flags, _ = self.sock.recvmsg_into([view[self._end :]], _ANC_SPACE, _RECV_FLAGS)
                if ancdata:
                    self._collect_fds(ancdata)
                if flags & _MSG_CTRUNC:
                    raise FrameError("file descriptors passed with a message were truncated")
                if nbytes == 0:
                    return True, None
                self._end += nbytes
                if nbytes < room:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            return False, f"connection broke: {exc.strerror or exc}"
        return False, None

    def read_here(self) -> bool:
        """Read and handle what arrived on the calling thread, a polling thread holding :attr:`read_lock`.

        Only messages of the kinds in :attr:`direct` are handled; the first of another kind stops it.
        Returns whether the thread may go on reading this channel: ``False`` once something is left
        for the loop (a message of another kind, the end of the connection, a break, malformed
        input), which the loop handles in :meth:`resume` once the thread gave the channel back.
        """
        if self.closed is not None or self.needs_loop:
            return False
        try:
            eof, broke = self._receive()
        except FrameError as exc:
            self._leave((exc, 0))
            return False
        if not self._parse(self.direct) and not eof and broke is None:
            return True
        if self._left is None:
            self._leave(broke)
        return False

    def _leave(self, left: tuple[FrameError, int] | str | None) -> None:
        self._left = left
        self.needs_loop = True

    def resume(self) -> None:
        """Read and handle on the loop thread, starting with what a polling thread left (see :meth:`read_here`)."""
        if not self.read_lock.acquire(blocking=False):
            return  # a polling thread has it; it hands it back, with needs_loop set if it left anything
        try:
            if self.closed is not None:
                return
            left, self._left, self.needs_loop = self._left, None, False
            if isinstance(left, tuple):
                self._malformed(*left)
            elif left is not None:
                self._parse()
                self.close(left)
            else:
                self._read()  # the rest of the buffer, what came since, and the end of the connection
        finally:
            self.read_lock.release()

    def _collect_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        """Keep the descriptors passed with a message.

        Raises:
            FrameError: More descriptors arrived than this connection takes (they are closed).
        """
        arrived = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arrived.frombytes(data[: len(data) - len(data) % arrived.itemsize])
        if len(arrived) > self._fds_left:
            for fd in arrived:
                os.close(fd)
            raise FrameError(
                f"the peer passed {len(arrived)} file descriptor(s); this connection takes "
                f"{self._fds_left} more (only POOL carries one, once)"
            )
        self._fds_left -= len(arrived)
        self._fds.extend(arrived)

    def _make_room(self) -> None:
        pending = self._end - self._start
        if self._start:
            self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        want = pending + max(_MIN_ROOM, self._need - pending)
        if len(self._buf) < want:
            self._buf.extend(bytes(want - len(self._buf)))

    def _parse(self, direct: frozenset[Msg] | None = None) -> bool:
        """Handle every complete message in the buffer, or with ``direct`` (a polling thread) only those kinds.

        Returns:
            Whether it stopped early, leaving the rest for the loop (``direct`` only).
        """
        self._corked = True
        try:
            while self.closed is None and self._end - self._start >= ENVELOPE.size:
                arg = 0
                try:
                    kind, length, arg = parse_envelope(self._buf, self._start, self._allowed)
                    if direct is not None and kind not in direct:
                        return True
                    total = ENVELOPE.size + length
                    if self._end - self._start < total:
                        self._need = total
                        break
                    self._need = 0
                    body = self._buf[self._start + ENVELOPE.size : self._start + total]
                    self._start += total
                    self._on_message(kind, arg, body)
                except FrameError as exc:
                    return self._reject(exc, arg, direct)
                except Exception as exc:  # a bug here must cost this connection only, not the loop
                    logger.exception("%s: handling a message failed", self.name)
                    return self._reject(FrameError(f"internal error while handling the message: {exc!r}"), arg, direct)
            if self._start == self._end:
                self._start = self._end = 0
        finally:
            self._corked = False
            # Nothing queued means nothing to flush: a write from another thread that finds the
            # queue empty sends itself.
            if self._out and (self.closed is None or self._linger is not None):
                if direct is None:
                    self._flush()
                else:
                    self._flush_here()
        return False

    def _reject(self, exc: FrameError, arg: int, direct: frozenset[Msg] | None) -> bool:
        """Malformed input: answer and close on the loop, or leave that to the loop from a polling thread."""
        if direct is None:
            self._malformed(exc, arg)
        else:
            self._leave((exc, arg))
        return True

    def _malformed(self, exc: FrameError, arg: int) -> None:
        logger.warning("%s: rejecting malformed input and closing the connection: %s", self.name, exc)
        if self._reply_errors and self.closed is None:
            body = problem_body(exc)
            self.write(envelope(Msg.ERROR, len(body), arg), body)
        self.close(f"malformed input: {exc}", flush=self._reply_errors)

    # -- writing ------------------------------------------------------------------------------

    def write(self, *parts: Bytes, fds: Sequence[int] = ()) -> None:
        """Queue one message (its parts back to back) and send what the socket takes now.

        Args:
            parts: The message's bytes; views are not copied, so keep them unchanged until flushed.
            fds: File descriptors to pass with the message's first byte (they stay open here).

        Raises:
            BrokenPipeError: The channel is closed (the message names why).
            TypeError, BufferError: A part is not one block of bytes; nothing of the message was sent.
        """
        with self.lock:
            if fds or self._corked or self._writing or self._out:
                self._queue(parts, fds)
                if self._corked or self._writing:
                    return
                broke = self._send_queued()
            else:
                broke = self._send_now(parts)
        self._after_flush(broke)

    def write_threadsafe(self, *parts: Bytes) -> None:
        """:meth:`write` for any thread: send the message now, from the calling thread if possible.

        If the socket does not take all of it at once (or the loop already has bytes queued, which
        must go first), the rest is queued and the loop flushes it; a broken connection is closed
        by the loop. Either way the message is never torn.

        Raises:
            BrokenPipeError: The channel is closed (the message names why).
            TypeError, BufferError: A part is not one block of bytes; nothing of the message was sent.
        """
        with self.lock:
            if self._out:  # the loop flushes what is queued: it is corked, writing, or told to by a writer
                self._queue(parts, ())
                return
            broke = self._send_now(parts)
            if broke is None and not self._out and not self._drain_waiters:
                return
        # The rest goes to the loop, which also wakes drain(): it may have seen an earlier message queued.
        self._loop.call_soon_threadsafe(self._after_flush, broke)

    def _flush_here(self) -> None:
        """:meth:`_flush` on a thread other than the loop's: what the socket does not take goes to the loop."""
        with self.lock:
            broke = self._send_queued()
            if broke is None and not self._out and not self._drain_waiters:
                return
        # The rest goes to the loop, which also wakes drain(): it may have seen this message queued.
        self._loop.call_soon_threadsafe(self._after_flush, broke)

    def _send_now(self, parts: Sequence[Bytes]) -> str | None:
        """Send one message straight to the socket, with the lock held and nothing queued.

        Cheaper than queueing first (the common case: the socket takes it all). What the socket
        does not take is queued, for the caller to hand to the loop.

        Returns:
            Why the connection broke (nothing is queued then), or ``None``.

        Raises:
            BrokenPipeError: The channel is closed (the message names why).
            BufferError: A part is not one block of bytes (nothing was sent).
        """
        if self.closed is not None:
            raise BrokenPipeError(f"connection {self.name} is closed: {self.closed}")
        if len(parts) > _MAX_PARTS:
            self._queue(parts, ())
            return self._send_queued()
        try:
            sent = self.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            return f"connection broke: {exc.strerror or exc}"
        for index, part in enumerate(parts):
            nbytes = memoryview(part).nbytes
            if sent < nbytes:  # the socket is full: queue the rest of the message
                self._queue(parts[index:], (), sent=sent)
                break
            sent -= nbytes
        return None

    def _queue(self, parts: Sequence[Bytes], fds: Sequence[int], *, sent: int = 0) -> None:
        """Queue a message whole (nothing if a part is not a plain buffer), its descriptors with its first byte.

        Args:
            parts: The message's parts.
            fds: Descriptors to pass with the message.
            sent: Bytes at the start of ``parts`` that the socket already took (then ``fds`` is empty).

        Raises:
            BrokenPipeError: The channel is closed (the message names why).
            TypeError: A part cannot be read as bytes (not C-contiguous).
        """
        if self.closed is not None:
            raise BrokenPipeError(f"connection {self.name} is closed: {self.closed}")
        views = [view.cast("B") for part in parts if (view := memoryview(part)).nbytes]
        if sent:
            views[0] = views[0][sent:]
        out = self._out
        for view in views:
            out.append((view, fds))
            fds = ()

    def copy_queued(self) -> None:
        """Copy the queued bytes that the socket has not taken yet, so that none is read from a sender's memory.

        For a send given up (timed out or cancelled) while part of it still waits here: it is still
        written whole, so that the stream stays intact, but its caller may reuse the memory now.
        Any thread.
        """
        with self.lock:
            out = self._out
            for index in range(len(out)):
                view, fds = out[index]
                if not isinstance(view.obj, bytes):
                    out[index] = (memoryview(view.tobytes()), fds)

    def _flush(self) -> None:
        with self.lock:
            broke = self._send_queued()
        self._after_flush(broke)

    def _send_queued(self) -> str | None:
        """Send what the socket takes now (with the lock held); the reason if the connection broke."""
        out = self._out
        while out:
            first, fds = out[0]
            views = [first]
            # Descriptors go with the first byte of their message: a view that has some starts a new sendmsg.
            for view, view_fds in itertools.islice(out, 1, _MAX_PARTS):
                if view_fds:
                    break
                views.append(view)
            try:
                if fds:
                    sent = self.sock.sendmsg(views, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    sent = self.sock.sendmsg(views)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                out.clear()
                return f"connection broke: {exc.strerror or exc}"
            while sent:
                view = out[0][0]
                if view.nbytes <= sent:
                    sent -= view.nbytes
                    out.popleft()
                else:
                    out[0] = (view[sent:], ())
                    sent = 0
        return None

    def _after_flush(self, broke: str | None) -> None:
        """On the loop, after a flush: close a broken connection, else watch for writability or finish."""
        if broke is not None:
            self.close(broke)
            return
        if self.closed is not None and self._linger is None:
            return  # already closed and finished: nothing is queued any more
        with self.lock:
            if self._out:
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self._fileno, self._flush)
                return
        self._stop_writing()
        if self._linger is not None:
            self._finish()

    async def drain(self) -> None:
        """Wait until everything queued has been handed to the kernel (or the channel closed)."""
        with self.lock:  # a thread emptying the queue in _flush_here then sees this waiter
            if not self._out or (self.closed is not None and self._linger is None):
                return
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
        await waiter

    # -- closing ------------------------------------------------------------------------------

    def close(self, reason: str, *, flush: bool = False) -> None:
        """Close the connection; ``on_close(reason)`` runs once, at once.

        Args:
            reason: Why, for the owner's errors and logs.
            flush: Send what is queued first (for at most a couple of seconds).
        """
        with self.lock:
            if self.closed is not None:
                return
            self.closed = reason  # from now on, writes from any thread raise BrokenPipeError
        self._readers.forget(self)
        if flush and self._out:
            self._linger = self._loop.call_later(_FLUSH_TIMEOUT, self._finish)
        else:
            self._finish()
        try:
            self._on_close(reason)
        except Exception:
            logger.exception("%s: close callback failed", self.name)

    def _stop_writing(self) -> None:
        """Stop watching for writability and wake everyone waiting in :meth:`drain`."""
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fileno)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def _finish(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._stop_writing()
        with self.read_lock, self.lock:  # no other thread reads this socket or is inside sendmsg on it
            self._out.clear()
            self.sock.close()
            while self._fds:  # under the read lock: a polling thread's read may have just added some
                os.close(self._fds.popleft())
