"""The interface every measured peer implements, and the payloads the measurements move."""

from __future__ import annotations

import abc
from typing import Any, Literal

import torch

Role = Literal["send", "recv"]

#: The small objects whose round-trip latency is measured, by name. ``dict100`` is a request-like
#: dict of 100 bytes as JSON.
SMALL_OBJECTS: dict[str, Any] = {
    "int": 123456789,
    "dict100": {"request_id": "req-0000000042", "tokens": [101, 2023, 2003, 1037, 3231], "final": False, "pad": 10},
}


class Endpoint(abc.ABC):
    """One side (``send`` or ``recv``) of a peer, living in its own worker process.

    The sender moves tensors to the receiver; small objects go both ways (acknowledgements and
    latency echoes). Both sides make the same calls in the same order, so a peer that needs
    message ids can number them on each side independently.

    Args:
        role: Which side this is.
        setup: What the parent prepared for this peer (environment, paths, queues).
        device: Where this side's tensors live (``cpu`` or ``cuda:N``).
    """

    def __init__(self, role: Role, setup: dict[str, Any], device: torch.device) -> None:
        self.role = role
        self.setup = setup
        self.device = device

    def address(self) -> dict[str, Any]:
        """What the other side needs to connect (the receiver's port, for example)."""
        return {}

    def connect(self, address: dict[str, Any]) -> None:  # noqa: B027 - optional step
        """Finish connecting; both sides run this at the same time (the sender gets the receiver's address)."""

    @abc.abstractmethod
    def send_tensor(self, tensor: torch.Tensor) -> None:
        """Sender: start moving ``tensor`` (a flat uint8 tensor) to the receiver."""

    @abc.abstractmethod
    def recv_tensor(self, nbytes: int) -> torch.Tensor:
        """Receiver: wait for the next tensor of ``nbytes`` bytes and return it, usable on ``self.device``."""

    def release(self) -> None:  # noqa: B027 - optional step
        """Receiver: the tensor returned by :meth:`recv_tensor` is no longer used; free what holds it."""

    @abc.abstractmethod
    def send_obj(self, obj: Any) -> None:
        """Send a small object to the other side."""

    @abc.abstractmethod
    def recv_obj(self) -> Any:
        """Wait for the next small object from the other side and return it."""

    def send_ack(self, index: int) -> None:
        """Receiver: acknowledge transfer ``index`` (a small int) over this peer."""
        self.send_obj(index)

    def recv_ack(self) -> int:
        """Sender: wait for the receiver's acknowledgement and return its index."""
        return int(self.recv_obj())

    def close(self) -> None:  # noqa: B027 - optional step
        """Release sockets and other resources. Must not raise."""


def make_source(nbytes: int, value: int, device: torch.device, *, pinned: bool = False) -> torch.Tensor:
    """A freshly allocated flat uint8 tensor of ``nbytes`` bytes, every byte ``value`` (pages touched).

    ``pinned`` allocates page-locked host memory (for host-to-device copies).
    """
    tensor = torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pinned)
    tensor.fill_(value)
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return tensor


def check_received(tensor: Any, nbytes: int, value: int, peer: str) -> None:
    """Check that a received tensor has the size and the bytes that were sent (first and last byte).

    Raises:
        ValueError: The tensor is not what the sender sent.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{peer} delivered a {type(tensor).__name__}, expected a torch.Tensor")
    got = tensor.numel() * tensor.element_size()
    if got != nbytes:
        raise ValueError(f"{peer} delivered {got} bytes, expected {nbytes}")
    flat = tensor.reshape(-1).view(torch.uint8)
    first, last = int(flat[0]), int(flat[-1])
    if (first, last) != (value, value):
        raise ValueError(f"{peer} delivered wrong bytes: first={first} last={last}, expected {value}")
