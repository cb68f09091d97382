"""``example-tcp``: a small transport over plain asyncio TCP, written to be read and copied.

Every rank listens on ``SIDECAR_BASE_PORT + rank`` (or its ``SIDECAR_PEERS`` entry). A sender keeps
one connection per destination. On a new connection the sender says hello (its rank and auth
token); then it writes frames in the core's byte form and the receiver answers each frame, in
order, with an acknowledgement: ``OK``, or ``REJECTED`` plus the reason the receiving core gave
(malformed frame, duplicate chunk, over capacity), which the sender raises as ``RemoteError``.

The receiver validates the header (``decode_header``) and its size before it reads the payload,
so a bad or oversized frame never makes it allocate; a connection whose byte stream can no longer
be trusted is answered, then closed. When a connection from a peer breaks, the receiver tells the
core (``Inbox.peer_lost``) so that receives waiting on that peer fail at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import random
import socket
import struct
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sidecar_core import (
    PREFIX_BYTES,
    AuthenticationError,
    Buffer,
    CapacityError,
    DuplicateChunkError,
    Frame,
    FrameError,
    PeerLostError,
    PeerUnreachableError,
    RemoteError,
    Transport,
    TransportContext,
    check_sender,
    decode_header,
    encode_header,
    header_length,
    load_settings,
)

logger = logging.getLogger(__name__)

#: Hello: magic, the sender's rank, the length of its auth token (the token follows).
HELLO = struct.Struct("<4sIH")
HELLO_MAGIC = b"SCXT"
#: Acknowledgement: status, the length of the UTF-8 reason (the reason follows).
ACK = struct.Struct("<BI")
OK, REJECTED, REFUSED = 0, 1, 2


class ExampleTcpSettings(BaseSettings):
    """The transport's own settings, ``SIDECAR_EXAMPLE_TCP__<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="SIDECAR_EXAMPLE_TCP__", extra="ignore")

    listen_host: str = Field("127.0.0.1", description="Interface to listen on; `0.0.0.0` to serve other hosts.")


