"""Raw loopback TCP: ``sendall`` of the tensor's bytes, ``recv_into`` a preallocated buffer."""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

import torch

from sidecar_core._bench._endpoint import Endpoint, Role

_LENGTH = struct.Struct("<Q")
_TIMEOUT = 120.0


class TcpEndpoint(Endpoint):
    """A loopback TCP connection; small objects travel as length-prefixed pickles."""

    def __init__(self, role: Role, setup: dict[str, Any], device: torch.device) -> None:
        super().__init__(role, setup, device)
        self._listener: socket.socket | None = None
        self._sock: socket.socket | None = None
        self._buffer = torch.empty(0, dtype=torch.uint8)
        if role == "recv":
            self._listener = socket.create_server(("127.0.0.1", 0))

    def address(self) -> dict[str, Any]:
        """The receiver's port."""
        return {"port": self._listener.getsockname()[1]} if self._listener is not None else {}

    def connect(self, address: dict[str, Any]) -> None:
        """Accept (receiver) or connect (sender)."""
        if self._listener is not None:
            self._listener.settimeout(_TIMEOUT)
            sock, _ = self._listener.accept()
        else:
            sock = socket.create_connection(("127.0.0.1", address["port"]), timeout=_TIMEOUT)
        sock.settimeout(_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock

    @property
    def sock(self) -> socket.socket:
        """The connected socket."""
        assert self._sock is not None, "connect() first"
        return self._sock

    def send_tensor(self, tensor: torch.Tensor) -> None:
        """Send the length, then the bytes straight from the tensor's memory."""
        self.sock.sendall(_LENGTH.pack(tensor.numel()))
        self.sock.sendall(tensor.numpy().data)

    def recv_tensor(self, nbytes: int) -> torch.Tensor:
        """Receive into a buffer allocated once per size and reused."""
        (length,) = _LENGTH.unpack(self._recv_exact(_LENGTH.size))
        if self._buffer.numel() != length:
            self._buffer = torch.empty(length, dtype=torch.uint8)
        self._recv_into(self._buffer.numpy().data)
        return self._buffer

    def send_obj(self, obj: Any) -> None:
        """Send a length-prefixed pickle."""
        data = pickle.dumps(obj, protocol=5)
        self.sock.sendall(_LENGTH.pack(len(data)) + data)

    def recv_obj(self) -> Any:
        """Receive a length-prefixed pickle."""
        (length,) = _LENGTH.unpack(self._recv_exact(_LENGTH.size))
        return pickle.loads(self._recv_exact(length))

    def _recv_exact(self, nbytes: int) -> bytearray:
        data = bytearray(nbytes)
        self._recv_into(memoryview(data))
        return data

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError(f"tcp peer closed the connection after {got} of {len(view)} bytes")
            got += n

    def close(self) -> None:
        """Close the sockets."""
        for sock in (self._sock, self._listener):
            if sock is not None:
                sock.close()
