"""``torch.multiprocessing`` queues: tensors move to shared memory (CPU) or CUDA IPC handles (GPU)."""

from __future__ import annotations

import queue
from typing import Any

import torch
import torch.multiprocessing

from sidecar_core._bench._endpoint import Endpoint, Role

_TIMEOUT = 120.0


def make_queues() -> dict[str, Any]:
    """Create the two queues in the parent; they reach the workers when those are spawned."""
    ctx = torch.multiprocessing.get_context("spawn")
    return {"forward": ctx.Queue(), "backward": ctx.Queue()}


class MpQueueEndpoint(Endpoint):
    """Two ``torch.multiprocessing`` queues, one per direction."""

    def __init__(self, role: Role, setup: dict[str, Any], device: torch.device) -> None:
        super().__init__(role, setup, device)
        forward, backward = setup["queues"]["forward"], setup["queues"]["backward"]
        self._out, self._in = (forward, backward) if role == "send" else (backward, forward)

    def send_tensor(self, tensor: torch.Tensor) -> None:
        """Put the tensor on the queue (a CPU tensor's storage moves to shared memory)."""
        self._out.put(tensor)

    def recv_tensor(self, nbytes: int) -> torch.Tensor:
        """Get the next tensor (mapped from shared memory or opened from a CUDA IPC handle).

        A CUDA tensor arrives on the sender's GPU; it is copied to this side's GPU when they differ.
        """
        tensor: torch.Tensor = self._get()
        return tensor if tensor.device == self.device else tensor.to(self.device)

    def send_obj(self, obj: Any) -> None:
        """Put a small object on the queue."""
        self._out.put(obj)

    def recv_obj(self) -> Any:
        """Get the next small object."""
        return self._get()

    def _get(self) -> Any:
        try:
            return self._in.get(timeout=_TIMEOUT)
        except queue.Empty:
            raise TimeoutError(f"mp-queue: nothing arrived within {_TIMEOUT:g}s") from None
