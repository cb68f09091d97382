"""Raw ucxx, the ceiling of what UCX gives from Python: tag send/recv into a preallocated buffer."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy
import torch

from sidecar_core._bench._endpoint import Endpoint, Role

_TIMEOUT = 120.0
T = TypeVar("T")


class UcxxEndpoint(Endpoint):
    """One ucxx endpoint (listener on the receiver), driven by a private asyncio loop.

    Tensors go as one tagged message straight from and into tensor memory (host memory through the
    buffer protocol, CUDA memory through ``__cuda_array_interface__``); the receiver knows the size
    and reuses one buffer per size, as a fixed-shape pipeline would. Small objects are pickles sent
    with ``send_obj`` (a size message, then the bytes); acknowledgements are one 8-byte message.
    It runs with the ucx transport's settings: the progress mode of ``SIDECAR_UCX__PROGRESS_MODE``
    (the parent reads it into ``setup``) and the same ``UCX_*`` environment.
    """

    def __init__(self, role: Role, setup: dict[str, Any], device: torch.device) -> None:
        super().__init__(role, setup, device)
        import ucxx  # optional dependency, imported where used

        self._ucxx = ucxx
        mode = setup["progress_mode"]
        if device.type == "cuda" and mode.startswith("thread"):
            _make_progress_thread_use(device)
        self._ack = numpy.zeros(1, dtype=numpy.int64)
        self._loop = asyncio.new_event_loop()
        self._ep: Any = None
        self._listener: Any = None
        self._accepted: asyncio.Future[Any] = self._loop.create_future()
        self._buffer = torch.empty(0, dtype=torch.uint8, device=device)
        self._run(self._init(mode))
        if role == "recv":
            self._run(self._listen())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(coro, _TIMEOUT))

    async def _init(self, mode: str) -> None:
        # Inside the loop: ucxx binds its future notifier to the running loop. Python futures in
        # the thread modes, as the ucx transport uses them.
        self._ucxx.init(progress_mode=mode, enable_python_future=mode.startswith("thread"))

    async def _listen(self) -> None:
        async def accept(endpoint: Any) -> None:
            if not self._accepted.done():
                self._accepted.set_result(endpoint)

        self._listener = self._ucxx.create_listener(accept)

    def address(self) -> dict[str, Any]:
        """The receiver's listening port."""
        return {"port": self._listener.port} if self._listener is not None else {}

    def connect(self, address: dict[str, Any]) -> None:
        """Accept (receiver) or create the endpoint (sender)."""
        if self.role == "recv":
            self._ep = self._run(_wait(self._accepted))
        else:
            self._ep = self._run(self._ucxx.create_endpoint("127.0.0.1", address["port"]))

    def _array(self, tensor: torch.Tensor) -> Any:
        return tensor if tensor.is_cuda else tensor.numpy()

    def send_tensor(self, tensor: torch.Tensor) -> None:
        """One tagged send from the tensor's memory."""
        self._run(self._ep.send(self._array(tensor)))

    def recv_tensor(self, nbytes: int) -> torch.Tensor:
        """One tagged receive into a buffer allocated once per size."""
        if self._buffer.numel() != nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._run(self._ep.recv(self._array(self._buffer)))
        return self._buffer

    def send_obj(self, obj: Any) -> None:
        """``send_obj`` of a pickle."""
        self._run(self._ep.send_obj(pickle.dumps(obj, protocol=5)))

    def recv_obj(self) -> Any:
        """``recv_obj`` and unpickle."""
        return pickle.loads(self._run(self._ep.recv_obj()))

    def send_ack(self, index: int) -> None:
        """One 8-byte tagged message."""
        self._ack[0] = index
        self._run(self._ep.send(self._ack))

    def recv_ack(self) -> int:
        """One 8-byte tagged receive."""
        self._run(self._ep.recv(self._ack))
        return int(self._ack[0])

    def close(self) -> None:
        """Close the endpoint and the listener."""
        try:
            if self._ep is not None:
                self._run(self._ep.close())
        except Exception:  # closing is best effort; the process exits next
            pass
        if self._listener is not None:
            self._listener.close()
        # ucxx's notifier thread is not a daemon: stop it, or the process never exits.
        self._ucxx.stop_notifier_thread()
        self._loop.close()


async def _wait(future: asyncio.Future[T]) -> T:
    return await future


def _make_progress_thread_use(device: torch.device) -> None:
    """Make ucxx's progress thread current on ``device`` through torch.

    ucxx's own start hook makes GPU 0 current through ``cuda.core``, which may be missing, and is
    the wrong GPU for a process on another one.
    """
    from ucxx._lib_async import continuous_ucx_progress

    index = device.index

    def create_context() -> None:
        torch.cuda.set_device(index)

    continuous_ucx_progress._create_context = create_context
