"""The sidecar itself, through its public API: ``send`` → peer ``recv_sync`` → ``mark_done``."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import torch

from sidecar_core._bench._endpoint import Endpoint, Role
from sidecar_core._client import Sidecar, SidecarConfig

SENDER_RANK = 0
RECEIVER_RANK = 1


class SidecarEndpoint(Endpoint):
    """A :class:`Sidecar` of rank 0 (sender) or 1 (receiver).

    The transport and its settings come from the environment the parent prepared (``SIDECAR_*``).
    Each side numbers its messages: tensors are ids ``t0, t1, ...``, small objects ``o0, o1, ...``
    per direction. Every received chunk is released with ``mark_done``.
    """

    def __init__(self, role: Role, setup: dict[str, Any], device: torch.device) -> None:
        super().__init__(role, setup, device)
        rank, self._peer = (SENDER_RANK, RECEIVER_RANK) if role == "send" else (RECEIVER_RANK, SENDER_RANK)
        # A receiver on a GPU asks for its tensors there (SIDECAR_RECV_DEVICE).
        settings = {"recv_device": str(device)} if role == "recv" and device.type == "cuda" else {}
        self.sidecar = Sidecar(SidecarConfig(sidecar_rank=rank, settings=settings))
        self._counts = {"t": 0, "o-in": 0, "o-out": 0}
        self._held: str | None = None
        self._pending: list[concurrent.futures.Future[None]] = []

    def _next(self, kind: str) -> int:
        n = self._counts[kind]
        self._counts[kind] = n + 1
        return n

    def connect(self, address: dict[str, Any]) -> None:
        """Exchange one small object each way, so that connections exist before anything is timed."""
        if self.role == "send":
            self.send_obj("hello")
            self.recv_obj()
        else:
            self.send_obj(self.recv_obj())

    def send_tensor(self, tensor: torch.Tensor) -> None:
        """``Sidecar.send``; the future is awaited after the receiver's acknowledgement arrives."""
        key = f"t{self._next('t')}"
        self._pending.append(self.sidecar.send(tensor, id=key, dst_sidecar_ranks=[[self._peer]]))

    def recv_tensor(self, nbytes: int) -> torch.Tensor:
        """``Sidecar.recv_sync`` of the next tensor id."""
        self._settle()
        self._held = f"t{self._next('t')}"
        return self.sidecar.recv_sync(self._held)  # type: ignore[no-any-return]

    def release(self) -> None:
        """``Sidecar.mark_done_sync`` of the tensor last received."""
        if self._held is not None:
            self.sidecar.mark_done_sync(self._held)
            self._held = None

    def send_obj(self, obj: Any) -> None:
        """``Sidecar.send`` of a small object."""
        key = f"o{self._next('o-out')}"
        self._pending.append(self.sidecar.send(obj, id=key, dst_sidecar_ranks=[[self._peer]]))

    def recv_obj(self) -> Any:
        """``recv_sync`` and ``mark_done`` of the next small object; then check this side's sends succeeded."""
        key = f"o{self._next('o-in')}"
        obj = self.sidecar.recv_sync(key)
        self.sidecar.mark_done_sync(key)
        self._settle()
        return obj

    def _settle(self) -> None:
        """Wait for this side's earlier sends; raises what a failed one raised."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Shut the sidecar down."""
        self.sidecar.shutdown_sync()
