"""One accepted connection: a peer rank's frames in, acknowledgements and releases out.

Life cycle: the peer must say ``HELLO`` (with the auth token, if one is set) within the connect
timeout; a wrong or missing token is answered ``REFUSED`` and the connection closed. Then every
frame is handed to the inbox and answered ``ACK``, or ``NACK`` with the inbox's error (the peer's
``send`` raises :class:`RemoteError`); either way the connection goes on. Malformed input is
answered ``ERROR`` and closes this connection only (see :mod:`._channel`).

Shared memory: frames in the peer's pool are delivered as views of its slots; their release (the
store calls it after ``mark_done``) sends ``RELEASE`` so the peer can reuse the slot. A sidecar that
receives on a GPU (``SIDECAR_RECV_DEVICE=cuda[:N]``) instead copies each frame onto the GPU as its
segments arrive (see :mod:`._cuda`) and releases the slot as soon as the copy is done.

Concurrency: event-loop thread only, except that once the handshake is done, inline ``FRAME``
messages may be handled by a thread waiting in ``recv_sync`` (see :mod:`._readers`): that path only
delivers to the inbox and queues the acknowledgement. Closing: when the connection ends, the inbox is told that the
peer was lost (unless this sidecar is the one shutting down); mappings of the peer's pool are
dropped, while views the store still holds keep their memory mapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar_core import (
    ArrivingParts,
    AuthenticationError,
    Buffer,
    CapacityError,
    Frame,
    FrameError,
    Header,
    Inbox,
    SidecarClosedError,
    check_sender,
)
from transports.localhost._channel import Channel
from transports.localhost._protocol import (
    SENDER_MESSAGES,
    SHM_PREFIX,
    U32,
    U64,
    VERSION,
    Hello,
    IpcBuffers,
    Msg,
    Problem,
    ProtocolError,
    Welcome,
    envelope,
    parse_json,
    peer_credentials,
    problem_body,
    slot_layout,
    split_frame,
)
from transports.localhost._readers import Readers
from transports.localhost._shm import PeerPool

if TYPE_CHECKING:
    from transports.localhost._cuda import Landing

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Staged:
    """A shared-memory frame whose data is still being copied in by the sender."""

    header: Header
    #: The slot's bytes in the peer's pool (empty for a refused frame: nothing here reads it).
    slot: memoryview
    offsets: list[int]
    ready: int
    landing: Landing | None
    span: int
    #: Why the frame is refused once the sender has finished with its slot (``None``: it is not).
    refusal: CapacityError | None = None


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What an incoming connection needs to know about this sidecar."""

    rank: int
    token: str | None
    recv_device: str
    cuda_ipc: bool
    hello_timeout: float
    #: ``SIDECAR_MAX_BUFFERED_BYTES``: a larger shared-memory frame is refused before its slot is read.
    max_bytes: int
    #: The transport's open connections in: a rank still connected over another one is not lost.
    connections: set[Incoming]


