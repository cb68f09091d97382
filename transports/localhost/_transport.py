"""The localhost transport: processes on one host, Unix sockets for control, shared memory for data.

Sending a frame to rank ``dst`` (on the event-loop thread, see :class:`sidecar_core.Transport`):

1. Reuse the :class:`~._link.Link` to ``dst``, or connect to ``<socket_dir>/rank-<dst>.sock`` and
   shake hands (auth token) first; concurrent sends share one connection attempt.
2. Payloads up to ``SIDECAR_LOCALHOST__SHM_THRESHOLD`` bytes go inline on the socket (scatter/gather,
   no extra copy in Python). Larger CPU payloads are copied once into a slot of this sidecar's pool
   (:mod:`._shm`), and the receiver delivers zero-copy views of that slot; a broadcast to several
   ranks copies once and shares the slot. CUDA payloads are staged through the pinned pool, or
   shared as CUDA IPC handles when ``SIDECAR_LOCALHOST__CUDA_IPC`` is on (:mod:`._cuda`).
3. Wait for the peer's acknowledgement; its inbox errors come back as :class:`RemoteError`.

Fast path: :meth:`LocalhostTransport.send_nowait` writes a CPU frame to an established
connection without the loop (see :meth:`~._link.Link.post_threadsafe`): inline frames directly
from the caller's thread; shared-memory frames up to 4 MiB after copying them into a pool slot on
that thread; larger ones from a copy thread, once it has filled their slot. The loop thread only
reads the acknowledgement (and later the release) and hands it to the core's callback. The first
frame to a rank, CUDA frames, multi-frame messages and frames that find the pool full still go
through :meth:`LocalhostTransport.send` on the loop, so a small message may overtake a large one
sent just before it to the same rank.

Receiving: every accepted connection is an :class:`~._incoming.Incoming` that delivers to the inbox.

Cancellation: a cancelled ``send`` leaves the link open (messages are written whole) and returns
any pool slot it held once no copy is still writing it. Closing: stop listening, flush and close
every connection, unmap the pool, remove this rank's socket and lock files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sidecar_core import (
    Buffer,
    Frame,
    PartRoutes,
    PeerLostError,
    SidecarClosedError,
    Transport,
    TransportContext,
    encode_header,
    load_settings,
)
from sidecar_core._settings import env_name
from transports.localhost._copy import Copier, default_copy_threads
from transports.localhost._incoming import Incoming, ServeOptions
from transports.localhost._link import Link
from transports.localhost._protocol import (
    MAX_INLINE_PAYLOAD,
    SHM_PREFIX,
    U32,
    VERSION,
    Hello,
    IpcBuffers,
    Msg,
    slot_layout,
)
from transports.localhost._readers import Readers
from transports.localhost._rendezvous import RankClaim, default_socket_dir, prepare_dir, socket_path, sweep
from transports.localhost._shm import Lease, Pool, host_bytes

logger = logging.getLogger(__name__)

_MiB = 1 << 20
#: Copies at least this large run on a worker thread, so the loop keeps serving meanwhile.
_THREAD_COPY_BYTES = 1 * _MiB
#: Shared-memory frames up to this size that ``send_nowait`` copies on the sending thread (about
#: 0.4 ms at 10 GB/s): shorter than the hop to the loop and to a copy thread it saves.
_CALLER_COPY_BYTES = 4 * _MiB
#: The pool wait gives up this fraction into SIDECAR_SEND_TIMEOUT, so its error can say why.
_POOL_WAIT_SHARE = 0.95


class LocalhostSettings(BaseSettings):
    """Settings of the localhost transport (prefix ``SIDECAR_LOCALHOST__``)."""

    # An empty variable is unset, as in a shell (an empty socket directory would be the working directory).
    model_config = SettingsConfigDict(env_prefix="SIDECAR_LOCALHOST__", extra="ignore", env_ignore_empty=True)

    socket_dir: Path | None = Field(
        None,
        description="Directory of the ranks' Unix sockets; created with mode 0700, must be private to this user "
        "(default `/tmp/sidecar-<uid>`).",
    )
    shm_threshold: int = Field(
        64 << 10,
        ge=0,
        le=MAX_INLINE_PAYLOAD,
        description="Frames with more payload bytes than this travel through shared memory; smaller ones inline "
        "on the socket.",
    )
    pool_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        le=1 << 40,
        description="Size of each sidecar's shared-memory send pool. A send waits while it is full (receivers free "
        "slots with mark_done); messages over half of it are split into parts.",
    )
    copy_threads: int = Field(
        0,
        ge=0,
        le=64,
        description="Threads that copy large frames into shared memory, one frame each, so that `send` returns "
        "at once and the event loop keeps serving; 0 picks 2 (1 on a single CPU). There each writable buffer of "
        "1 MiB or more is copied by torch over its intra-op threads, as many as `torch.set_num_threads` (or "
        "`OMP_NUM_THREADS`) gave when that copy thread first copied.",
    )
    pool_trim_seconds: float = Field(
        30.0,
        ge=0,
        description="Once no send has taken a pool slot for this many seconds, the pool's pages above the slots "
        "still in use go back to the system (0: never); later sends populate them again. A pool that has staged "
        "CUDA tensors stays pinned and is never trimmed; one that a peer receiving on a GPU reads is not trimmed "
        "while that peer is connected.",
    )
    cuda_ipc: bool = Field(
        False,
        description="Send CUDA tensors to same-host peers that receive on a GPU as CUDA IPC handles (zero-copy) "
        "instead of staging them through pinned shared memory.",
    )
    recv_poll_us: int = Field(
        1000,
        ge=0,
        le=10_000,
        description="Microseconds a thread waiting in `recv_sync` (or on a send's `result()`) reads the sockets "
        "itself, polling without sleeping, before it sleeps until the loop delivers (0: never). A reply or "
        "acknowledgement that comes within it is handled on that thread, without waking the loop; it costs that "
        "much CPU per wait. The default covers a round trip on a busy machine: with 200, round trips slower than "
        "that fell back to the loop and the p99 of small objects was 2 to 3 times higher on 2 cores.",
    )


@dataclass(slots=True)
class _Shared:
    """A CPU frame's slot, shared by every destination the frame goes to."""

    frame: Frame
    lease: Lease
    copied: asyncio.Future[None]


