"""A connection a peer opened to this sidecar: handshake, then frames in and acknowledgements out.

After the handshake, header messages are read one after another, each receive posted from the
completion callback of the one before (no task per message). For each, the connection
validates the header, allocates the frame's memory (CPU, or the GPU named by
``SIDECAR_RECV_DEVICE`` for CUDA frames), posts the payload receives straight into it, and posts the
next header receive, all in the same callback (so payload receives keep header order). A part of a
message in parts lands instead in the memory the inbox sets aside for the whole message
(:meth:`sidecar_core.Inbox.part_landing`), on the inbox's device whatever the sender's (with a
CUDA receive device, UCX copies host parts straight to the GPU). The last payload receive to
complete hands the frame to the inbox and sends the acknowledgement (or the inbox's refusal, which
the sender raises as ``RemoteError``). Only CUDA memory whose device still has work queued waits
for it in a task first. A small host payload that rode inline in its header message is copied out
of the reused header buffer and delivered at once. A frame refused before its memory is given (too
large, or a part the inbox refuses) has its payload drained without being stored. Host buffers of
1 MiB and more for frames that are not parts come from :class:`~transports.ucx._pool.HostPool` and
go back to it when the inbox releases them.

Concurrency: loop thread only. Cancellation: :meth:`Inbound.close` closes the endpoint (which ends
the header and payload receives) and cancels the tasks; frames not yet delivered are dropped
(their senders see the connection close).
Closing: when a connection breaks after the handshake, what was arriving over it is dropped, and its
peer is reported lost (``inbox.peer_lost(rank, reason)``) unless the same process connects again
within :data:`RECONNECT_GRACE` (a sender connects again at once when it gives a connection up on
purpose: a send over it timed out or was cancelled). ``close`` (this sidecar shutting down) reports
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from sidecar_core import (
    ArrivingParts,
    Buffer,
    CapacityError,
    Frame,
    FrameError,
    Header,
    Inbox,
    SidecarError,
    check_sender,
)
from transports.ucx import _wire as wire
from transports.ucx._endpoint import Endpoint, describe_error
from transports.ucx._link import cuda_idle, wait_cuda_idle
from transports.ucx._pool import HostPool

logger = logging.getLogger(__name__)


_Whole = TypeVar("_Whole", memoryview, torch.Tensor)

#: Seconds a peer whose connection broke has to connect again, as the same process, before it is
#: reported lost. A sender that gives a connection up on purpose connects again at once; a restarted
#: peer is another process (another incarnation, see :class:`~transports.ucx._wire.Hello`).
RECONNECT_GRACE = 1.0


def _after_all(count: int, then: Callable[[list[Exception | None]], None]) -> Callable[[Exception | None], None]:
    """A completion callback for ``count`` receives: ``then`` gets their outcomes once all completed."""
    outcomes: list[Exception | None] = []

    def completed(error: Exception | None) -> None:
        outcomes.append(error)
        if len(outcomes) == count:
            then(outcomes)

    return completed


def _refusal(given: str | None, expected: str | None) -> str:
    """Why a connecting peer's proof is refused (``""``: it is not); ``expected`` is ``None`` without a token.

    Tokens must be the same everywhere: a peer proving a token this sidecar does not have is refused
    too (it would refuse this sidecar's missing proof in turn).
    """
    if expected is None:
        return "" if given is None else "it holds an auth token and this sidecar has none"
    if given is None:
        return "it presented no auth token"
    return "" if wire.proof_matches(given, expected) else "it presented a wrong auth token"


def _split(whole: _Whole, sizes: list[int]) -> list[_Whole]:
    """Consecutive slices of ``sizes`` bytes of ``whole``, without copying."""
    parts: list[_Whole] = []
    pos = 0
    for size in sizes:
        parts.append(whole[pos : pos + size])
        pos += size
    return parts


@dataclass(frozen=True, slots=True)
class _Landing:
    """Where a frame's payload lands: the memory, its host pool block (or ``None``), and what it counts as arriving."""

    dest: torch.Tensor
    block: torch.Tensor | None
    arriving: int


@dataclass(slots=True)
class _Absence:
    incarnation: str
    reason: str
    #: The messages in parts that were arriving over the connections that broke.
    messages: set[int]
    timer: asyncio.TimerHandle


class Absences:
    """Ranks whose connection in broke, each given :data:`RECONNECT_GRACE` to connect again as the same process.

    A rank whose process connects again in time lost only what was arriving over the broken
    connections (``inbox.parts_lost``); one that does not is reported lost (``inbox.peer_lost``).
    Several breaks of one process count as one absence, which a reconnection ends. A rank that
    connects as another process than the one last seen (restarted) has its old process reported
    lost as it connects, once, before any frame of the new process arrives, so that only the old
    process's receives fail; connections of the old process that break later lose only their parts.

    Concurrency: loop thread only. Closing: :meth:`close` drops every absence without a verdict.
    """

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox
        self._pending: dict[int, _Absence] = {}
        #: The process that last connected as each rank.
        self._current: dict[int, str] = {}

    def broke(self, rank: int, incarnation: str, reason: str, messages: set[int], connected: set[str]) -> None:
        """A connection of ``rank``'s process ``incarnation`` broke; ``connected``: the rank's other open ones."""
        if incarnation in connected or self._current.get(rank, incarnation) != incarnation:
            # The process is still connected, or is not the rank's any more (reported lost as its
            # successor came): only what was arriving over this connection is lost.
            self._inbox.parts_lost(rank, messages)
            return
        earlier = self._pending.pop(rank, None)
        if earlier is not None:  # an earlier break of the same process, whose absence goes on
            earlier.timer.cancel()
            messages = messages | earlier.messages
        timer = asyncio.get_running_loop().call_later(RECONNECT_GRACE, self._expire, rank)
        self._pending[rank] = _Absence(incarnation, reason, messages, timer)

    def arrived(self, rank: int, incarnation: str) -> None:
        """A connection of ``rank``'s process ``incarnation`` proved itself and was accepted."""
        previous = self._current.get(rank)
        self._current[rank] = incarnation
        absence = self._pending.pop(rank, None)
        if absence is not None:
            absence.timer.cancel()
            if absence.incarnation == incarnation:
                self._inbox.parts_lost(rank, absence.messages)
            else:
                self._inbox.peer_lost(rank, f"{absence.reason}; it came back as another process (restarted)")
        elif previous not in (None, incarnation):  # the old process's connections have not broken yet
            self._inbox.peer_lost(rank, "it connected again as another process (restarted)")

    def _expire(self, rank: int) -> None:
        absence = self._pending.pop(rank)
        self._inbox.peer_lost(rank, absence.reason)

    def close(self) -> None:
        """Drop every absence without a verdict (this sidecar is shutting down)."""
        for absence in self._pending.values():
            absence.timer.cancel()
        self._pending.clear()


@dataclass(slots=True)
class Arriving:
    """Bytes allocated for frames whose payloads are still arriving, over all of a transport's connections."""

    bytes: int = 0


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What every inbound connection of one transport needs."""

    rank: int
    inbox: Inbox
    token: str | None = field(repr=False)  # never in a traceback's locals or a log
    max_bytes: int
    recv_device: torch.device
    handshake_timeout: float
    pool: HostPool
    arriving: Arriving
    #: The transport's open connections in: a rank still connected over another one is not lost.
    connections: set[Inbound]
    #: Ranks whose connection broke, waiting to connect again (see :class:`Absences`).
    absences: Absences


class Inbound:
    """One accepted connection (see the module docstring)."""

    def __init__(self, options: ServeOptions, tag_base: int, on_closed: Callable[[Inbound], None]) -> None:
        self._options = options
        self._tag_base = tag_base
        self._on_closed = on_closed
        self._endpoint: Endpoint | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._scratch = bytearray(1)
        # Made once the peer proved it holds the token: it is large, and a connection that never shakes
        # hands must not cost it.
        self._header = bytearray()
        self._used = 0  # bytes the last header message used, zeroed before the next receive
        self.rank: int | None = None
        #: The peer process's incarnation, told in its hello (with :attr:`rank`, once it proved the token).
        self.incarnation: str | None = None
        self._ack_tag = 0
        self._arriving = 0  # this connection's share of options.arriving
        self._parts = ArrivingParts()
        self.closed = False

    def attach(self, endpoint: Endpoint) -> None:
        """Take the connection's endpoint (made with :meth:`on_broken` as its callback)."""
        self._endpoint = endpoint

    def on_broken(self, reason: str) -> None:
        """The connection failed or the peer closed it."""
        self._close(reason, lost=True)

    async def serve(self) -> None:
        """Shake hands, then start reading frames (until the connection closes). Never raises."""
        try:
            accepted = await asyncio.wait_for(self._handshake(), self._options.handshake_timeout)
            if accepted:
                self._header = bytearray(wire.HEADER_MESSAGE_BYTES)
                self._read_header()
        except asyncio.CancelledError:
            pass
        except TimeoutError:
            self._close(f"no handshake within {self._options.handshake_timeout:g}s")
        except wire.ProtocolError as exc:
            logger.warning("ucx: closing a connection from %s: %s", self._who(), exc)
            self._close(str(exc), lost=True)
        except Exception as exc:  # a UCX error: the connection broke
            self._close(describe_error(exc), lost=True)

    def _who(self) -> str:
        return "an unidentified peer" if self.rank is None else f"rank {self.rank}"

    # -- handshake ----------------------------------------------------------------------------

    async def _handshake(self) -> bool:
        """Shake hands as the listening side (see :mod:`._wire`): check the peer's proof, then give ours."""
        endpoint = self._require()
        body = await endpoint.recv_stream_message()
        version, rank, _ = wire.version_of(body, "hello")
        if version != wire.VERSION:
            who = "a peer" if rank is None else f"a peer claiming rank {rank}"
            await self._refuse("ProtocolError", f"{who} speaks protocol version {version}, this sidecar {wire.VERSION}")
            return False
        hello = wire.parse_model(wire.Hello, body, "hello")
        token, own = self._options.token, self._options.rank
        transcript = wire.Transcript(hello.rank, own, hello.nonce, wire.new_nonce())
        challenge = wire.Challenge(version=wire.VERSION, rank=own, nonce=transcript.listener_nonce)
        await endpoint.stream_send(wire.stream_message(challenge))
        try:
            body = await endpoint.recv_stream_message()
        except Exception:
            # A scanner, or a sidecar that dialled another rank; nothing was proved: not a warning.
            logger.info("ucx: a peer claiming rank %d left the handshake before proving anything", hello.rank)
            raise
        response = wire.parse_model(wire.Response, body, "handshake response")
        refusal = _refusal(response.proof, None if token is None else transcript.proof(token, "connector"))
        if refusal:
            logger.warning("ucx: refused a peer claiming rank %d: %s", hello.rank, refusal)
            await self._refuse(
                "AuthenticationError", f"{refusal}; set the same SIDECAR_AUTH_TOKEN on every sidecar of the deployment"
            )
            return False
        self.rank, self.incarnation = hello.rank, hello.incarnation
        self._ack_tag = transcript.ack_tag(token)
        mine = None if token is None else transcript.proof(token, "listener", self._tag_base)
        reply = wire.Reply(version=wire.VERSION, rank=own, accepted=True, tag_base=self._tag_base, proof=mine)
        await endpoint.stream_send(wire.stream_message(reply))
        # Accepted; frames are read only from now on. (Before the reply, a process that died while it
        # was being answered would have ended its own absence without ever being reported lost.)
        self._options.absences.arrived(hello.rank, hello.incarnation)
        return True

    async def _refuse(self, error: str, message: str) -> None:
        reply = wire.Reply(version=wire.VERSION, rank=self._options.rank, accepted=False, error=error, message=message)
        with contextlib.suppress(Exception):
            await self._require().stream_send(wire.stream_message(reply))
            await self._linger()
        self._close("refused")

    async def _linger(self) -> None:
        """Wait for the peer to close after a final answer (closing first could lose the answer)."""
        await asyncio.sleep(self._options.handshake_timeout)

    # -- frames -------------------------------------------------------------------------------

    def _read_header(self) -> None:
        """Post the receive of the next header message; :meth:`_on_header` takes it."""
        if self.closed:
            return
        used = max(wire.HEADER_PREFIXES, self._used)
        self._header[:used] = bytes(used)
        try:
            self._require().recv_then(self._header, self._tag_base | wire.HEADER, self._on_header, idle=True)
        except Exception as exc:  # the endpoint is closed or broken
            self._close(describe_error(exc), lost=True)

    def _on_header(self, error: Exception | None) -> None:
        """A header message arrived: deliver an inline frame at once, or post the payload's receives."""
        if self.closed:
            return
        if error is not None:  # a UCX error: the connection broke
            self._close(describe_error(error), lost=True)
            return
        try:
            self._take_header()
        except Exception as exc:  # never leave a connection unread: close it, as a broken one
            logger.exception("ucx: handling a frame header from %s failed", self._who())
            self._close(describe_error(exc), lost=True)

    def _take_header(self) -> None:
        """Validate the header message in the buffer, then deliver its frame or start receiving its payload."""
        view = memoryview(self._header)
        seq = wire.message_seq(view)
        self._used = wire.claimed_length(view)
        try:
            header, inline = wire.parse_header_message(view)
        except FrameError as exc:
            # The payload's size is unknown, so the rest of this connection cannot be read.
            logger.warning("ucx: malformed frame header from %s: %s", self._who(), exc)
            self._ack(seq, exc, closing=True)
            self._spawn(self._close_after_linger(f"malformed frame header: {exc}"))
            return
        try:
            check_sender(header, -1 if self.rank is None else self.rank)  # headers come after the handshake
        except FrameError as refusal:
            if inline is None:
                self._drain(seq, header, refusal)
            else:
                self._ack(seq, refusal)
            self._read_header()
            return
        self._parts.arrived(header)
        if inline is not None:
            self._deliver(seq, header, _split(memoryview(bytearray(inline)), header.sizes), None)
            self._read_header()
            return
        try:
            landing = self._allocate(header)
        except SidecarError as refusal:  # too large, or a part the inbox refuses: the sender raises it
            self._parts.taken(header, self._options.inbox, refused=True)
            self._drain(seq, header, refusal)
            self._read_header()
            return
        if landing.dest.is_cuda and not cuda_idle(landing.dest.device):
            self._spawn(self._receive_when_idle(seq, header, landing))
        else:
            self._receive(seq, header, landing)
            self._read_header()

    async def _receive_when_idle(self, seq: int, header: Header, landing: _Landing) -> None:
        """Receive into CUDA memory whose device still has work queued, once that work is done."""
        try:
            await wait_cuda_idle([landing.dest])
            self._receive(seq, header, landing)
        except Exception as exc:  # a UCX error: the connection broke
            self._close(describe_error(exc), lost=True)
            return
        self._read_header()

    async def _close_after_linger(self, reason: str) -> None:
        await self._linger()
        self._close(reason, lost=True)

    def _allocate(self, header: Header) -> _Landing:
        """The memory a frame's payload lands in, counted as arriving against the memory bound.

        A part of a message in parts lands in place, in the memory the inbox sets aside for its
        whole message (counted there).

        Raises:
            CapacityError: The frame is over ``SIDECAR_MAX_BUFFERED_BYTES``, or its memory cannot be
                allocated.
            SidecarError: The inbox refuses the part (see :meth:`sidecar_core.Inbox.part_landing`).
        """
        options = self._options
        if header.total_bytes > options.max_bytes:
            raise CapacityError(
                f"{header.describe()}: {header.total_bytes} bytes exceed SIDECAR_MAX_BUFFERED_BYTES="
                f"{options.max_bytes} on rank {options.rank}; raise the bound or send smaller chunks"
            )
        if header.num_parts > 1:
            place = options.inbox.part_landing(header, arriving=options.arriving.bytes)
            if place is not None:
                return _Landing(place, None, 0)
        held = options.inbox.buffered_bytes + options.arriving.bytes
        if held + header.frame_bytes > options.max_bytes:
            raise CapacityError(
                f"{header.describe()}: {header.frame_bytes} more bytes would exceed SIDECAR_MAX_BUFFERED_BYTES="
                f"{options.max_bytes} on rank {options.rank} ({held} held or arriving); the receiver must "
                "mark_done chunks it has consumed, or raise the bound"
            )
        device = self._land_device(header)
        try:
            if device.type == "cpu":
                dest, block = options.pool.take(header.frame_bytes)
            else:
                dest, block = torch.empty(header.frame_bytes, dtype=torch.uint8, device=device), None
        except (RuntimeError, MemoryError) as exc:  # torch's out-of-memory errors
            raise CapacityError(
                f"{header.describe()}: rank {options.rank} cannot allocate {header.frame_bytes} bytes "
                f"on {device}: {exc}"
            ) from exc
        self._count_arriving(header.frame_bytes)
        return _Landing(dest, block, header.frame_bytes)

    def _count_arriving(self, nbytes: int) -> None:
        """Count ``nbytes`` more (or, negative, fewer) as arriving on this connection."""
        self._arriving += nbytes
        self._options.arriving.bytes += nbytes

    def _receive(self, seq: int, header: Header, landing: _Landing) -> None:
        """Post the payload receives of one frame into its memory, in order; the last to arrive delivers it.

        Raises:
            ConnectionError: The endpoint is closed.
            Exception: UCX refused a receive (the connection is broken).
        """
        views = _split(landing.dest, header.sizes)
        block = landing.block
        release = None if block is None else functools.partial(self._options.pool.give, block)
        waiting = [view for view in views if view.numel()]

        def arrived(outcomes: list[Exception | None]) -> None:
            if self.closed:
                return  # closing took this connection's bytes off the count
            self._count_arriving(-landing.arriving)
            error = next((outcome for outcome in outcomes if outcome is not None), None)
            if error is not None:
                if release is not None:  # every receive has ended: UCX no longer writes the block
                    release()
                self._payload_failed(seq, header, error)
                return
            try:
                self._deliver(seq, header, views, release)
            except Exception as exc:  # never raise into the worker: close the connection, as a broken one
                logger.exception("ucx: delivering a frame from %s failed", self._who())
                self._close(describe_error(exc), lost=True)

        if not waiting:  # empty buffers only: nothing to wait for
            self._count_arriving(-landing.arriving)
            self._deliver(seq, header, views, release)
            return
        endpoint = self._require()
        each = _after_all(len(waiting), arrived)
        for view in waiting:
            endpoint.recv_then(view, self._tag_base | wire.PAYLOAD, each)

    def _payload_failed(self, seq: int, header: Header, error: Exception) -> None:
        """A payload receive failed: the sender sent more than its header said, or the connection broke.

        Either way the frame is lost and this connection is given up: a sender whose payloads
        disagree with its headers is refused (it raises ``RemoteError`` and reconnects), as for a
        malformed header.
        """
        if self._require().truncated(error):
            problem = FrameError(f"{header.describe()}: a payload message is longer than the header says")
            logger.warning("ucx: closing the connection from %s: %s", self._who(), problem)
            self._ack(seq, problem, closing=True)
            self._spawn(self._close_after_linger(str(problem)))
        else:
            self._close(f"receiving the payload of {header.describe()} failed: {describe_error(error)}", lost=True)

    def _land_device(self, header: Header) -> torch.device:
        if header.device == "cuda" and self._options.recv_device.type == "cuda":
            return self._options.recv_device
        return torch.device("cpu")

    def start(self) -> None:
        """Start serving the connection on the running loop (see :meth:`serve`)."""
        self._spawn(self.serve())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _deliver(self, seq: int, header: Header, buffers: Sequence[Buffer], release: Callable[[], None] | None) -> None:
        """Hand a complete frame to the inbox and acknowledge it (or pass on the inbox's refusal)."""
        refusal: Exception | None = None
        try:
            self._options.inbox.deliver(Frame(header, list(buffers)), release)
        except Exception as exc:  # FrameError, DuplicateChunkError, CapacityError: the sender raises it
            refusal = exc
        self._parts.taken(header, self._options.inbox, refused=refusal is not None)
        self._ack(seq, refusal)

    def _drain(self, seq: int, header: Header, refusal: Exception) -> None:
        """Consume the payload of a refused frame, then acknowledge it with the refusal.

        A 1-byte receive takes each message (UCX reports it truncated).

        Raises:
            ConnectionError: The endpoint is closed.
        """
        endpoint = self._require()
        messages = sum(1 for size in header.sizes if size)

        def drained(outcomes: list[Exception | None]) -> None:
            if all(error is None or endpoint.truncated(error) for error in outcomes):
                self._ack(seq, refusal)
                return
            error = next(error for error in outcomes if error is not None and not endpoint.truncated(error))
            self._close(f"draining the payload of {header.describe()} failed: {describe_error(error)}", lost=True)

        if not messages:
            self._ack(seq, refusal)
            return
        each = _after_all(messages, drained)
        for _ in range(messages):
            endpoint.recv_then(self._scratch, self._tag_base | wire.PAYLOAD, each)

    def _ack(self, seq: int, refusal: BaseException | None, *, closing: bool = False) -> None:
        """Submit the acknowledgement of frame ``seq`` (the worker keeps it until it is sent)."""
        problem = None if refusal is None else wire.problem_of(refusal)
        with contextlib.suppress(ConnectionError):  # a broken connection is reported by on_broken
            self._require().post(wire.ack_message(seq, problem, closing=closing), self._ack_tag)

    # -- closing ------------------------------------------------------------------------------

    def _require(self) -> Endpoint:
        if self._endpoint is None:
            raise ConnectionError("the connection has no endpoint")
        return self._endpoint

    def _close(self, reason: str, *, lost: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._count_arriving(-self._arriving)  # frames that will not arrive any more
        if self._endpoint is not None:
            self._endpoint.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if lost and self.rank is not None and self.incarnation is not None:
            messages = set(self._parts.messages)
            self._options.absences.broke(self.rank, self.incarnation, reason, messages, self._others())
        self._on_closed(self)

    def _others(self) -> set[str]:
        """The incarnations of this rank's other open connections."""
        return {
            other.incarnation
            for other in self._options.connections
            if other is not self and other.rank == self.rank and not other.closed and other.incarnation is not None
        }

    def close(self) -> None:
        """Close the connection without reporting a lost peer (this sidecar is shutting down)."""
        self._close("this sidecar is shutting down")