class Incoming:
    """Serves one accepted connection (see the module docstring).

    Args:
        sock: The accepted socket.
        inbox: Where frames go.
        options: This sidecar's rank, auth token and receive device.
        on_closed: Called once when the connection ends.
    """

    def __init__(
        self,
        sock: socket.socket,
        inbox: Inbox,
        options: ServeOptions,
        readers: Readers,
        on_closed: Callable[[Incoming], None],
    ) -> None:
        self._inbox = inbox
        self._options = options
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self.rank: int | None = None
        self.pid, uid = peer_credentials(sock)
        self._uid_ok = uid == os.getuid()
        self._pool: PeerPool | None = None
        self._staged: dict[int, _Staged] = {}
        self._cuda_ipc = False  # offered in the WELCOME
        self._pinned: bool | None = None  # whether the peer's pool is page-locked here (None: not tried)
        self._parts = ArrivingParts()
        self.shutting_down = False
        self.channel = Channel(
            sock,
            self._loop,
            readers,
            allowed=SENDER_MESSAGES,
            on_message=self._on_message,
            on_close=self._on_close,
            reply_errors=True,
            name=f"connection from pid {self.pid} to rank {options.rank}",
        )
        self._hello_timer: asyncio.TimerHandle | None = self._loop.call_later(options.hello_timeout, self._no_hello)

    # -- dispatch -----------------------------------------------------------------------------

    def _on_message(self, kind: Msg, arg: int, body: bytearray) -> None:
        if self.rank is None:
            if kind is not Msg.HELLO:
                raise ProtocolError(f"expected HELLO as the first message, got {kind.name}")
            self._hello(parse_json(Hello, body, "handshake"))
            return
        view = memoryview(body)
        if kind is Msg.FRAME:
            self._inline(arg, view)
        elif kind is Msg.SHM_FRAME:
            self._shm(arg, view)
        elif kind is Msg.READY:
            self._ready(arg, _u64(view, "READY"))
        elif kind is Msg.ABORT:
            self._abort(arg, parse_json(Problem, view, "abort"))
        elif kind is Msg.POOL:
            if self._pool is not None:
                raise ProtocolError("the peer shared its pool twice")
            size = _u64(view, "POOL")  # before the descriptor is taken: a malformed body leaves it to the channel
            self._pool = PeerPool(self.channel.take_fd(), size)
        elif kind is Msg.IPC_FRAME:
            self._ipc(arg, view)
        else:
            raise ProtocolError(f"unexpected {kind.name} after the handshake")

    def _hello(self, hello: Hello) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        who = f"pid {self.pid} claiming rank {hello.rank}"
        problem = None
        if hello.version != VERSION:
            problem = problem_body("ProtocolError", f"protocol version {hello.version} is not {VERSION}; upgrade both")
        elif not self._uid_ok:
            logger.warning("rank %d refused a connection from %s: it runs as another user", self._options.rank, who)
            problem = problem_body(AuthenticationError.__name__, "the peer runs as another user")
        elif self._options.token is not None and not hmac.compare_digest(
            (hello.token or "").encode(), self._options.token.encode()
        ):
            reason = "no auth token" if hello.token is None else "a wrong auth token"
            logger.warning("rank %d refused a connection from %s: it presented %s", self._options.rank, who, reason)
            problem = problem_body(
                AuthenticationError.__name__,
                f"rank {self._options.rank} requires SIDECAR_AUTH_TOKEN and this sidecar presented {reason}; set the "
                "same SIDECAR_AUTH_TOKEN on both",
            )
        if problem is not None:
            self.channel.write(envelope(Msg.REFUSED, len(problem)), problem)
            self.channel.close(f"refused {who}", flush=True)
            return
        self.rank = hello.rank
        self.channel.name = f"connection from rank {hello.rank} (pid {self.pid}) to rank {self._options.rank}"
        welcome = Welcome(
            version=VERSION,
            rank=self._options.rank,
            pid=os.getpid(),
            cuda_ipc=self._options.cuda_ipc and self._options.recv_device.startswith("cuda"),
            pins_pool=self._options.recv_device.startswith("cuda"),
        )
        self._cuda_ipc = welcome.cuda_ipc
        body = welcome.model_dump_json().encode()
        self.channel.write(envelope(Msg.WELCOME, len(body)), body)
        # From now on a thread polling in recv_sync may take inline frames (see _readers).
        self.channel.direct = frozenset({Msg.FRAME})

    def _no_hello(self) -> None:
        self._hello_timer = None
        if self.rank is None and self.channel.closed is None:
            body = problem_body("ProtocolError", "no HELLO within the connect timeout")
            self.channel.write(envelope(Msg.ERROR, len(body)), body)
            self.channel.close("no handshake", flush=True)

    # -- frames -------------------------------------------------------------------------------

    def _inline(self, seq: int, body: memoryview) -> None:
        header, rest = split_frame(body, inline=True)
        buffers: list[Buffer] = []
        pos = 0
        for size in header.sizes:
            buffers.append(rest[pos : pos + size])
            pos += size
        self._deliver(seq, Frame(header, buffers), None)

    def _shm(self, seq: int, body: memoryview) -> None:
        if self._pool is None:
            raise ProtocolError("a shared-memory frame arrived before the peer shared its pool")
        if len(body) < SHM_PREFIX.size:
            raise ProtocolError("truncated SHM_FRAME message")
        offset, ready = SHM_PREFIX.unpack_from(body)
        header, _ = split_frame(body[SHM_PREFIX.size :], inline=False)
        offsets, span = slot_layout(header.sizes)
        if ready > span:
            raise ProtocolError(f"{header.describe()}: {ready} bytes ready exceeds the slot's {span}")
        if seq in self._staged:
            raise ProtocolError(f"sequence number {seq} is already in use")
        if header.frame_bytes > self._options.max_bytes:
            # Refused once the sender is done with the slot, which is never read here: reading a
            # slot commits its pages (a peer's pool may be sparse), and a landing would take GPU memory.
            refusal = CapacityError(
                f"{header.describe()}: {header.frame_bytes} bytes exceed SIDECAR_MAX_BUFFERED_BYTES="
                f"{self._options.max_bytes} on rank {self._options.rank}; raise it there, or send smaller messages "
                "(SIDECAR_CHUNK_SIZE)"
            )
            self._staged[seq] = _Staged(header, memoryview(b""), offsets, 0, None, span, refusal)
            self._ready(seq, ready)
            return
        slot = self._pool.slot(offset, span)
        landing = None
        if self._options.recv_device.startswith("cuda"):
            from transports.localhost import _cuda

            device = _cuda.device_of(self._options.recv_device)
            if self._pinned is None:
                self._pinned = _cuda.pin(self._pool.region, device)
            try:
                landing = _cuda.Landing(span, device)
            except RuntimeError as exc:  # out of GPU memory: hand the store a host view instead
                logger.warning("%s: %s lands on the host: %s", self.channel.name, header.describe(), exc)
        staged = _Staged(header, slot, offsets, 0, landing, span)
        self._staged[seq] = staged
        self._ready(seq, ready)

    def _ready(self, seq: int, ready: int) -> None:
        staged = self._staged.get(seq)
        if staged is None:
            raise ProtocolError(f"READY for unknown frame {seq}")
        if not staged.ready <= ready <= staged.span:
            raise ProtocolError(f"READY {ready} goes backwards or past the slot ({staged.ready}, {staged.span})")
        staged.ready = ready
        if staged.landing is not None:
            staged.landing.advance(staged.slot, ready)
        if ready < staged.span:
            return
        del self._staged[seq]
        if staged.refusal is not None:  # as the inbox would refuse it: the earlier parts of its message go too
            self._release(seq)
            self._parts.arrived(staged.header)
            self._parts.taken(staged.header, self._inbox, refused=True)
            self._nack(seq, staged.refusal)
            return
        if staged.landing is None:
            views: list[Buffer] = [
                staged.slot[o : o + n] for o, n in zip(staged.offsets, staged.header.sizes, strict=True)
            ]
            self._deliver(seq, Frame(staged.header, views), lambda: self._release(seq))
            return
        try:
            dest = staged.landing.finish()
        finally:
            self._release(seq)
        on_gpu: list[Buffer] = [dest[o : o + n] for o, n in zip(staged.offsets, staged.header.sizes, strict=True)]
        self._deliver(seq, Frame(staged.header, on_gpu), None)

    def _abort(self, seq: int, problem: Problem) -> None:
        staged = self._staged.pop(seq, None)
        logger.warning("%s: the sender abandoned frame %d: %s", self.channel.name, seq, problem.message)
        try:
            if staged is not None and staged.landing is not None:
                staged.landing.finish()  # no copy may still read the slot once it is released
        finally:
            self._release(seq)

    def _ipc(self, seq: int, body: memoryview) -> None:
        if not self._cuda_ipc:
            raise ProtocolError("a CUDA IPC frame arrived, but this sidecar did not offer CUDA IPC in its WELCOME")
        if len(body) < U32.size:
            raise ProtocolError("truncated IPC_FRAME message")
        (length,) = U32.unpack_from(body)
        if U32.size + length > len(body):
            raise ProtocolError("IPC_FRAME descriptor runs past the message")
        descriptors = parse_json(IpcBuffers, body[U32.size : U32.size + length], "CUDA IPC descriptor")
        header, _ = split_frame(body[U32.size + length :], inline=False)
        if [d.nbytes for d in descriptors.buffers] != header.sizes:
            raise ProtocolError(f"{header.describe()}: CUDA IPC buffer sizes do not match the header's")
        from transports.localhost import _cuda

        try:
            views = [_cuda.import_ipc(d) for d in descriptors.buffers]
        except Exception as exc:
            self._release(seq)
            self._nack(seq, exc)
            return
        device = _cuda.device_of(self._options.recv_device)
        if all(v.device == device for v in views):
            self._deliver(seq, Frame(header, list(views)), lambda: self._release(seq))
            return
        moved: list[Buffer] = [v.to(device) for v in views]
        _cuda.synchronize([device, *(v.device for v in views)])  # the copies are done before the release
        del views
        self._release(seq)
        self._deliver(seq, Frame(header, moved), None)

    def _deliver(self, seq: int, frame: Frame, release: Callable[[], None] | None) -> None:
        try:
            check_sender(frame.header, -1 if self.rank is None else self.rank)  # frames come after the hello
        except FrameError as exc:
            if release is not None:
                release()
            self._nack(seq, exc)
            return
        header = frame.header
        self._parts.arrived(header)
        try:
            self._inbox.deliver(frame, release)
        except Exception as exc:
            # The inbox's refusals (bad frame, duplicate, no room, shutting down) go back to the sender;
            # anything else is a bug worth a traceback.
            if not isinstance(exc, (ValueError, MemoryError, LookupError, SidecarClosedError)):
                logger.exception("%s: delivering %s failed", self.channel.name, frame.header.describe())
            self._parts.taken(header, self._inbox, refused=True)
            self._nack(seq, exc)
            return
        self._parts.taken(header, self._inbox, refused=False)
        if self.channel.closed is None:
            self.channel.write(envelope(Msg.ACK, 0, seq))

    def _nack(self, seq: int, error: BaseException) -> None:
        if self.channel.closed is None:
            body = problem_body(error)
            self.channel.write(envelope(Msg.NACK, len(body), seq), body)

    def _release(self, seq: int) -> None:
        if self.channel.closed is None:
            self.channel.write(envelope(Msg.RELEASE, 0, seq))

    # -- closing ------------------------------------------------------------------------------

    def _on_close(self, reason: str) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        staged, self._staged = list(self._staged.values()), {}
        for frame in staged:  # no copy onto a GPU may still read the pool once it is unmapped
            if frame.landing is not None:
                try:
                    frame.landing.finish()
                except Exception:  # the connection is closing anyway; the pages must stay until here
                    logger.exception("%s: finishing a copy onto the GPU failed", self.channel.name)
        if self._pool is not None:
            if self._pinned:
                from transports.localhost import _cuda

                _cuda.unpin(self._pool.region)
            self._pool.close()
            self._pool = None  # views the store still holds keep the mapping; it goes with the last one
        if self.rank is not None and not self.shutting_down:
            if any(
                other is not self and other.rank == self.rank and other.pid == self.pid and other.channel.closed is None
                for other in self._options.connections
            ):
                # The peer (the same process) connected again: only what came over this connection
                # is lost, and the peer's sends of it have failed.
                self._inbox.parts_lost(self.rank, self._parts.messages)
            else:
                self._inbox.peer_lost(self.rank, f"its connection to rank {self._options.rank} closed ({reason})")
        self._on_closed(self)

    async def close(self) -> None:
        """Flush queued acknowledgements and releases, then close."""
        self.shutting_down = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.channel.drain(), 2.0)
        self.channel.close("this sidecar is shutting down")


def _u64(body: memoryview, what: str) -> int:
    if len(body) != U64.size:
        raise ProtocolError(f"{what} message body must be {U64.size} bytes, got {len(body)}")
    return int(U64.unpack(body)[0])
