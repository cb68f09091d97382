"""The connection from this sidecar to one peer rank: frames out, acknowledgements back.

One :class:`Link` per destination rank, opened on the first send and reused until it breaks.

Acknowledgements: every frame carries a sequence number; the peer answers ``ACK`` once its inbox
accepted the frame, or ``NACK`` with the inbox's reason (raised here as :class:`RemoteError`). Any
number of frames may be in flight on one link.

Shared memory: a frame sent through the pool keeps its slot leased until the peer says ``RELEASE``
(after the receiver's ``mark_done``) or the link closes (the peer died or shut down, so it reads
the slot no more).

Concurrency: event-loop thread only, except :meth:`Link.post_threadsafe` (any thread): it writes
a frame from the caller's thread (see :meth:`Channel.write_threadsafe`), and the acknowledgement
goes to the caller's callback. ``ACK`` and ``NACK`` may be read by a thread waiting in ``recv_sync``
(see :mod:`._readers`); that thread calls such a callback itself, and hands the outcome of a frame
posted on the loop (an asyncio future) to the loop. ``_lock`` guards the sequence numbers, the table of
frames awaiting acknowledgement and the table of what they hold, which both kinds of post share.
Cancellation: a cancelled ``send`` only stops waiting for its acknowledgement; the frame is still
written whole, so the link stays usable. Closing: when the
connection breaks, every unacknowledged send fails with :class:`PeerLostError` and the link is
dropped, so the next send connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from sidecar_core import AuthenticationError, PeerLostError, PeerUnreachableError, RemoteError, settle
from transports.localhost._channel import Bytes, Channel
from transports.localhost._protocol import (
    RECEIVER_MESSAGES,
    U64,
    VERSION,
    Hello,
    Msg,
    Problem,
    ProtocolError,
    Welcome,
    envelope,
    parse_json,
    peer_credentials,
    problem_body,
)
from transports.localhost._readers import Readers

_RETRY_FIRST = 0.005
_RETRY_MAX = 0.1

#: What a frame's outcome goes to, on the loop thread: ``None`` once acknowledged, else the error.
Done = Callable[[Exception | None], None]


class Holder(Protocol):
    """Something a frame keeps until the peer releases it (a pool slot, a CUDA tensor)."""

    def release(self) -> None:
        """Let it go."""


class Link:
    """An open, handshaken connection to ``rank`` (build it with :meth:`connect`)."""

    def __init__(
        self,
        sock: socket.socket,
        rank: int,
        path: Path,
        loop: asyncio.AbstractEventLoop,
        readers: Readers,
        on_closed: Callable[[Link], None],
    ) -> None:
        self.rank = rank
        self.path = path
        self.describe = f"rank {rank} at {path}"
        self._loop = loop
        self._on_closed = on_closed
        self._lock = threading.Lock()
        self._loop_thread = threading.get_ident()  # links are made on the loop
        self._seq = 0
        #: Per unacknowledged frame: what takes its outcome, the frame in words, and whether that
        #: may be called on any thread (else only on the loop's).
        self._pending: dict[int, tuple[Done, str, bool]] = {}
        self._holds: dict[int, Holder] = {}
        self._welcome: asyncio.Future[Welcome] = loop.create_future()
        self.welcome: Welcome | None = None
        self.pool_shared = False
        self.channel = Channel(
            sock,
            loop,
            readers,
            allowed=RECEIVER_MESSAGES,
            on_message=self._on_message,
            on_close=self._on_close,
            reply_errors=False,
            name=f"link to {self.describe}",
        )
        # A thread polling in recv_sync may take acknowledgements; WELCOME and the rest stay on the loop.
        self.channel.direct = frozenset({Msg.ACK, Msg.NACK})

    @classmethod
    async def connect(
        cls,
        rank: int,
        path: Path,
        hello: Hello,
        timeout: float,
        readers: Readers,
        on_closed: Callable[[Link], None],
    ) -> Link:
        """Connect to ``rank``'s socket and shake hands, retrying until ``timeout`` while nothing listens.

        Raises:
            PeerUnreachableError: Nothing listened at ``path`` within ``timeout``, or no handshake answer.
            AuthenticationError: The peer refused this sidecar's auth token, or the socket is served by
                another user's process (nothing is sent to it then).
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        pause = _RETRY_FIRST
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                sock.connect(os.fspath(path))
                break
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as exc:
                sock.close()
                why = {
                    FileNotFoundError: "no socket file there",
                    ConnectionRefusedError: "nothing listens on the socket (its owner is gone)",
                }.get(type(exc), "the peer's listen queue is full")
            except BaseException:
                sock.close()
                raise
            if time.monotonic() + pause > deadline:
                raise PeerUnreachableError(
                    f"rank {rank} is not reachable at {path}: {why} (gave up after {timeout:g}s, "
                    f"SIDECAR_CONNECT_TIMEOUT). Check that a sidecar with SIDECAR_RANK={rank} is running on this host "
                    "with the same SIDECAR_LOCALHOST__SOCKET_DIR"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX)
        _, owner = peer_credentials(sock)
        if owner != os.getuid():
            sock.close()
            raise AuthenticationError(
                f"rank {rank} at {path} is served by a process of uid {owner}, not of this user (uid {os.getuid()}); "
                "another user may be intercepting sidecar sockets, so nothing was sent to it"
            )
        try:
            link = cls(sock, rank, path, loop, readers, on_closed)
        except BaseException:  # the readers closed meanwhile (a shutdown)
            sock.close()
            raise
        try:
            body = hello.model_dump_json().encode()
            link.channel.write(envelope(Msg.HELLO, len(body)), body)
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                link.welcome = await asyncio.wait_for(link._welcome, remaining)
            except TimeoutError:
                raise PeerUnreachableError(
                    f"{link.describe} accepted the connection but did not answer the handshake within {timeout:g}s "
                    "(SIDECAR_CONNECT_TIMEOUT); is it a sidecar of the same version?"
                ) from None
        except BaseException:
            link.channel.close("handshake failed")
            raise
        if link.welcome.rank != rank:
            link.channel.close("wrong rank")
            raise PeerUnreachableError(
                f"the socket {path} belongs to rank {link.welcome.rank}, not rank {rank}; check the peers' SIDECAR_RANK"
            )
        return link

    # -- sending ------------------------------------------------------------------------------

    def post(
        self, kind: Msg, parts: Sequence[Bytes], what: str, hold: Holder | None = None
    ) -> tuple[int, asyncio.Future[None]]:
        """Write a frame message and return its sequence number and acknowledgement future.

        Args:
            kind: ``FRAME``, ``SHM_FRAME`` or ``IPC_FRAME``.
            parts: The body, in pieces (written back to back, not joined).
            what: The frame in words, for errors.
            hold: Kept until the peer releases the frame (or the link closes), then released.

        Raises:
            PeerLostError: The link is already closed.
        """
        if self.channel.closed is not None:
            raise PeerLostError(f"the connection to {self.describe} is closed: {self.channel.closed}")
        future: asyncio.Future[None] = self._loop.create_future()
        seq = self._register(functools.partial(settle, future), what, hold, anywhere=False)
        length = sum(memoryview(p).nbytes for p in parts)
        self.channel.write(envelope(kind, length, seq), *parts)
        return seq, future

    def post_threadsafe(
        self, kind: Msg, parts: Sequence[Bytes], what: str, done: Done, hold: Holder | None = None
    ) -> None:
        """Write a frame message from any thread; ``done`` gets the outcome.

        ``done`` is called once: with ``None`` once the peer acknowledged the frame, or with
        :class:`RemoteError` if it refused it (on the loop thread, or on a thread waiting in
        ``recv_sync`` that read the answer), or with :class:`PeerLostError` if the connection broke
        first (on the loop thread, or on this one if it is already closed).

        Args:
            kind: ``FRAME`` (buffers inline) or ``SHM_FRAME`` (a slot of this sidecar's pool, which
                the peer must already have, see :meth:`share_pool`).
            parts: The message body, in pieces (written back to back, not joined).
            what: The frame in words, for errors.
            done: Receives the outcome.
            hold: Kept until the peer releases the frame (or the link closes), then released on
                the loop thread.
        """
        seq = self._register(done, what, hold, anywhere=True)
        length = sum(memoryview(p).nbytes for p in parts)
        try:
            self.channel.write_threadsafe(envelope(kind, length, seq), *parts)
        except BrokenPipeError:
            if self._take(seq) is not None:  # else the closing loop already reported it
                done(PeerLostError(f"the connection to {self.describe} is closed: {self.channel.closed}"))
            with self._lock:
                kept = self._holds.pop(seq, None)
            if kept is not None:  # else the closing loop released it
                with contextlib.suppress(RuntimeError):  # the loop is closed, and the pool with it
                    self._loop.call_soon_threadsafe(kept.release)

    def _register(self, done: Done, what: str, hold: Holder | None, *, anywhere: bool) -> int:
        with self._lock:
            self._seq += 1
            self._pending[self._seq] = (done, what, anywhere)
            if hold is not None:
                self._holds[self._seq] = hold
            return self._seq

    def _take(self, seq: int) -> tuple[Done, str, bool] | None:
        with self._lock:
            return self._pending.pop(seq, None)

    def _report(self, entry: tuple[Done, str, bool], outcome: Exception | None) -> None:
        """Hand a frame's outcome to its taker: here, or on the loop if it may only run there."""
        done, _, anywhere = entry
        if anywhere or threading.get_ident() == self._loop_thread:
            done(outcome)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits the future any more
                self._loop.call_soon_threadsafe(done, outcome)

    def ready(self, seq: int, nbytes: int) -> None:
        """Tell the peer that the first ``nbytes`` of a staged frame's slot hold their data."""
        if self.channel.closed is None:
            self.channel.write(envelope(Msg.READY, U64.size, seq), U64.pack(nbytes))

    def abort(self, seq: int, error: BaseException) -> None:
        """Tell the peer to drop a staged frame whose data will not come."""
        if self.channel.closed is None:
            body = problem_body(error)
            self.channel.write(envelope(Msg.ABORT, len(body), seq), body)

    def share_pool(self, fd: int, size: int) -> None:
        """Pass this sidecar's pool to the peer (once per link)."""
        if not self.pool_shared:
            self.channel.write(envelope(Msg.POOL, U64.size), U64.pack(size), fds=[fd])
            self.pool_shared = True

    def forget(self, seq: int) -> None:
        """Stop waiting for ``seq``'s acknowledgement (its send was cancelled)."""
        self._take(seq)

    @property
    def held(self) -> int:
        """How many frames the peer still reads from this sidecar's memory."""
        return len(self._holds)

    # -- receiving ----------------------------------------------------------------------------

    def _on_message(self, kind: Msg, arg: int, body: bytearray) -> None:
        if kind is Msg.ACK:
            entry = self._take(arg)
            if entry is not None:
                self._report(entry, None)
        elif kind is Msg.RELEASE:
            with self._lock:
                hold = self._holds.pop(arg, None)
            if hold is not None:
                hold.release()
        elif kind in (Msg.NACK, Msg.ERROR):
            problem = parse_json(Problem, body, "error report")
            entry = self._take(arg)
            if entry is not None:
                verb = "rejected" if kind is Msg.NACK else "found malformed"
                error = RemoteError(f"{self.describe} {verb} {entry[1]}: {problem.error}: {problem.message}")
                self._report(entry, error)
        elif kind is Msg.WELCOME:
            welcome = parse_json(Welcome, body, "handshake answer")
            if welcome.version != VERSION:
                raise ProtocolError(
                    f"{self.describe} speaks protocol version {welcome.version}, this sidecar {VERSION}"
                )
            if not self._welcome.done():
                self._welcome.set_result(welcome)
        elif kind is Msg.REFUSED:
            problem = parse_json(Problem, body, "refusal")
            error_type = AuthenticationError if problem.error == AuthenticationError.__name__ else PeerUnreachableError
            if not self._welcome.done():
                self._welcome.set_exception(error_type(f"{self.describe} refused this sidecar: {problem.message}"))

    def _on_close(self, reason: str) -> None:
        if not self._welcome.done():
            self._welcome.set_exception(
                PeerUnreachableError(f"{self.describe} closed the connection during the handshake: {reason}")
            )
        with self._lock:  # a post_threadsafe after this finds the channel closed and cleans up itself
            pending, self._pending = self._pending, {}
            holds, self._holds = self._holds, {}
        for done, what, _ in pending.values():
            done(PeerLostError(f"{self.describe} was lost before it acknowledged {what}: {reason}"))
        for hold in holds.values():
            hold.release()
        self._on_closed(self)

    async def close(self) -> None:
        """Flush what is queued, then close (pending sends fail with :class:`PeerLostError`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.channel.drain(), 2.0)
        self.channel.close("this sidecar is shutting down")
