"""pyzmq with pickle protocol 5: tensors travel as out-of-band buffers (no pickling of the bytes)."""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import numpy as np
import torch
import zmq

from sidecar_core._bench._endpoint import Endpoint, Role

_TIMEOUT_MS = 120_000


class ZmqEndpoint(Endpoint):
    """A ``PAIR`` socket over ``ipc://``; every message is ``[pickle header, *out-of-band buffers]``.

    Tensors are sent as their NumPy view (NumPy arrays pickle their data out of band with protocol
    5; torch tensors would pickle it in band) and rebuilt with ``torch.from_numpy`` without a copy.
    """

    def __init__(self, role: Role, setup: dict[str, Any], device: torch.device) -> None:
        super().__init__(role, setup, device)
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.PAIR)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVTIMEO, _TIMEOUT_MS)
        self._sock.setsockopt(zmq.SNDTIMEO, _TIMEOUT_MS)
        address = f"ipc://{setup['dir']}/zmq.sock"
        if role == "recv":
            self._sock.bind(address)
        else:
            self._sock.connect(address)

    def send_tensor(self, tensor: torch.Tensor) -> None:
        """Send the tensor's NumPy view with its buffer out of band."""
        self.send_obj(tensor.numpy())

    def recv_tensor(self, nbytes: int) -> torch.Tensor:
        """Receive the NumPy array and wrap it as a tensor (zero-copy)."""
        array = self.recv_obj()
        with warnings.catch_warnings():
            # zmq's receive buffers are read-only; the benchmark only reads them.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.asarray(array))

    def send_obj(self, obj: Any) -> None:
        """Pickle with protocol 5; large buffers go as separate zero-copy frames."""
        buffers: list[pickle.PickleBuffer] = []
        header = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        self._sock.send_multipart([header, *(b.raw() for b in buffers)], copy=False)

    def recv_obj(self) -> Any:
        """Receive the frames without copying and unpickle with the frames as out-of-band buffers."""
        frames = self._sock.recv_multipart(copy=False)
        return pickle.loads(frames[0].buffer, buffers=[f.buffer for f in frames[1:]])

    def close(self) -> None:
        """Close the socket and the context."""
        self._sock.close(linger=0)
        self._context.term()
