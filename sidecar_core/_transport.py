"""The transport interface: the one thing a transport plugin implements.

A transport moves :class:`~sidecar_core.Frame` objects between sidecar ranks. It knows nothing about
serializers, chunks, streams or ``mark_done``: the core does all of that.

Concurrency: every method is called on the sidecar's own event-loop thread (one per ``Sidecar``),
except the optional fast paths :meth:`Transport.send_nowait`, which is called on the thread that
calls ``Sidecar.send``, and :meth:`Transport.poll_while_waiting`, called on a thread waiting in
``Sidecar.recv_sync`` or on a send's result (any threads but the loop's). A transport calls its
:class:`Inbox` from the loop thread, or from a thread inside ``poll_while_waiting``; the core runs
every frame's ``release`` on the loop thread. ``send`` (and ``send_nowait``) may be called
concurrently for different destinations and for different frames to the same destination; frames
of one message to one destination are sent one after another (a message of several frames never
takes the fast path).

Cancellation: ``send`` is cancelled (by ``asyncio.wait_for``) when the send timeout expires. A
cancelled ``send`` must leave the transport usable, for example by dropping the peer's connection
so that the next ``send`` makes a new one.

Closing: ``close`` is called once, after which no method is called again. It must release sockets,
listeners, shared memory and background tasks, and must not raise.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

from sidecar_core._errors import PeerLostError
from sidecar_core._frame import Frame, Header

if TYPE_CHECKING:
    import torch

    from sidecar_core._codec import Codec
    from sidecar_core._settings import SidecarSettings

#: A transport's connection object (compared by identity).
C = TypeVar("C")


def settle(future: asyncio.Future[None], error: Exception | None) -> None:
    """Resolve ``future`` with an outcome (``None``: success), unless its waiter already gave up.

    A helper for transports, whose sends often learn their outcome in a callback (an
    acknowledgement, a completed request) after the waiting coroutine may have been cancelled.
    """
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class PartRoutes:
    """Keeps every part of a message to one destination on the connection its first part took.

    For transports that reconnect on their own. A message in parts split over two connections can be
    lost although every part was acknowledged: once the receiver hears that the first connection
    broke, it drops the unfinished messages that came over it, and the parts that then come over the
    new connection can never complete the message. With this, a later part whose first part went over
    another connection fails with :class:`PeerLostError` instead, and the sender sends the message
    again. Loop thread only; the core sends a message's parts in order, one after another.
    """

    def __init__(self) -> None:
        self._first: dict[tuple[int, int], object] = {}

    @contextlib.asynccontextmanager
    async def route(self, dst: int, header: Header, connect: Callable[[], Awaitable[C]]) -> AsyncIterator[C]:
        """Get the connection to ``dst`` with ``connect()`` and send one frame of a message over it inside this block.

        A message's route is forgotten after its last part, or once one of its parts fails (getting
        the connection included).

        Raises:
            PeerLostError: ``header`` is a later part of a message whose first part went over
                another connection (the receiver has dropped, or will drop, the parts before it).
            Exception: What ``connect()`` or the block raised.
        """
        key = (dst, header.message)
        try:
            connection = await connect()
            if header.num_parts > 1 and header.part == 0:
                self._first[key] = connection
            elif header.num_parts > 1 and self._first.get(key) is not connection:
                raise PeerLostError(
                    f"the connection to rank {dst} broke between the parts of {header.describe()} (before part "
                    f"{header.part} of {header.num_parts}); the receiver drops the parts that came over it: send "
                    "the message again"
                )
            yield connection
        except BaseException:
            self._first.pop(key, None)
            raise
        if header.part == header.num_parts - 1:
            self._first.pop(key, None)


class ArrivingParts:
    """The messages in parts coming over one connection in (receiving side; loop thread only).

    What :meth:`Inbox.parts_lost` needs when the connection breaks while its peer is connected over
    another one. A part the inbox refuses fails its message's send, so the parts of that message
    that came before it are dropped at once rather than left counted until someone ``mark_done``s it.
    """

    def __init__(self) -> None:
        #: ``header.message`` of each message in parts with a part here and its last part not yet taken.
        self.messages: set[int] = set()

    def arrived(self, header: Header) -> None:
        """A frame's header came over the connection (its payload may still be arriving)."""
        if header.num_parts > 1:
            self.messages.add(header.message)

    def taken(self, header: Header, inbox: Inbox, *, refused: bool) -> None:
        """The frame was delivered (``refused``: or refused, by the inbox or the transport)."""
        if header.num_parts == 1:
            return
        if refused:
            self.messages.discard(header.message)
            inbox.parts_lost(header.src, (header.message,))
        elif header.part == header.num_parts - 1:
            self.messages.discard(header.message)


