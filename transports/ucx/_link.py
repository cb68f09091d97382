"""The connection from this sidecar to one peer rank: frames out, acknowledgements back.

One :class:`Link` per destination rank, made on the first send and kept until it breaks; the next
send after a break makes a new one.

Sending a frame submits its header message and its payload buffers back to back (no ``await`` in
between, so concurrent sends never interleave on a tag), straight from the frame's memory (host
memory, or CUDA memory that UCX moves by CUDA IPC or GPUDirect), then waits for the peer's
acknowledgement. Host payloads of at most 8 KiB ride inline in the header message instead. Any
number of frames may be in flight on one link.

Two ways in: the coroutine :meth:`Link.send`, and :meth:`Link.send_nowait`, which the caller's
thread uses for a frame to an open link. It encodes the header message and submits the messages
there (UCX workers made by ucxx serve several threads), and the acknowledgement settles the
caller's ``done``: no task, no coroutine, no future crosses threads, and the loop is not woken for
a message that leaves at once. In the thread progress modes the loop submits them instead, in one
callback.

Concurrency: loop thread only, except :meth:`Link.send_nowait` (any thread). Acknowledgement
waiters are filed from any thread but only ever called on the loop thread (or, once the loop has
stopped, on the thread whose submission failed). Cancellation: a
cancelled ``send`` closes the link (its messages may be half sent), so the next send connects
again. Closing: :meth:`Link.close` fails every unacknowledged send with :class:`PeerLostError`; a
broken connection does the same.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sidecar_core import (
    AuthenticationError,
    Buffer,
    Frame,
    PeerLostError,
    PeerUnreachableError,
    RemoteError,
    buffer_nbytes,
)
from transports.ucx import _wire as wire
from transports.ucx._addressing import Address
from transports.ucx._endpoint import Endpoint, describe_error
from transports.ucx._worker import UcxWorker

logger = logging.getLogger(__name__)

#: What an unacknowledged frame's waiter gets when the link closes.
_CLOSED = object()


def cuda_devices(buffers: Sequence[Buffer]) -> set[torch.device]:
    """The CUDA devices the buffers live on."""
    return {buf.device for buf in buffers if isinstance(buf, torch.Tensor) and buf.is_cuda}


@functools.cache
def _default_stream(device: torch.device) -> torch.cuda.Stream:
    """The legacy default stream of ``device`` (made once: torch builds a new object per call)."""
    return torch.cuda.default_stream(device)


def cuda_idle(device: torch.device) -> bool:
    """Whether the legacy default stream of ``device`` (with its index, as a tensor's device has) has no work queued."""
    return _default_stream(device).query()


async def wait_cuda_idle(buffers: Sequence[Buffer]) -> None:
    """Wait until work queued on the legacy default stream of the buffers' devices is done.

    UCX copies CUDA memory on streams of its own, which do not wait for the default stream: a
    tensor still being written there must be finished first. Tensors written on other streams must
    be synchronized by the caller before ``send``.
    """
    for device in cuda_devices(buffers):
        if not cuda_idle(device):
            await asyncio.get_running_loop().run_in_executor(None, _default_stream(device).synchronize)


def _inline(buffers: Sequence[Buffer]) -> list[memoryview] | None:
    """Host buffers as byte views when they are small enough to ride in the header message."""
    if sum(buffer_nbytes(buf) for buf in buffers) > wire.INLINE_MAX:
        return None
    views = []
    for buf in buffers:
        if isinstance(buf, torch.Tensor):
            if buf.is_cuda:
                return None
            buf = buf.numpy().data
        views.append(buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf)
    return views


class Link:
    """An open, handshaken connection to ``rank`` (build it with :func:`connect`)."""

    def __init__(
        self,
        endpoint: Endpoint,
        rank: int,
        address: Address,
        tag_base: int,
        ack_tag: int,
        on_closed: Callable[[Link], None],
    ) -> None:
        self.rank = rank
        self.describe = _describe(rank, address)
        self._endpoint = endpoint
        self._worker = endpoint.worker
        self._header_tag = tag_base | wire.HEADER
        self._payload_tag = tag_base | wire.PAYLOAD
        self._ack_tag = ack_tag
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._seqs = itertools.count()
        #: Per unacknowledged frame: what takes its outcome (``None``: accepted; a
        #: :class:`~transports.ucx._wire.Problem`: refused; :data:`_CLOSED`: the link closed first).
        self._acks: dict[int, Callable[[wire.Problem | object | None], None]] = {}
        #: The payload requests of frames submitted by :meth:`send_nowait`, until acknowledged: UCX may
        #: read the caller's memory until they complete (see :meth:`reads_callers_memory`).
        self._payloads: dict[int, tuple[Frame, list[Any]]] = {}
        #: Held while a caller's thread files a waiter and while closing takes them all, so that no
        #: waiter is filed in a table that closing has already emptied.
        self._filing = threading.Lock()
        self._reason = ""
        self.closed = False
        #: Closed on purpose while the connection worked (see :meth:`close`).
        self.given_up = False
        self._ack_buf = bytearray(wire.ACK_MESSAGE_BYTES)
        self._read_ack()

    def _read_ack(self) -> None:
        """Post the receive of the next acknowledgement; :meth:`_on_ack` takes it."""
        if self.closed:
            return
        try:
            self._endpoint.recv_then(self._ack_buf, self._ack_tag, self._on_ack, idle=True)
        except Exception as exc:  # the endpoint is closed or broken
            self.close(describe_error(exc))

    def _on_ack(self, error: Exception | None) -> None:
        if self.closed:
            return
        if error is not None:
            self.close(describe_error(error))
            return
        view = memoryview(self._ack_buf)
        try:
            seq, problem, closing = wire.parse_ack(view)  # before the waiter is taken: closing fails it
            with self._filing:  # against send_nowait filing the frame's payloads
                waiter = self._acks.pop(seq, None)
                self._payloads.pop(seq, None)
            if waiter is None:
                raise wire.ProtocolError(f"acknowledgement for unknown frame {seq}")
        except wire.ProtocolError as exc:
            self.close(f"it sent a malformed acknowledgement ({exc})")
            return
        waiter(problem)  # never raises: it sets a future or calls the core's outcome callback
        if closing:
            assert problem is not None  # parse_ack returns a problem with every refusal
            self.close(f"it refused a frame and closed the connection ({problem.error})")
            return
        self._read_ack()

    @staticmethod
    def _messages(seq: int, frame: Frame, buffers: list[Buffer]) -> list[Buffer | bytes]:
        """The header message (with a small host payload inline), then any payload buffers."""
        inline = _inline(buffers)
        if inline is not None:
            return [wire.header_message(seq, frame.header, inline)]
        return [wire.header_message(seq, frame.header), *buffers]

    def _submit(self, messages: list[Buffer | bytes]) -> list[asyncio.Future[None]]:
        """Submit a frame's messages back to back (loop thread).

        Raises:
            ConnectionError: The endpoint is closed.
            Exception: UCX refused a message (the connection is broken).
        """
        sent = self._endpoint.submit(self._tagged(messages))
        return [self._worker.track(request, array, busy=array.cuda) for request, array in sent]

    def _tagged(self, messages: list[Buffer | bytes]) -> list[tuple[Buffer | bytes, int]]:
        header, *payloads = messages
        return [(header, self._header_tag), *((buf, self._payload_tag) for buf in payloads)]

    def _error(self, frame: Frame, outcome: wire.Problem | object | None) -> Exception | None:
        """What a send of ``frame`` raises for an acknowledgement outcome (``None``: it succeeded)."""
        if outcome is _CLOSED:
            return self._lost(frame)
        if isinstance(outcome, wire.Problem):
            return RemoteError(f"{self.describe} refused {frame.header.describe()}: {outcome.error}: {outcome.message}")
        return None

    async def send(self, frame: Frame) -> None:
        """Send one frame and wait for the peer's acknowledgement.

        Raises:
            PeerLostError: The connection broke before the peer acknowledged.
            RemoteError: The peer's inbox refused the frame (its reason is in the message).
        """
        if self.closed:
            raise self._lost(frame)
        buffers = [buf for buf in frame.buffers if buffer_nbytes(buf)]
        await wait_cuda_idle(buffers)
        seq = next(self._seqs)
        ack: asyncio.Future[wire.Problem | object | None] = self._loop.create_future()
        self._acks[seq] = lambda outcome: None if ack.done() else ack.set_result(outcome)
        try:
            await asyncio.gather(*self._submit(self._messages(seq, frame, buffers)))
            outcome = await ack
        except asyncio.CancelledError:
            self.close("a send was cancelled mid-frame", given_up=True)
            raise
        except Exception as exc:  # a UCX error: the connection broke
            self.close(describe_error(exc))
            raise self._lost(frame) from None
        finally:
            self._acks.pop(seq, None)
        error = self._error(frame, outcome)
        if error is not None:
            raise error

    def send_nowait(self, frame: Frame, done: Callable[[Exception | None], None]) -> bool:
        """Send one frame from the calling thread (any thread); ``done`` gets the outcome.

        The header message is encoded and, in the ``blocking`` and ``polling`` progress modes, the
        messages are submitted right here; the loop only hears of a message that did not leave at
        once (a large payload), and of the acknowledgement, which calls ``done`` with ``None`` or
        the error :meth:`send` would raise. In the thread modes the loop submits the messages, in
        one callback. Declines (returns ``False``, having changed nothing) for a CUDA frame whose
        device still has work queued on its default stream (:meth:`send` waits for it off the
        loop), and once the link is closed (the transport closes its links before its loop stops).
        """
        buffers = [buf for buf in frame.buffers if buffer_nbytes(buf)]
        if self.closed or not all(cuda_idle(device) for device in cuda_devices(buffers)):
            return False
        seq = next(self._seqs)
        messages = self._messages(seq, frame, buffers)
        if self._worker.threaded:
            try:
                self._loop.call_soon_threadsafe(self._post, seq, frame, messages, done)
            except RuntimeError:  # the loop is closed
                return False
            return True
        with self._filing:
            if self.closed:
                return False
            self._acks[seq] = lambda outcome: done(self._error(frame, outcome))
        try:
            sent = self._endpoint.submit(self._tagged(messages))
        except Exception as exc:  # closed meanwhile, or broken
            try:
                self._loop.call_soon_threadsafe(self._abandon, seq, describe_error(exc))
            except RuntimeError:  # the loop is closed: nothing else will settle the frame
                self._abandon(seq, describe_error(exc))
            return True
        if len(sent) > 1:
            with self._filing:
                if seq in self._acks:  # else acknowledged (or the link closed) already
                    self._payloads[seq] = (frame, [request for request, _ in sent[1:]])
        for request, array in sent:
            self._worker.watch_from_thread(request, array, self._on_sent, busy=array.cuda)
        return True

    def reads_callers_memory(self, frame: Frame) -> bool:
        """Whether UCX may still read a payload of ``frame``, taken by :meth:`send_nowait`, from its caller's memory.

        A payload whose request has not completed is sent straight from the caller's buffer; one
        that rode in the header message was copied into it. Loop thread.
        """
        with self._filing:
            return any(
                sent is frame and not all(request.completed for request in requests)
                for sent, requests in self._payloads.values()
            )

    def _abandon(self, seq: int, reason: str) -> None:
        """Close the link and fail frame ``seq``, whose messages could not be submitted (loop thread).

        Acknowledgement waiters are only called on the loop thread (here, in :meth:`_on_ack` and in
        :meth:`close`), so each is called once, even when the link closed while ``seq`` was filed.
        """
        self.close(reason)
        waiter = self._acks.pop(seq, None)
        if waiter is not None:
            waiter(_CLOSED)

    def _post(
        self, seq: int, frame: Frame, messages: list[Buffer | bytes], done: Callable[[Exception | None], None]
    ) -> None:
        """Submit a frame taken by :meth:`send_nowait` in a thread progress mode (loop thread)."""
        if self.closed:
            done(self._lost(frame))
            return
        self._acks[seq] = lambda outcome: done(self._error(frame, outcome))
        try:
            sent = self._submit(messages)
        except Exception as exc:  # a UCX error: the connection broke (the ack waiter gets _CLOSED)
            self.close(describe_error(exc))
            return
        if len(sent) > 1:
            self._payloads[seq] = (frame, [_Settled(future) for future in sent[1:]])
        for future in sent:
            if future.done():  # small messages usually leave at once
                self._check_sent(future)
            else:
                future.add_done_callback(self._check_sent)

    def _on_sent(self, error: Exception | None) -> None:
        if error is not None:  # a UCX error: the connection broke (the ack waiter gets _CLOSED)
            self.close(describe_error(error))

    def _check_sent(self, future: asyncio.Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is not None:  # a UCX error: the connection broke (the ack waiter gets _CLOSED)
            self.close(describe_error(error))

    def _lost(self, frame: Frame) -> PeerLostError:
        return PeerLostError(
            f"the connection to {self.describe} broke before it acknowledged {frame.header.describe()}: "
            f"{self._reason}. The next send connects again; check that the peer is running"
        )

    def close(self, reason: str, *, given_up: bool = False) -> None:
        """Close the connection; unacknowledged sends raise :class:`PeerLostError`. Idempotent.

        Args:
            reason: Why, for the errors of the unacknowledged sends.
            given_up: This sidecar gives a working connection up (a send over it timed out or was
                cancelled), as :attr:`given_up` then says to whoever gets the link closed.
        """
        with self._filing:
            if self.closed:
                return
            self.closed = True
            self.given_up = given_up
            self._reason = reason
            waiters, self._acks = list(self._acks.values()), {}
            self._payloads.clear()
        self._endpoint.close()
        for waiter in waiters:
            waiter(_CLOSED)
        self._on_closed(self)


class _Settled:
    """A submitted message's future seen as a request: ``completed`` once it is done."""

    def __init__(self, future: asyncio.Future[None]) -> None:
        self._future = future

    @property
    def completed(self) -> bool:
        return self._future.done()


#: First pause between connection attempts while nothing accepts them, in seconds (it doubles).
_RETRY_FIRST = 0.02
#: Longest pause between connection attempts, in seconds.
_RETRY_MAX = 0.5


class _Opening:
    """One connection attempt: remembers why its endpoint broke and forwards later breaks to its link."""

    def __init__(self) -> None:
        self.link: Link | None = None
        self.broken = ""

    def on_broken(self, reason: str) -> None:
        self.broken = self.broken or reason
        if self.link is not None:
            self.link.close(reason)


async def connect(
    worker: UcxWorker,
    rank: int,
    address: Address,
    *,
    own_rank: int,
    incarnation: str,
    token: str | None,
    timeout: float,
    on_closed: Callable[[Link], None],
) -> Link:
    """Connect to ``rank`` and shake hands, trying again until ``timeout`` while nothing accepts.

    Peers start in any order, so a refused connection (nothing listens at ``address`` yet, or its
    name does not resolve yet) is tried again, after pauses growing from 20 ms to 0.5 s. A listener
    that accepts but does not answer the handshake, or answers wrongly, ends the attempt at once.

    Raises:
        PeerUnreachableError: No sidecar answered at ``address`` within ``timeout`` seconds, or the
            one there is another rank, speaks another protocol version or refused the connection.
        AuthenticationError: The peer refused this sidecar's auth token, or did not prove it holds it.
    """
    where = _describe(rank, address)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = _RETRY_FIRST
    unanswered = 0

    def unreachable(reason: str) -> PeerUnreachableError:
        return PeerUnreachableError(
            f"cannot connect to {where} over ucx: {reason}. Check that the peer is running and listening there "
            "(SIDECAR_RANK, SIDECAR_BASE_PORT, SIDECAR_HOST_TEMPLATE / SIDECAR_PEERS agree on both sides) and that "
            "no firewall is in the way"
        )

    while True:
        opening = _Opening()
        endpoint: Endpoint | None = None
        try:
            handle = worker.api.UCXEndpoint.create(worker.worker, address.host, address.port, True)
            endpoint = Endpoint(worker, handle, opening.on_broken)
            # A broken endpoint fails the handshake's requests, so a refused attempt ends early.
            handshake = _Handshake(endpoint, address, rank, own_rank, incarnation, token)
            tag_base, ack_tag = await asyncio.wait_for(handshake.run(), deadline - loop.time())
            break
        except (asyncio.CancelledError, AuthenticationError, PeerUnreachableError):
            if endpoint is not None:  # shutting down, or the listener answered: not the peer, or refused
                endpoint.close()
            raise
        except TimeoutError:
            failure = unreachable(f"no answer within SIDECAR_CONNECT_TIMEOUT={timeout:g}s")
        except wire.ProtocolError as exc:
            failure = unreachable(str(exc))
        except Exception as exc:  # UCX errors, ConnectionError: nothing accepted the connection
            unanswered += isinstance(exc, _Unanswered)
            if loop.time() + pause < deadline and unanswered < _UNANSWERED_TRIES:
                if endpoint is not None:
                    endpoint.close()
                await asyncio.sleep(pause)
                pause = min(2 * pause, _RETRY_MAX)
                continue
            if isinstance(exc, _Unanswered):
                failure = unreachable(f"{describe_error(exc)} ({unanswered} times)")
            else:
                reason = opening.broken or describe_error(exc)
                failure = unreachable(f"{reason} (tried for {timeout:g}s, SIDECAR_CONNECT_TIMEOUT)")
        if endpoint is not None:
            endpoint.close()
        raise failure from None
    opening.link = Link(endpoint, rank, address, tag_base, ack_tag, on_closed)
    return opening.link


def _describe(rank: int, address: Address) -> str:
    """How errors name the peer a connection goes to."""
    return f"rank {rank} at {address}"


#: The most of a peer's own words (a refusal's text) quoted in an error.
_QUOTED = 500
#: Listeners that close the connection at the hello tried before giving up (a peer restarting may, once).
_UNANSWERED_TRIES = 2


class _Unanswered(ConnectionError):
    """The listener closed the connection instead of answering the hello."""


class _Handshake:
    """The connecting side of one handshake (see :mod:`._wire`): prove the token first, then check the listener's proof.

    A listener's refusal is not authenticated (it comes before any proof), so its text is quoted,
    cut short, as the peer's words.
    """

    def __init__(
        self, endpoint: Endpoint, address: Address, rank: int, own_rank: int, incarnation: str, token: str | None
    ) -> None:
        self._endpoint = endpoint
        self._address = address
        self._where = _describe(rank, address)
        self._rank = rank
        self._own_rank = own_rank
        self._incarnation = incarnation
        self._token = token

    async def run(self) -> tuple[int, int]:
        """Shake hands; return the listener's tag base and this connection's acknowledgement tag.

        Raises:
            AuthenticationError: The listener refused this sidecar's token, or accepted without
                proving it holds the token.
            PeerUnreachableError: The listener is another rank, speaks another protocol version or
                refused the connection.
            _Unanswered: It closed the connection instead of answering the hello.
            ProtocolError: The listener answered something that is not this handshake.
            Exception: A UCX error (nothing accepted the connection, or it broke): worth trying again.
        """
        endpoint, token, rank = self._endpoint, self._token, self._rank
        hello = wire.Hello(
            version=wire.VERSION, rank=self._own_rank, nonce=wire.new_nonce(), incarnation=self._incarnation
        )
        await endpoint.stream_send(wire.stream_message(hello))
        body = await self._first_answer()
        version, _, said = wire.version_of(body, "handshake answer")
        if version != wire.VERSION:  # another version can only refuse: nothing it says is checked
            raise PeerUnreachableError(
                f"{self._where} speaks protocol version {version}, this sidecar {wire.VERSION}: run the same "
                f"sidecar version on every rank{self._quote(said)}"
            )
        challenge = wire.parse_model(wire.Challenge, body, "handshake challenge")
        if challenge.rank != rank:  # before proving anything to it
            raise PeerUnreachableError(
                f"{self._address} is served by rank {challenge.rank}, not rank {rank}; check the peer addressing "
                "settings on both sides"
            )
        transcript = wire.Transcript(self._own_rank, rank, hello.nonce, challenge.nonce)
        mine = None if token is None else transcript.proof(token, "connector")
        await endpoint.stream_send(wire.stream_message(wire.Response(proof=mine)))
        reply = wire.parse_model(wire.Reply, await endpoint.recv_stream_message(), "handshake reply")
        if reply.version != wire.VERSION or reply.rank != rank:
            raise wire.ProtocolError(
                f"its reply (version {reply.version}, rank {reply.rank}) contradicts its challenge"
            )
        if not reply.accepted:
            if reply.error == "AuthenticationError":
                raise AuthenticationError(f"{self._where} refused this sidecar{self._quote(reply.message)}")
            raise PeerUnreachableError(
                f"{self._where} refused the connection ({reply.error[:100]!r}){self._quote(reply.message)}"
            )
        if token is not None and not wire.proof_matches(
            reply.proof, transcript.proof(token, "listener", reply.tag_base)
        ):
            has = "has no auth token" if reply.proof is None else "holds another auth token"
            raise AuthenticationError(
                f"{self._where} did not prove that it holds this sidecar's auth token: it {has}, or it is not the "
                "peer. No frame was sent to it; it did get this sidecar's proof, so if the token may be weak, "
                "change it. Set the same SIDECAR_AUTH_TOKEN on every sidecar of the deployment and check that the "
                "address is the peer's"
            )
        return reply.tag_base, transcript.ack_tag(token)

    async def _first_answer(self) -> bytearray:
        """The listener's answer to the hello.

        Raises:
            _Unanswered: It closed the connection instead (a sidecar of protocol version 2 does).
            ProtocolError: The answer is not this protocol's.
        """
        try:
            return await self._endpoint.recv_stream_message()
        except wire.ProtocolError:
            raise
        except Exception as exc:
            raise _Unanswered(
                f"it closed the connection without answering the hello ({describe_error(exc)}); a sidecar of an "
                "older protocol version does that: run the same sidecar version on every rank"
            ) from None

    @staticmethod
    def _quote(said: str) -> str:
        """The peer's own words, quoted and cut short (``""`` if it said nothing)."""
        if not said:
            return ""
        cut = said[:_QUOTED] + ("..." if len(said) > _QUOTED else "")
        return f", saying {cut!r}"