class _Connection:
    """An outgoing connection: frames are written in order and acknowledged in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.write_lock = asyncio.Lock()
        self.acks: collections.deque[asyncio.Future[tuple[int, str]]] = collections.deque()
        self.ack_reader: asyncio.Task[None] | None = None


class ExampleTcpTransport(Transport):
    """Frames over TCP, one connection per destination, each frame acknowledged."""

    name = "example-tcp"

    @classmethod
    def test_environment(cls, workdir: Path) -> dict[str, str]:
        """A block of free loopback ports for the test's ranks."""
        return {"SIDECAR_BASE_PORT": str(_free_port_block(16)), "SIDECAR_IS_LOCAL": "true"}

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        self.options = load_settings(ExampleTcpSettings)
        self._server: asyncio.Server | None = None
        self._connections: dict[int, _Connection] = {}
        self._connect_locks: collections.defaultdict[int, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False

    def address(self, rank: int) -> tuple[str, int]:
        """Where ``rank`` listens: its ``SIDECAR_PEERS`` entry, else the host template and base port."""
        settings = self.ctx.settings
        if settings.peers and rank in settings.peers:
            host, _, port = settings.peers[rank].rpartition(":")
            return host.strip("[]"), int(port)
        host = "127.0.0.1" if settings.is_local else settings.host_template.format(rank=rank)
        return host, settings.base_port + rank

    def describe_peer(self, rank: int) -> str:
        """``rank N at host:port``."""
        host, port = self.address(rank)
        return f"rank {rank} at {host}:{port}"

    async def start(self) -> None:
        """Listen on this rank's port.

        Raises:
            PeerUnreachableError: The port cannot be bound.
        """
        host, port = self.options.listen_host, self.address(self.ctx.rank)[1]
        try:
            self._server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            raise PeerUnreachableError(
                f"example-tcp rank {self.ctx.rank} cannot listen on {host}:{port} ({exc}); another process may "
                "hold the port: change SIDECAR_BASE_PORT or SIDECAR_PEERS"
            ) from exc

    # -- receiving ------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        rank: int | None = None
        try:
            rank = await self._hello(reader, writer)
            while rank is not None and await self._receive_frame(rank, reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            if rank is not None and not self._closing:
                clean = isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
                self.ctx.inbox.peer_lost(
                    rank, "it closed its connection" if clean else f"its connection broke: {exc!r}"
                )
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int | None:
        """Read a sender's hello and check its token; return its rank, or ``None`` if refused."""
        magic, rank, token_length = HELLO.unpack(
            await asyncio.wait_for(reader.readexactly(HELLO.size), self.ctx.settings.connect_timeout)
        )
        if magic != HELLO_MAGIC:
            logger.warning("example-tcp rank %d: a connection that is not a sidecar was closed", self.ctx.rank)
            return None
        token = await reader.readexactly(token_length)
        expected = self.ctx.settings.auth_token
        if expected is not None and not hmac.compare_digest(token, expected.get_secret_value().encode()):
            await _ack(
                writer,
                REFUSED,
                f"rank {self.ctx.rank} refused rank {rank}: wrong or missing auth token; set the same "
                "SIDECAR_AUTH_TOKEN on both",
            )
            return None
        await _ack(writer, OK)
        return int(rank)

    async def _receive_frame(self, rank: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read, deliver and acknowledge one frame; return whether the connection can go on."""
        prefix = await reader.readexactly(PREFIX_BYTES)
        try:
            header = decode_header(await reader.readexactly(header_length(prefix)))
            if header.frame_bytes > self.ctx.settings.max_buffered_bytes:
                raise CapacityError(
                    f"{header.describe()}: a {header.frame_bytes}-byte frame exceeds SIDECAR_MAX_BUFFERED_BYTES="
                    f"{self.ctx.settings.max_buffered_bytes} on rank {self.ctx.rank}"
                )
        except (FrameError, CapacityError) as exc:
            # The payload was not read: the byte stream is out of step, so answer and hang up.
            await _ack(writer, REJECTED, str(exc))
            return False
        buffers: list[Buffer] = [memoryview(await reader.readexactly(size)) for size in header.sizes]
        try:
            check_sender(header, rank)  # after its payload: the stream stays in step, the connection serves on
            self.ctx.inbox.deliver(Frame(header, buffers))
        except (FrameError, DuplicateChunkError, CapacityError) as exc:
            await _ack(writer, REJECTED, str(exc))
        except Exception as exc:  # a bug behind the inbox: report it, keep serving
            logger.exception("example-tcp rank %d: delivering %s failed", self.ctx.rank, header.describe())
            await _ack(writer, REJECTED, f"{header.describe()}: rank {self.ctx.rank} failed to store it: {exc!r}")
        else:
            await _ack(writer, OK)
        return True

    # -- sending --------------------------------------------------------------------------------

    async def send(self, dst: int, frame: Frame) -> None:
        """Write ``frame`` to ``dst``'s connection and wait for its acknowledgement.

        Raises:
            PeerUnreachableError: ``dst`` cannot be connected to.
            PeerLostError: The connection broke before ``dst`` acknowledged.
            RemoteError: ``dst`` rejected the frame.
            AuthenticationError: ``dst`` refused this rank's auth token.
        """
        conn = await self._connection(dst)
        ack: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        try:
            async with conn.write_lock:
                conn.acks.append(ack)
                conn.writer.write(encode_header(frame.header))
                for buf in frame.buffers:
                    conn.writer.write(_host_view(buf))
                await conn.writer.drain()
            status, reason = await ack
        except asyncio.CancelledError:
            self._drop(dst, conn, "a send to it was cancelled")  # its byte stream may be cut mid-frame
            raise
        except (ConnectionError, OSError) as exc:
            self._drop(dst, conn, f"writing failed: {exc!r}")
            raise PeerLostError(
                f"lost {self.describe_peer(dst)} while sending {frame.header.describe()}: {exc}"
            ) from exc
        if status != OK:
            raise RemoteError(f"{self.describe_peer(dst)} rejected {frame.header.describe()}: {reason}")

    async def _connection(self, dst: int) -> _Connection:
        async with self._connect_locks[dst]:
            conn = self._connections.get(dst)
            if conn is None:
                conn = self._connections[dst] = await self._connect(dst)
            return conn

    async def _connect(self, dst: int) -> _Connection:
        """Connect and say hello, retrying refused connections until SIDECAR_CONNECT_TIMEOUT."""
        loop = asyncio.get_running_loop()
        timeout = self.ctx.settings.connect_timeout
        deadline = loop.time() + timeout
        host, port = self.address(dst)
        delay = 0.02
        while True:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), deadline - loop.time())
                break
            except (OSError, TimeoutError) as exc:
                if loop.time() + delay >= deadline:
                    raise PeerUnreachableError(
                        f"cannot connect to {self.describe_peer(dst)} within SIDECAR_CONNECT_TIMEOUT={timeout:g}s "
                        f"({exc or 'timed out'}); is rank {dst} running, and do SIDECAR_BASE_PORT, SIDECAR_PEERS "
                        "and SIDECAR_HOST_TEMPLATE agree on both sides?"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        secret = self.ctx.settings.auth_token
        token = secret.get_secret_value().encode() if secret is not None else b""
        try:
            writer.write(HELLO.pack(HELLO_MAGIC, self.ctx.rank, len(token)) + token)
            status, reason = await asyncio.wait_for(_read_ack(reader), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            writer.close()
            raise PeerUnreachableError(f"{self.describe_peer(dst)} did not answer the hello: {exc!r}") from None
        if status != OK:
            writer.close()
            raise AuthenticationError(reason)
        conn = _Connection(reader, writer)
        conn.ack_reader = asyncio.create_task(self._read_acks(dst, conn))
        return conn

    async def _read_acks(self, dst: int, conn: _Connection) -> None:
        try:
            while True:
                status, reason = await _read_ack(conn.reader)
                ack = conn.acks.popleft()
                if not ack.done():
                    ack.set_result((status, reason))
        except (asyncio.IncompleteReadError, ConnectionError, IndexError) as exc:
            self._drop(dst, conn, f"the connection closed ({exc!r})")

    def _drop(self, dst: int, conn: _Connection, why: str) -> None:
        """Forget a connection and fail the sends still waiting for its acknowledgements."""
        if self._connections.get(dst) is conn:
            del self._connections[dst]
        conn.writer.close()
        if conn.ack_reader is not None and conn.ack_reader is not asyncio.current_task():
            conn.ack_reader.cancel()
        while conn.acks:
            ack = conn.acks.popleft()
            if not ack.done():
                ack.set_exception(PeerLostError(f"{self.describe_peer(dst)} did not acknowledge a frame: {why}"))

    async def close(self) -> None:
        """Close the listener, every connection and every handler."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for dst, conn in list(self._connections.items()):
            self._drop(dst, conn, "this sidecar is shutting down")
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


async def _ack(writer: asyncio.StreamWriter, status: int, reason: str = "") -> None:
    body = reason.encode()
    writer.write(ACK.pack(status, len(body)) + body)
    await writer.drain()


async def _read_ack(reader: asyncio.StreamReader) -> tuple[int, str]:
    status, length = ACK.unpack(await reader.readexactly(ACK.size))
    return int(status), (await reader.readexactly(length)).decode(errors="replace")


def _host_view(buf: Buffer) -> memoryview:
    """Bytes of a payload buffer in host memory (CUDA buffers are copied to the host)."""
    if isinstance(buf, memoryview):
        return buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    return buf.detach().cpu().contiguous().numpy().data.cast("B")


def _free_port_block(count: int) -> int:
    """A base port such that ``count`` ports from it can be bound now (below the ephemeral range)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"found no {count} free consecutive ports between 20000 and 32000")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