class Inbox(Protocol):
    """Where a transport hands what arrives: implemented by the core's receive store."""

    #: Bytes of the chunks held until ``mark_done`` (read it on the loop thread). A transport that
    #: allocates a frame's memory before delivering it can count both against
    #: ``SIDECAR_MAX_BUFFERED_BYTES``, as the store counts what it holds.
    buffered_bytes: int

    def deliver(self, frame: Frame, release: Callable[[], None] | None = None) -> None:
        """Store an arrived frame.

        Args:
            frame: The frame; its buffers may be views into transport-owned memory.
            release: Called exactly once, on the event-loop thread, when the core no longer needs
                the buffers (after ``mark_done``, after copying a part, or when the frame is rejected).

        Raises:
            FrameError: The frame is malformed, or its serializer failed to decode it; report it to
                the sender, keep serving.
            DuplicateChunkError: The chunk is already held or was marked done.
            CapacityError: Storing it would exceed ``SIDECAR_MAX_BUFFERED_BYTES``.
            SidecarClosedError: This sidecar is shutting down.
        """

    def part_landing(self, header: Header, *, arriving: int = 0) -> torch.Tensor | None:
        """Memory inside its message for a part of a message in parts to be received into.

        Any thread. For a part (``header.num_parts > 1``) whose payload has not been received yet,
        the core checks it as :meth:`deliver` would (duplicates, the id's end, agreement with the
        parts before it, overlap), sets the whole message's memory aside at its first part
        (counted against ``SIDECAR_MAX_BUFFERED_BYTES`` together with ``arriving``), and returns the
        part's place in it: a flat uint8 tensor of ``header.frame_bytes`` bytes on the receiving
        device. Receive the part's buffers into it, back to back in ``header.sizes`` order, and
        :meth:`deliver` the frame with those views as its buffers: the core then takes the part
        without a copy, and the part needs no memory of its own. If its bytes never come, the
        connection is broken: report it with :meth:`peer_lost`. Returns ``None`` for any other
        frame: allocate its memory yourself.

        Args:
            header: The validated header of a frame whose payload has not arrived yet.
            arriving: Bytes the transport holds for other frames still arriving, counted with the
                core's own when the message's memory is set aside.

        Raises:
            FrameError, DuplicateChunkError, CapacityError, SidecarClosedError: As :meth:`deliver`;
                refuse the frame (drain its payload) and keep serving.
        """

    def peer_lost(self, rank: int, reason: str) -> None:
        """Tell the core that the connection from ``rank`` broke; waiting receives fail fast.

        The core drops every unfinished message in parts from ``rank``. Where ``rank`` is still
        connected over a newer connection, call :meth:`parts_lost` instead.
        """

    def parts_lost(self, rank: int, messages: Collection[int]) -> None:
        """Tell the core that the messages in parts ``messages`` (``header.message``) from ``rank`` will not complete.

        For a connection that broke while ``rank`` is still connected over a newer one (its receives
        go on): only the messages whose parts came over the broken connection are dropped, with the
        memory set aside for parts still landing there. Their sender's sends have failed (see
        :class:`PartRoutes`).
        """


@dataclass(frozen=True, slots=True)
class TransportContext:
    """What the core gives a transport when it creates it."""

    rank: int
    settings: SidecarSettings
    inbox: Inbox
    codec: Codec
    loop: asyncio.AbstractEventLoop


