"""The ``ucx`` transport: sidecars talk through UCX (via ucxx) on one host or across hosts.

Each sidecar listens on its rank's port (see :mod:`transports.ucx._addressing`) and keeps one
connection per destination rank for its lifetime, making a new one on the next send after a break.
Payloads move with UCX tagged messages straight from the sender's memory into memory the receiver
allocated for that frame: TCP, shared memory or RDMA for host memory, CUDA IPC or GPUDirect RDMA for
CUDA memory (see :mod:`transports.ucx._wire` for the protocol). ucxx is imported only when
:meth:`UcxTransport.start` runs.

UCX itself reads its usual ``UCX_*`` environment variables (``UCX_TLS``, ``UCX_NET_DEVICES``, ...).

Concurrency, cancellation and closing follow :class:`sidecar_core.Transport`: everything runs on the
sidecar's loop except :meth:`UcxTransport.send_nowait`, which sends a frame to an open connection
from the caller's thread (see :meth:`transports.ucx._link.Link.send_nowait`); a cancelled ``send``
closes that destination's connection; ``close`` releases the listener, every connection and the UCX
worker, and never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sidecar_core import (
    Frame,
    PartRoutes,
    PeerUnreachableError,
    Transport,
    TransportContext,
    load_settings,
)
from transports.ucx import _wire as wire
from transports.ucx._addressing import Addressing, free_base_port
from transports.ucx._endpoint import Endpoint, describe_error
from transports.ucx._inbound import Absences, Arriving, Inbound, ServeOptions
from transports.ucx._link import Link, connect
from transports.ucx._pool import HostPool
from transports.ucx._worker import ProgressMode, UcxWorker

logger = logging.getLogger(__name__)


#: Shorter auth tokens get a warning (see the guide's Security section).
MIN_TOKEN_CHARS = 16


class UcxSettings(BaseSettings):
    """Settings of the ``ucx`` transport (prefix ``SIDECAR_UCX__``)."""

    model_config = SettingsConfigDict(env_prefix="SIDECAR_UCX__", extra="ignore")

    progress_mode: ProgressMode = Field(
        "blocking",
        description=(
            "How UCX makes progress: `blocking` (the sidecar's event loop sleeps on UCX events and spins only "
            "while a CUDA payload is in flight; no thread hops, idle CPU near 0), "
            "`polling` (the loop always spins), `thread` (a UCX progress thread sleeps on events and hands "
            "completions to the loop) or `thread-polling` (that thread always spins)."
        ),
    )
    host_pool_bytes: int = Field(
        512 << 20,
        ge=0,
        description=(
            "Host memory kept for reuse by received payloads of 1 MiB and more (0: no reuse). Reused buffers are "
            "already mapped: steady 64 MiB host traffic measured 1.7x faster with reuse."
        ),
    )


def _fds() -> list[int]:
    """This process's open file descriptors."""
    return [int(name) for name in os.listdir("/proc/self/fd")]


