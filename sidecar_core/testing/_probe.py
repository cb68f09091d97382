"""The conformance suite's in-process plugin: a probe serializer and a hook recorder.

Only the test process's own sidecar loads it, so its peers do not know the probe serializer: a
frame encoded with it is a realistic bad frame (mismatched plugin installs) that every transport
must report back to the sender.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar_core._hooks import Register, hookimpl
from sidecar_core._serializer import Encoded

#: The probe serializer's registered name.
NAME = "conformance-probe"
PRIORITY = 1_000_000


def accepts(obj: object) -> bool:
    """Takes ``bytes``, but is never picked by type (``primitives`` comes first): the suite forces it."""
    return type(obj) is bytes


def encode(obj: Any) -> Encoded:
    """Encode ``bytes`` as one buffer."""
    return Encoded(meta={"probe": True}, buffers=[memoryview(bytes(obj))])


def decode(meta: Mapping[str, Any], buffers: Sequence[Any], device: str) -> object:
    """Return the bytes (only ever runs if a peer has this plugin too)."""
    return b"".join(bytes(memoryview(b)) for b in buffers)


@dataclass(frozen=True, slots=True)
class HookEvent:
    """One observability hook call."""

    hook: str
    id: str
    chunk_id: int
    rank: int
    nbytes: int
    transport: str


class ProbePlugin:
    """Registers the probe serializer and records ``sidecar_on_send`` / ``sidecar_on_recv`` calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[HookEvent] = []

    @property
    def events(self) -> list[HookEvent]:
        """The hook calls so far, oldest first."""
        with self._lock:
            return list(self._events)

    @hookimpl
    def sidecar_register_serializers(self, register: Register) -> None:
        """Register the probe serializer."""
        register(NAME, __name__, description="Conformance suite probe: known only to the test process.")

    @hookimpl
    def sidecar_on_send(
        self, id: str, chunk_id: int, dst_rank: int, nbytes: int, seconds: float, transport: str
    ) -> None:
        """Record a completed send."""
        with self._lock:
            self._events.append(HookEvent("send", id, chunk_id, dst_rank, nbytes, transport))

    @hookimpl
    def sidecar_on_recv(self, id: str, chunk_id: int, src_rank: int, nbytes: int, transport: str) -> None:
        """Record a stored message."""
        with self._lock:
            self._events.append(HookEvent("recv", id, chunk_id, src_rank, nbytes, transport))