class Transport(abc.ABC):
    """Moves frames between ranks. Subclass it and register the class with a plugin hook."""

    #: The name users select with ``SIDECAR_TRANSPORT``.
    name: ClassVar[str]
    #: Largest frame payload this transport moves in one piece (``None``: no limit). The core
    #: splits larger messages into parts of at most this size (or ``SIDECAR_CHUNK_SIZE``).
    max_part_bytes: int | None = None
    #: A peerless transport (``mock-file``) has no peers: data is "sent" to storage and any process
    #: can read it back. The conformance suite skips the tests that need a live peer for it.
    peerless: ClassVar[bool] = False

    @classmethod
    def test_environment(cls, workdir: Path) -> dict[str, str]:
        """Environment variables that give tests a private deployment of this transport.

        The conformance suite applies them to every process of one test (free ports, a socket
        directory inside ``workdir``, ...), so that parallel test runs never meet.

        Args:
            workdir: An empty directory that lives as long as the test.
        """
        return {}

    def __init__(self, ctx: TransportContext) -> None:
        """Create the transport; do no I/O here (``start`` does).

        Raises:
            SettingsError: The transport's own settings are invalid.
        """
        self.ctx = ctx

    @abc.abstractmethod
    async def start(self) -> None:
        """Start listening so that peers can reach this rank.

        Raises:
            PeerUnreachableError: The listening address is taken or cannot be bound.
        """

    @abc.abstractmethod
    async def send(self, dst: int, frame: Frame) -> None:
        """Deliver ``frame`` to rank ``dst``; return once ``dst``'s inbox accepted it.

        Raises:
            PeerUnreachableError: ``dst`` cannot be connected to.
            PeerLostError: The connection broke before ``dst`` acknowledged.
            RemoteError: ``dst`` rejected the frame (its reason is in the message).
            AuthenticationError: ``dst`` refused this sidecar's auth token.
        """

    def send_nowait(self, dst: int, frame: Frame, done: Callable[[Exception | None], None]) -> bool:
        """Optional fast path: start sending a one-frame message from the caller's thread.

        The core tries it, from whatever thread calls ``Sidecar.send``, for a message of one frame to
        one destination, to spare the hop to the event loop; it awaits :meth:`send` on the loop when
        this returns ``False``. The default always returns ``False``, so a transport that does not
        override it is only ever called on the loop thread.

        An override must be thread-safe against everything the loop thread does and must not block.
        It returns ``False`` when it cannot take the fast path (no connection yet, a large or CUDA
        frame, ...), having changed nothing; or ``True`` once the frame is on its way, and then calls
        ``done`` exactly once with the outcome: ``None`` when ``dst``'s inbox accepted the frame, else
        the error ``send`` would raise. It may call ``done`` from any thread, typically the loop thread
        when the acknowledgement arrives; ``done`` is quick and never raises. The core enforces
        ``SIDECAR_SEND_TIMEOUT`` itself and ignores an outcome that comes after it gave up.

        Args:
            dst: The destination rank.
            frame: The frame; its buffers must not be modified until ``done`` is called.
            done: Receives the outcome.

        Returns:
            Whether the frame was taken (``done`` will be called).
        """
        return False

    def abandon(self, dst: int, frame: Frame) -> None:  # noqa: B027 - optional hook
        """Optional: the core gave up on a frame that :meth:`send_nowait` took; stop reading its buffers.

        Called on the loop thread, once per frame, when ``SIDECAR_SEND_TIMEOUT`` passed without an
        outcome, before the caller learns of the timeout: the caller may then reuse the frame's
        memory. After it returns, the transport must not read the frame's buffers again. It may
        still deliver what it already took from them (bytes it copied), drop the frame, or close the
        connection (as a cancelled :meth:`send` may); an outcome it reports for the frame afterwards
        is ignored. Must not raise. The default does nothing, which is right for a transport whose
        ``send_nowait`` is done with the buffers when it returns.

        Args:
            dst: The destination rank the frame was sent to.
            frame: The frame, as passed to :meth:`send_nowait`.
        """

    def after_fork(self) -> None:  # noqa: B027 - optional hook
        """Optional: this process is a forked child, and this transport is its parent's.

        Called on the child's only thread, right after the fork. Close this process's copies of
        the connections, listeners and lock files, and do nothing else: send nothing, remove no
        file, touch no shared memory; the parent goes on using them. A live child that kept its
        copies would keep the parent's connections open after the parent has gone, so that its
        peers would not see it leave, and its rank could not be served again. Must not block or
        raise. The default does nothing.
        """

    def poll_while_waiting(self, ready: Callable[[], bool]) -> None:  # noqa: B027 - optional hook
        """Optional: a thread is about to wait for a chunk or an acknowledgement; read on that thread a while.

        The core calls it from a thread about to sleep until something arrives (any thread but the
        loop's): one in ``Sidecar.recv_sync`` whose chunk has not arrived, or one in ``result()`` of a
        send that took :meth:`send_nowait` and is not acknowledged yet. A transport may read and handle
        arriving messages on this thread, delivering to the :class:`Inbox` from here, until
        ``ready()`` is true or a short budget of its own is spent: a reply that comes soon then
        reaches the store without waking the loop thread, and the waiting thread has not slept.
        Returning at once is always correct (the default does): the caller then waits as usual.
        Several threads may call it at once. Must not block beyond its budget, must not raise.

        Args:
            ready: Whether what the caller waits for has arrived (cheap; any thread).
        """

    async def want(self, id: str, chunk_id: int, timeout: float) -> None:  # noqa: B027 - optional hook
        """A ``recv`` waits up to ``timeout`` seconds for ``(id, chunk_id)``; pull-based transports fetch it here.

        A pull-based transport delivers the chunk to its :class:`Inbox` and returns, or looks for it
        for up to ``timeout`` seconds and then returns without it; what it raises fails the receive.
        Push-based transports (the default) ignore this.

        Raises:
            LookupError: The transport can never provide this key (the message says why).
            FrameError: What it found cannot be delivered.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource. Must not raise."""

    def describe_peer(self, rank: int) -> str:
        """Where ``rank`` is reached, for error messages (e.g. ``rank 1 at 10.0.0.2:19001``)."""
        return f"rank {rank}"