def _tcp_port(fd: int) -> int | None:
    """The local port of ``fd`` if it is a TCP socket, else ``None`` (never closes ``fd``)."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        probe = socket.socket(fileno=fd)
    except OSError:  # closed meanwhile (the listing's own descriptor), or not a socket Python knows
        return None
    try:
        if probe.family not in (socket.AF_INET, socket.AF_INET6) or probe.type != socket.SOCK_STREAM:
            return None
        return int(probe.getsockname()[1])
    except OSError:
        return None
    finally:
        probe.detach()


def _log_failed_reconnection(task: asyncio.Task[Link]) -> None:
    """Log why connecting again after giving a link up failed (the next send tries again)."""
    if not task.cancelled() and task.exception() is not None:
        logger.info("ucx: connecting again after giving a link up failed: %s", task.exception())


class UcxTransport(Transport):
    """Frames over UCX; see the module docstring."""

    name = "ucx"
    max_part_bytes = None

    @classmethod
    def test_environment(cls, workdir: Path) -> dict[str, str]:
        """Loopback addressing on a free range of ports, so parallel test runs never meet."""
        return {"SIDECAR_IS_LOCAL": "1", "SIDECAR_BASE_PORT": str(free_base_port()), "UCX_WARN_UNUSED_ENV_VARS": "n"}

    def __init__(self, ctx: TransportContext) -> None:
        """Read and check the settings; no I/O.

        Raises:
            SettingsError: A ``SIDECAR_UCX__*`` setting or the peer addressing settings are invalid.
        """
        super().__init__(ctx)
        self.options = load_settings(UcxSettings)
        self._addressing = Addressing(ctx.settings)
        token = ctx.settings.auth_token
        self._token = token.get_secret_value() if token is not None else None
        if self._token is not None and len(self._token) < MIN_TOKEN_CHARS:
            logger.warning(
                "SIDECAR_AUTH_TOKEN has %d characters: a listener impostor could guess a short token offline "
                "from this sidecar's proof; use a long random one, such as secrets.token_hex(32) makes",
                len(self._token),
            )
        self._worker: UcxWorker | None = None
        self._listener: Any = None
        self._links: dict[int, Link] = {}
        self._routes = PartRoutes()
        self._connecting: dict[int, asyncio.Task[Link]] = {}
        self._inbound: set[Inbound] = set()
        self._pool = HostPool(self.options.host_pool_bytes)
        self._closed = False
        #: Named in every hello this transport sends: the peers tell a reconnection from a restart by it.
        self._incarnation = wire.new_nonce()
        #: Ranks whose connection in broke, in their grace to connect again.
        self._absences = Absences(ctx.inbox)

    def _recv_device(self) -> torch.device:
        """``SIDECAR_RECV_DEVICE`` with its index (the sidecar checked that this process has it)."""
        device = torch.device(self.ctx.settings.recv_device)
        if device.type != "cuda":
            return device
        return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())

    def _cuda_device(self, recv_device: torch.device) -> int | None:
        """The CUDA device UCX's own threads work on (``thread`` modes only)."""
        if recv_device.type == "cuda":
            return recv_device.index
        if self.options.progress_mode.startswith("thread") and torch.cuda.is_available():
            return torch.cuda.current_device()
        return None

    async def start(self) -> None:
        """Create the UCX worker and listen on this rank's port.

        Raises:
            PeerUnreachableError: The port cannot be listened on (another process has it).
        """
        rank = self.ctx.rank
        recv_device = self._recv_device()
        port = self._addressing.listen_port(rank)
        # ucxx sets UCX_MEMTYPE_CACHE, which this UCX no longer reads; keep UCX from warning about it.
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        self._worker = worker = UcxWorker(self.ctx.loop, self.options.progress_mode, self._cuda_device(recv_device))
        self._serve = ServeOptions(
            rank=rank,
            inbox=self.ctx.inbox,
            token=self._token,
            max_bytes=self.ctx.settings.max_buffered_bytes,
            recv_device=recv_device,
            handshake_timeout=self.ctx.settings.connect_timeout,
            pool=self._pool,
            arriving=Arriving(),
            connections=self._inbound,
            absences=self._absences,
        )
        try:
            self._listener = worker.api.UCXListener.create(
                worker.worker, port, self._on_connection_request, deliver_endpoint=True
            )
        except Exception as exc:
            await worker.close()
            raise PeerUnreachableError(
                f"rank {rank} cannot listen on port {port} over ucx: {describe_error(exc)}. Another process may hold "
                "the port: stop it, or change SIDECAR_BASE_PORT / SIDECAR_PEERS"
            ) from None
        logger.info("ucx: rank %d listening on port %d (progress mode %s)", rank, port, self.options.progress_mode)

    def after_fork(self) -> None:
        """Take this forked child's copies of the parent's sockets on this rank's port (see :class:`Transport`).

        UCX keeps its descriptors to itself, so they are found by what they are: TCP sockets whose
        local port is the one this rank listens on (the listener, and the connections it accepted).
        Each is replaced by ``/dev/null`` rather than closed, so that its number stays taken: UCX's
        state in this process still names it, and must not come to name another file. Connections
        this sidecar opened to its peers stay open in a child that outlives it (nothing tells them
        apart from the program's own).
        """
        if self._listener is None:
            return
        port = self._listener.port
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            for fd in _fds():
                if _tcp_port(fd) == port:
                    os.dup2(null, fd, inheritable=False)
        finally:
            os.close(null)

    @staticmethod
    def _tag_base() -> int:
        """A fresh, random tag base for one connection (its low bits are the message kinds).

        UCX matches a tagged receive against messages from every connection of the worker, the
        ones that have not shaken hands yet included. Tag bases are therefore random and only told
        to a peer that proved it holds the auth token (acknowledgement tags are not told at all:
        both sides work them out, see :class:`~transports.ucx._wire.Transcript`): a connection that
        did not prove it cannot aim messages at another's frames or acknowledgements. (Two
        connections drawing the same base out of 2**62 is as unlikely as guessing one.)
        """
        return secrets.randbits(62) * wire.TAG_KINDS

    # -- accepting ----------------------------------------------------------------------------

    def _on_connection_request(self, handle: Any) -> None:
        """UCX accepted a connection (called from UCX's progress, possibly on its thread)."""
        if self._worker is not None:
            self._worker.call_on_loop(self._accept, handle)

    def _accept(self, handle: Any) -> None:
        if self._closed or self._worker is None:
            return
        inbound = Inbound(self._serve, self._tag_base(), self._inbound.discard)
        try:
            inbound.attach(Endpoint(self._worker, handle, inbound.on_broken))
        except ConnectionError:
            return  # the peer went away before it was accepted
        self._inbound.add(inbound)
        inbound.start()

    # -- sending ------------------------------------------------------------------------------

    async def send(self, dst: int, frame: Frame) -> None:
        """Deliver ``frame`` to ``dst``, connecting first if needed (see :class:`Transport`).

        Raises:
            PeerUnreachableError: ``dst`` cannot be connected to within ``SIDECAR_CONNECT_TIMEOUT``.
            PeerLostError: The connection broke before ``dst`` acknowledged, or between two parts of a
                message (see :class:`sidecar_core.PartRoutes`).
            RemoteError: ``dst``'s inbox refused the frame.
            AuthenticationError: ``dst`` refused this sidecar's auth token.
        """
        async with self._routes.route(dst, frame.header, lambda: self._link(dst)) as link:
            await link.send(frame)

    def send_nowait(self, dst: int, frame: Frame, done: Callable[[Exception | None], None]) -> bool:
        """Send ``frame`` to an open connection from the calling thread (see :meth:`Link.send_nowait`).

        Declines (returns ``False``) while there is no open connection to ``dst`` and for a CUDA
        frame whose device still has work queued; :meth:`send` handles those on the loop.
        """
        link = self._links.get(dst)
        return link is not None and link.send_nowait(frame, done)

    def abandon(self, dst: int, frame: Frame) -> None:
        """Close the link to ``dst`` if UCX may still read ``frame``'s payload from its caller's memory.

        The core gave up on a frame :meth:`send_nowait` took (see :meth:`sidecar_core.Transport.abandon`).
        A frame whose payload rode in its header message, or whose payload requests completed, is
        no longer read: the link stays, and the frame may still be stored. Otherwise closing cancels
        the link's messages, as a cancelled :meth:`send` does; its other unacknowledged frames fail
        with :class:`PeerLostError`, and the transport connects again at once, so that the peer
        does not report this rank lost (see :data:`~transports.ucx._inbound.RECONNECT_GRACE`).
        """
        link = self._links.get(dst)
        if link is not None and link.reads_callers_memory(frame):
            link.close(
                f"a send over it did not complete within SIDECAR_SEND_TIMEOUT ({frame.header.describe()})",
                given_up=True,
            )

    async def _link(self, dst: int) -> Link:
        """The open link to ``dst``, connecting first if there is none."""
        link = self._links.get(dst)
        if link is not None and not link.closed:
            return link
        # Shielded: one cancelled send must not cancel the connection other sends wait for.
        return await asyncio.shield(self._connection(dst))

    def _connection(self, dst: int) -> asyncio.Task[Link]:
        """The task connecting to ``dst``, started unless one is under way (loop thread)."""
        task = self._connecting.get(dst)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(dst), name=f"sidecar-ucx-connect-{dst}")
            self._connecting[dst] = task
            task.add_done_callback(lambda done: self._connected(dst, done))
        return task

    def _connected(self, dst: int, task: asyncio.Task[Link]) -> None:
        if self._connecting.get(dst) is task:
            del self._connecting[dst]
        if not task.cancelled():
            task.exception()  # every waiter got it; do not report it again when the task is freed

    async def _connect(self, dst: int) -> Link:
        if self._worker is None or self._closed:
            raise PeerUnreachableError(f"cannot connect to rank {dst}: the ucx transport is not running")
        link = await connect(
            self._worker,
            dst,
            self._addressing.resolve(dst),
            own_rank=self.ctx.rank,
            incarnation=self._incarnation,
            token=self._token,
            timeout=self.ctx.settings.connect_timeout,
            on_closed=self._forget,
        )
        if self._closed:
            link.close("this sidecar is shutting down")
        elif not link.closed:  # a connection that broke right after the handshake is not kept
            self._links[dst] = link
        return link

    def _forget(self, link: Link) -> None:
        """A link closed (loop thread); one given up on purpose is made again at once.

        Its peer then sees this sidecar connect again, as the same process, within its
        :data:`~transports.ucx._inbound.RECONNECT_GRACE`, and keeps waiting for this rank's data
        instead of reporting it lost. A connection that cannot be made is left to the next send.
        """
        if self._links.get(link.rank) is link:
            del self._links[link.rank]
        if link.given_up and not self._closed:
            self._connection(link.rank).add_done_callback(_log_failed_reconnection)

    def describe_peer(self, rank: int) -> str:
        """``rank N at host:port``, as this sidecar resolves it."""
        try:
            return f"rank {rank} at {self._addressing.resolve(rank)}"
        except PeerUnreachableError:
            return f"rank {rank} (not in SIDECAR_PEERS)"

    # -- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close connections, the listener and the worker. Never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            for task in list(self._connecting.values()):
                task.cancel()
            self._absences.close()
            for link in list(self._links.values()):
                link.close("this sidecar is shutting down")
            for inbound in list(self._inbound):
                inbound.close()
            self._listener = None
            await asyncio.sleep(0)  # let cancelled tasks unwind before the worker goes
        except Exception:
            logger.exception("closing the ucx transport failed")
        if self._worker is not None:
            with contextlib.suppress(Exception):
                await self._worker.close()
        self._pool.clear()