class _Keep:
    """Keeps a frame's CUDA buffers alive until the receiver releases them."""

    def __init__(self, buffers: list[Buffer]) -> None:
        self.buffers: list[Buffer] | None = buffers

    def release(self) -> None:
        self.buffers = None


class LocalhostTransport(Transport):
    """Moves frames between sidecars on one host (see the module docstring)."""

    name: ClassVar[str] = "localhost"

    @classmethod
    def test_environment(cls, workdir: Path) -> dict[str, str]:
        """A private socket directory inside ``workdir``."""
        return {env_name(LocalhostSettings, "socket_dir"): os.fspath(workdir / "localhost")}

    def __init__(self, ctx: TransportContext) -> None:
        """Read the settings; no I/O until :meth:`start`.

        Raises:
            SettingsError: A ``SIDECAR_LOCALHOST__*`` variable is invalid.
        """
        super().__init__(ctx)
        self.settings = load_settings(LocalhostSettings)
        self.max_part_bytes = self.settings.pool_bytes // 2
        self._dir = self.settings.socket_dir or default_socket_dir()
        self._pool = Pool(self.settings.pool_bytes)
        self._copier = Copier(self.settings.copy_threads or default_copy_threads())
        self._pinning: asyncio.Future[bool] | None = None
        self._trim_timer: asyncio.TimerHandle | None = None
        self._links: dict[int, Link] = {}
        self._routes = PartRoutes()
        self._connecting: dict[int, asyncio.Task[Link]] = {}
        self._incoming: set[Incoming] = set()
        self._shared: dict[int, _Shared] = {}
        #: Copies of fast-path frames still running on a copy thread, by ``id(frame)`` (see :meth:`abandon`).
        self._copying: dict[int, concurrent.futures.Future[None]] = {}
        self._claim: RankClaim | None = None
        self._readers: Readers | None = None
        self._poll_seconds = self.settings.recv_poll_us / 1e6
        self._acceptor: asyncio.Task[None] | None = None
        #: Set when :meth:`close` starts: no connection is made after that.
        self._closing = False
        token = ctx.settings.auth_token
        self._token = token.get_secret_value() if token is not None else None

    async def start(self) -> None:
        """Claim this rank's socket (removing stale ones) and start accepting peers.

        Raises:
            SettingsError: The socket directory is not private to this user, or its path is too long.
            PeerUnreachableError: A live sidecar already serves this rank, or the socket cannot be bound.
        """
        self._dir = prepare_dir(self._dir, env_name(LocalhostSettings, "socket_dir"))
        stale = sweep(self._dir)
        if stale:
            logger.info("removed stale sockets of ranks %s in %s", stale, self._dir)
        self._claim = RankClaim(self._dir, self.ctx.rank)
        self._readers = Readers(self.ctx.loop)
        self._acceptor = self.ctx.loop.create_task(self._accept(self._claim, self._readers))
        if self.settings.pool_trim_seconds:
            self._trim_timer = self.ctx.loop.call_later(self.settings.pool_trim_seconds, self._trim, 0)

    async def _accept(self, claim: RankClaim, readers: Readers) -> None:
        options = ServeOptions(
            rank=self.ctx.rank,
            token=self._token,
            recv_device=self.ctx.settings.recv_device,
            cuda_ipc=self.settings.cuda_ipc,
            hello_timeout=self.ctx.settings.connect_timeout,
            max_bytes=self.ctx.settings.max_buffered_bytes,
            connections=self._incoming,
        )
        while True:
            try:
                sock, _ = await self.ctx.loop.sock_accept(claim.listener)
            except OSError as exc:  # out of file descriptors, for example: keep serving the others
                logger.error("rank %d cannot accept a connection at %s: %s", self.ctx.rank, claim.path, exc)
                await asyncio.sleep(0.1)
                continue
            try:
                self._incoming.add(Incoming(sock, self.ctx.inbox, options, readers, self._incoming.discard))
            except OSError as exc:
                logger.error("rank %d dropped a connection it could not set up: %s", self.ctx.rank, exc)
                sock.close()

    def after_fork(self) -> None:
        """Close this forked child's copies of the parent's sockets and rank lock (see :class:`Transport`)."""
        if self._claim is not None:
            self._claim.close_copies()
        for channel in [link.channel for link in self._links.values()] + [i.channel for i in self._incoming]:
            channel.sock.close()

    def describe_peer(self, rank: int) -> str:
        """``rank N at <socket path>``."""
        return f"rank {rank} at {socket_path(self._dir, rank)}"

    # -- sending ------------------------------------------------------------------------------

    async def send(self, dst: int, frame: Frame) -> None:
        """Deliver ``frame`` to ``dst`` and wait for its acknowledgement (see :class:`Transport`).

        Raises:
            PeerUnreachableError: Nothing listens on ``dst``'s socket within the connect timeout.
            PeerLostError: The connection broke before ``dst`` acknowledged, or between two parts of a
                message (see :class:`sidecar_core.PartRoutes`).
            RemoteError: ``dst`` refused the frame; its reason is in the message.
            AuthenticationError: ``dst`` refused this sidecar's auth token.
            CapacityError: The pool stayed full for the whole send timeout.
        """
        loop = self.ctx.loop
        deadline = loop.time() + self.ctx.settings.send_timeout * _POOL_WAIT_SHARE
        async with self._routes.route(dst, frame.header, lambda: self._link(dst)) as link:
            await self._send_on(link, frame, deadline)

    async def _send_on(self, link: Link, frame: Frame, deadline: float) -> None:
        """Send ``frame`` over ``link`` and wait for its acknowledgement (see :meth:`send`)."""
        header = frame.header
        what = header.describe()
        on_gpu = [not isinstance(b, memoryview) and b.is_cuda for b in frame.buffers]
        if header.frame_bytes <= self.settings.shm_threshold:
            parts: list[bytes | memoryview] = [encode_header(header), *(self._host_view(b) for b in frame.buffers)]
            seq, acked = link.post(Msg.FRAME, parts, what)
        elif all(on_gpu) and self.settings.cuda_ipc and link.welcome is not None and link.welcome.cuda_ipc:
            seq, acked = self._post_ipc(link, frame)
        elif any(on_gpu):
            seq, acked = await self._post_staged(link, frame, deadline)
        else:
            seq, acked = await self._post_shm(link, frame, deadline)
        try:
            await acked
        except asyncio.CancelledError:
            link.forget(seq)
            link.channel.copy_queued()  # what the socket has not taken may be the caller's memory
            raise

    def send_nowait(self, dst: int, frame: Frame, done: Callable[[Exception | None], None]) -> bool:
        """Send a CPU frame to an open connection from the calling thread (any thread).

        Inline frames go on the socket at once. Frames for shared memory take a pool slot here;
        those of at most :data:`_CALLER_COPY_BYTES` are copied into it on this thread (a copy that
        short costs less than the hop to a copy thread) and announced from here, larger ones are
        copied and announced by a copy thread, so this call returns at once.

        Declines (returns ``False``, having changed nothing) while there is no open connection to
        ``dst``, before the connection has the pool, while the pool has no room (the loop's send
        waits for it), when a copy on this thread fails (the loop's send copies again and reports
        the error), and for CUDA frames; :meth:`send` handles those on the loop. Otherwise ``done``
        gets the outcome :meth:`send` would return or raise (see
        :meth:`sidecar_core.Transport.send_nowait`), a failed copy on a copy thread included.
        """
        link = self._links.get(dst)
        if link is None or link.channel.closed is not None:
            return False
        header = frame.header
        buffers: list[memoryview] = []
        for buf in frame.buffers:
            if not isinstance(buf, memoryview):
                if buf.is_cuda:
                    return False
                buf = host_bytes(buf)
            buffers.append(buf)
        if header.frame_bytes <= self.settings.shm_threshold:
            link.post_threadsafe(Msg.FRAME, [encode_header(header), *buffers], header.describe(), done)
            return True
        if not link.pool_shared:
            return False
        offsets, span = slot_layout(header.sizes)
        lease = self._pool.try_acquire(span)
        if lease is None:
            return False
        parts = [SHM_PREFIX.pack(lease.offset, span), encode_header(header)]
        if header.frame_bytes > _CALLER_COPY_BYTES:
            job = self._copier.submit(lease.view(), buffers, offsets)
            self._copying[id(frame)] = job
            job.add_done_callback(lambda job: self._copying.pop(id(frame), None))
            job.add_done_callback(lambda job: self._announce(link, lease, parts, header.describe(), done, job))
            return True
        try:
            self._copier.copy(lease.view(), buffers, offsets)
        except Exception:
            self._release_soon(lease)
            return False
        link.post_threadsafe(Msg.SHM_FRAME, parts, header.describe(), done, lease)
        return True

    def poll_while_waiting(self, ready: Callable[[], bool]) -> None:
        """Read the sockets on this thread for up to ``SIDECAR_LOCALHOST__RECV_POLL_US``, until ``ready()``.

        Called by a thread waiting in ``recv_sync`` or on a send's ``result()``.

        Inline frames and the acknowledgements of frames sent from callers' threads are handled
        right here; anything else goes to the loop (see :mod:`._readers`).
        """
        if self._readers is not None:
            self._readers.poll_here(ready, self._poll_seconds)

    def abandon(self, dst: int, frame: Frame) -> None:
        """Stop reading a timed-out fast-path frame's buffers (see :meth:`sidecar_core.Transport.abandon`).

        A copy into the pool still running is waited for (it reads the caller's memory, briefly);
        bytes of an inline frame that the socket has not taken yet are copied. The frame itself still
        goes out whole, so that the connection's stream stays intact, and the peer may store it.
        """
        job = self._copying.get(id(frame))
        if job is not None:
            concurrent.futures.wait([job])
        link = self._links.get(dst)
        if link is not None:
            link.channel.copy_queued()

    def _announce(
        self,
        link: Link,
        lease: Lease,
        parts: list[bytes],
        what: str,
        done: Callable[[Exception | None], None],
        job: concurrent.futures.Future[None],
    ) -> None:
        """A copy thread filled a fast-path frame's slot: announce the frame, or report the failed copy."""
        error = job.exception()  # a copy's future cannot be cancelled
        if error is None:
            link.post_threadsafe(Msg.SHM_FRAME, parts, what, done, lease)
            return
        self._release_soon(lease)
        done(error if isinstance(error, Exception) else RuntimeError(str(error)))

    def _release_soon(self, lease: Lease) -> None:
        """Return a slot from any thread (slots are released on the loop)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed, and the pool with it
            self.ctx.loop.call_soon_threadsafe(lease.release)

    async def _link(self, dst: int) -> Link:
        link = self._links.get(dst)
        if link is not None and link.channel.closed is None:
            return link
        task = self._connecting.get(dst)
        if task is None:
            task = self.ctx.loop.create_task(self._connect(dst))
            self._connecting[dst] = task
            task.add_done_callback(lambda t: self._connect_done(dst, t))
        return await asyncio.shield(task)

    async def _connect(self, dst: int) -> Link:
        if self._closing:  # a send that raced the shutdown: its connection would never be closed
            raise self._closing_error(dst)
        hello = Hello(version=VERSION, rank=self.ctx.rank, pid=os.getpid(), token=self._token)
        assert self._readers is not None  # started
        link = await Link.connect(
            dst, socket_path(self._dir, dst), hello, self.ctx.settings.connect_timeout, self._readers, self._link_closed
        )
        if self._closing:
            await link.close()
            raise self._closing_error(dst)
        if link.channel.closed is not None:  # it ended in the read that brought its WELCOME
            raise PeerLostError(
                f"the connection to {link.describe} closed right after the handshake: {link.channel.closed}"
            )
        self._links[dst] = link
        if link.welcome is not None and link.welcome.pins_pool:
            # Page-locking its mapping faults in the whole pool: the trim after it has left frees it all.
            self._pool.trim_all_next()
        return link

    def _closing_error(self, dst: int) -> SidecarClosedError:
        return SidecarClosedError(f"rank {self.ctx.rank} is shutting down: no new connection to rank {dst}")

    def _connect_done(self, dst: int, task: asyncio.Task[Link]) -> None:
        if self._connecting.get(dst) is task:
            del self._connecting[dst]
        if not task.cancelled():
            task.exception()  # retrieved by the senders that waited; do not log it again

    def _pinned_by_peer(self) -> bool:
        """Whether a connected receiver page-locks its mapping of the pool (loop thread).

        Trimming would then part the pool's pages from the locked ones, and later frames would
        reach that receiver's GPU with old bytes. Once it is gone, the pool may shrink again.
        """
        return any(link.welcome is not None and link.welcome.pins_pool for link in self._links.values())

    def _link_closed(self, link: Link) -> None:
        if self._links.get(link.rank) is link:
            del self._links[link.rank]

    @staticmethod
    def _host_view(buf: Buffer) -> memoryview:
        if isinstance(buf, memoryview):
            return buf
        if buf.is_cuda:
            from transports.localhost._cuda import to_host

            return to_host(buf)
        return host_bytes(buf)

    def _holders(self) -> str:
        held = [f"rank {link.rank}: {link.held} frames" for link in self._links.values() if link.held]
        return "by " + ", ".join(held) if held else "by copies still in progress"

    async def _post_shm(self, link: Link, frame: Frame, deadline: float) -> tuple[int, asyncio.Future[None]]:
        offsets, span = slot_layout(frame.header.sizes)
        lease = await self._fill(frame, offsets, span, deadline)
        try:
            link.share_pool(self._pool.fd, self._pool.capacity)
            prefix = SHM_PREFIX.pack(lease.offset, span)
            return link.post(Msg.SHM_FRAME, [prefix, encode_header(frame.header)], frame.header.describe(), lease)
        except BaseException:
            lease.release()
            raise

    async def _fill(self, frame: Frame, offsets: list[int], span: int, deadline: float) -> Lease:
        """A slot holding ``frame``'s buffers: copied now, or shared with another destination's send."""
        key = id(frame)
        shared = self._shared.get(key)
        if shared is not None and shared.frame is frame:
            shared.lease.retain()
        else:
            lease = await self._pool.acquire(span, deadline - self.ctx.loop.time(), self._holders)
            shared = _Shared(frame, lease, self.ctx.loop.create_future())
            self._shared[key] = shared
            lease.on_free = lambda: self._forget_shared(key, lease)
            self._copy(shared, offsets)
        try:
            await asyncio.shield(shared.copied)
        except BaseException:
            shared.lease.release()
            await asyncio.wait([shared.copied])  # the copy reads the caller's tensor: it ends before the caller hears
            raise
        return shared.lease

    def _copy(self, shared: _Shared, offsets: list[int]) -> None:
        lease = shared.lease
        lease.retain()  # the copy's own hold: the slot cannot be reused while it is being written

        def finished(error: BaseException | None) -> None:
            if error is None:
                shared.copied.set_result(None)
            else:
                shared.copied.set_exception(error)
                shared.copied.exception()  # every waiter re-raises it; never log it as unretrieved
            lease.release()

        if shared.frame.header.frame_bytes < _THREAD_COPY_BYTES:
            try:
                self._copier.copy(lease.view(), shared.frame.buffers, offsets)
            except Exception as exc:
                finished(exc)
            else:
                finished(None)
            return
        loop = self.ctx.loop

        def copied(job: concurrent.futures.Future[None]) -> None:  # on a copy thread, once every byte is there
            with contextlib.suppress(RuntimeError):  # the loop is closed: the sidecar shut down
                loop.call_soon_threadsafe(finished, job.exception())

        self._copier.submit(lease.view(), shared.frame.buffers, offsets).add_done_callback(copied)

    def _forget_shared(self, key: int, lease: Lease) -> None:
        shared = self._shared.get(key)
        if shared is not None and shared.lease is lease:
            del self._shared[key]

    async def _post_staged(self, link: Link, frame: Frame, deadline: float) -> tuple[int, asyncio.Future[None]]:
        from transports.localhost import _cuda

        loop = self.ctx.loop
        offsets, span = slot_layout(frame.header.sizes)
        lease = await self._pool.acquire(span, deadline - loop.time(), self._holders)
        try:
            if self._pinning is None:
                device = next(b.device for b in _cuda.tensors(frame.buffers) if b.is_cuda)
                self._pinning = loop.run_in_executor(None, _cuda.pin, self._pool.region, device)
            await asyncio.shield(self._pinning)
            link.share_pool(self._pool.fd, self._pool.capacity)
            prefix = SHM_PREFIX.pack(lease.offset, 0)
            seq, acked = link.post(Msg.SHM_FRAME, [prefix, encode_header(frame.header)], frame.header.describe(), lease)
        except BaseException:
            lease.release()
            raise
        lease.retain()  # the copy's own hold

        def notify(nbytes: int) -> None:
            loop.call_soon_threadsafe(link.ready, seq, nbytes)

        def finished(job: asyncio.Future[None]) -> None:
            error = None if job.cancelled() else job.exception()
            if error is not None:
                link.abort(seq, error)
            lease.release()

        job = loop.run_in_executor(None, _cuda.stage_out, frame.buffers, lease.view()[:span], offsets, notify)
        job.add_done_callback(finished)
        try:
            await asyncio.shield(job)
        except BaseException:
            link.forget(seq)
            # The copy reads the caller's tensor: it ends before the caller hears that the send failed.
            await asyncio.wait([job])
            raise
        return seq, acked

    def _post_ipc(self, link: Link, frame: Frame) -> tuple[int, asyncio.Future[None]]:
        from transports.localhost import _cuda

        descriptors = IpcBuffers(buffers=[_cuda.export_ipc(b) for b in _cuda.tensors(frame.buffers)])
        body = descriptors.model_dump_json().encode()
        parts = [U32.pack(len(body)), body, encode_header(frame.header)]
        return link.post(Msg.IPC_FRAME, parts, frame.header.describe(), _Keep(list(frame.buffers)))

    def _trim(self, acquired: int) -> None:
        """Every ``pool_trim_seconds``: trim the pool if no send took a slot since the last check."""
        pool = self._pool
        if pool.acquired == acquired and self._pinning is None and not self._pinned_by_peer():
            released = pool.trim()
            if released:
                logger.debug("rank %d gave %d idle pool bytes back", self.ctx.rank, released)
        self._trim_timer = self.ctx.loop.call_later(self.settings.pool_trim_seconds, self._trim, pool.acquired)

    # -- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop listening, flush and close every connection, release the pool. Idempotent; never raises."""
        if self._closing:
            return
        self._closing = True
        try:
            if self._trim_timer is not None:
                self._trim_timer.cancel()
            if self._acceptor is not None:
                self._acceptor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._acceptor
            connecting = list(self._connecting.values())
            for task in connecting:
                task.cancel()
            # Their connections close as they unwind, which needs the readers still open.
            await asyncio.gather(*connecting, return_exceptions=True)
            for incoming in list(self._incoming):
                await incoming.close()
            for link in list(self._links.values()):
                await link.close()
            if self._readers is not None:
                self._readers.close()
            if self._claim is not None:
                self._claim.release()
            if self._pool.is_open:
                if self._pinning is not None and self._pinning.done() and self._pinning.result():
                    from transports.localhost import _cuda

                    _cuda.unpin(self._pool.region)
                self._pool.close()
            self._copier.close()
        except Exception:
            logger.exception("closing the localhost transport of rank %d failed", self.ctx.rank)
