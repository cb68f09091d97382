"""One UCX endpoint: submits tagged and stream messages now, and reports once when it breaks.

Concurrency: loop thread only, except :meth:`Endpoint.submit` (any thread; UCX workers made by
ucxx serve several threads). ``post``/``recv_then``/``submit`` submit immediately (so messages on one
tag go out in call order); ``submit`` puts its messages out back to back, never interleaved with
another thread's. ``recv_then`` reports to a callback; ``post`` reports nothing (a failed send
breaks the connection, which ``on_broken`` reports).
Cancellation: cancelling a returned future does not withdraw the message; :meth:`Endpoint.close`
does (every unfinished request then fails). Closing: ``close`` is idempotent and does not call
``on_broken``; a broken endpoint calls ``on_broken`` exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from transports.ucx import _wire as wire
from transports.ucx._worker import UcxWorker

logger = logging.getLogger(__name__)

#: How long closing an endpoint may wait for UCX (nanoseconds).
_CLOSE_PERIOD_NS = 200_000_000

BufferLike = memoryview | bytes | bytearray | torch.Tensor


class _CudaBytes:
    """A contiguous CUDA tensor's bytes as ``__cuda_array_interface__``, the way ucxx reads CUDA memory.

    Built from the pointer and size alone: torch's own interface is a Python property that checks
    layout, strides and gradients each time (microseconds per message on the critical path).

    Args:
        tensor: Contiguous CUDA memory (a frame's buffer, or a view of a landing); kept alive here.
    """

    __slots__ = ("__cuda_array_interface__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor  # ucxx keeps this object, and with it the memory, until the request ends
        self.__cuda_array_interface__ = {
            "data": (tensor.data_ptr(), False),
            "shape": (tensor.nbytes,),
            "typestr": "|u1",
            "strides": None,
            "version": 3,
        }


def describe_error(exc: BaseException) -> str:
    """A short description of a UCX error for messages."""
    text = str(exc) or type(exc).__name__
    return text[0].lower() + text[1:] if text else text


class Endpoint:
    """A connected UCX endpoint on ``worker``.

    Args:
        worker: The worker the endpoint belongs to.
        handle: The ``UCXEndpoint``.
        on_broken: Called once (on the loop) with a reason when UCX reports the connection failed or
            the peer closed it.

    Raises:
        ConnectionError: The endpoint already failed (UCX refuses the close callback).
    """

    def __init__(self, worker: UcxWorker, handle: Any, on_broken: Callable[[str], None]) -> None:
        from ucxx._lib.arr import Array  # ucxx is imported only when the transport runs

        self.worker = worker
        self._api = worker.api
        self._Array: Any = Array
        self._handle: Any = handle
        self._on_broken = on_broken
        #: Held while messages are submitted from a thread other than the loop's, and while closing:
        #: a frame's messages stay together, and no thread submits on a closed UCX endpoint.
        self._submitting = threading.Lock()
        self.closed = False
        try:
            handle.set_close_callback(worker.call_on_loop, (self._broken,))
        except RuntimeError as exc:
            self._handle = None
            self.closed = True
            raise ConnectionError(describe_error(exc)) from None

    def _broken(self) -> None:
        if self.closed:
            return
        reason = "the connection closed"
        try:
            self._handle.raise_on_error()
        except Exception as exc:
            reason = describe_error(exc)
        self.close()
        self._on_broken(reason)

    def _array(self, buf: BufferLike) -> Any:
        """``buf`` as the ucxx ``Array`` requests read or write (tensors must be contiguous)."""
        if isinstance(buf, torch.Tensor):
            # Host tensors through the buffer protocol, CUDA tensors through their pointer.
            return self._Array(_CudaBytes(buf) if buf.is_cuda else buf.numpy())
        return self._Array(buf)

    def truncated(self, exc: BaseException) -> bool:
        """Whether ``exc`` says a message was larger than its receive buffer (and was consumed)."""
        return isinstance(exc, self._api.UCXMessageTruncatedError)

    def _check(self) -> Any:
        if self.closed or self._handle is None:
            raise ConnectionError("the endpoint is closed")
        return self._handle

    def post(self, message: bytes, tag: int) -> None:
        """Submit a tagged send of a small host message (kept alive until it is sent) that nobody waits for.

        A send that fails breaks the connection: ``on_broken`` reports that.

        Raises:
            ConnectionError: The endpoint is closed.
        """
        [(request, array)] = self.submit([(message, tag)])
        self.worker.keep_until_done(request, array)

    def submit(self, messages: Sequence[tuple[BufferLike, int]]) -> list[tuple[Any, Any]]:
        """Submit tagged sends back to back, from any thread; none of another call's come in between.

        Returns:
            Each message's request and the array it reads: keep the array alive until the request
            completes (:meth:`UcxWorker.watch` does).

        Raises:
            ConnectionError: The endpoint is closed.
            Exception: UCX refused a message (the connection is broken).
        """
        tagged = [(self._array(buf), self._api.UCXXTag(tag)) for buf, tag in messages]
        with self._submitting:
            handle = self._check()
            return [(handle.tag_send(array, tag), array) for array, tag in tagged]

    def recv_then(
        self, buf: BufferLike, tag: int, on_done: Callable[[Exception | None], None], *, idle: bool = False
    ) -> None:
        """Submit a tagged receive into ``buf``; ``on_done`` gets its outcome on the loop (see :meth:`UcxWorker.watch`).

        Raises:
            ConnectionError: The endpoint is closed.
        """
        array = self._array(buf)
        request = self._check().tag_recv(array, self._api.UCXXTag(tag))
        self.worker.watch(request, array, on_done, busy=array.cuda and not idle)

    def stream_send(self, buf: bytes) -> asyncio.Future[None]:
        """Submit a stream send (handshake messages).

        Raises:
            ConnectionError: The endpoint is closed.
        """
        array = self._Array(buf)
        return self.worker.track(self._check().stream_send(array), array, busy=False)

    def stream_recv(self, buf: bytearray) -> asyncio.Future[None]:
        """Submit a stream receive that completes once ``buf`` is full.

        Raises:
            ConnectionError: The endpoint is closed.
        """
        array = self._Array(buf)
        return self.worker.track(self._check().stream_recv(array), array, busy=False)

    async def recv_stream_message(self) -> bytearray:
        """Receive one handshake message and return its JSON body (see :mod:`._wire`).

        Raises:
            ProtocolError: The prefix is not this protocol's, or the body is too large.
            ConnectionError: The endpoint is closed.
            Exception: A UCX error (the connection broke).
        """
        prefix = bytearray(wire.STREAM_PREFIX.size)
        await self.stream_recv(prefix)
        body = bytearray(wire.stream_body_length(prefix))
        if body:
            await self.stream_recv(body)
        return body

    def close(self) -> None:
        """Close the endpoint at once; its unfinished requests fail. Idempotent, never raises."""
        if self.closed:
            return
        with self._submitting:
            self.closed = True
            handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            handle.remove_close_callback()
            handle.close_blocking(period=_CLOSE_PERIOD_NS, max_attempts=1)
        except Exception:
            logger.debug("closing a UCX endpoint failed", exc_info=True)
        self.worker.reap_soon()  # the requests closing cancelled
