"""The serializer interface.

A serializer is a module that exposes the same few names, so serializers swap cleanly:

``NAME``
    The registered name, written into every frame it encodes.
``PRIORITY``
    Lower is tried first when the core picks a serializer for an object.
``accepts(obj) -> bool``
    Whether ``encode`` can take ``obj``; cheap and side-effect free.
``encode(obj) -> Encoded``
    JSON-compatible metadata plus payload buffers; buffers should be views of ``obj``, not copies.
    The core calls it only with an object ``accepts`` took, so it need not check that again.
``decode(meta, buffers, device) -> object``
    The inverse. It runs on untrusted input: validate ``meta`` against the buffer sizes before
    allocating or viewing anything, raise :class:`~sidecar_core.FrameError` naming what is wrong, and
    never unpickle. ``device`` is the receiver's ``SIDECAR_RECV_DEVICE``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sidecar_core._frame import Buffer


@dataclass(slots=True)
class Encoded:
    """What ``encode`` returns: metadata for the header and the payload buffers."""

    meta: dict[str, Any] = field(default_factory=dict)
    buffers: list[Buffer] = field(default_factory=list)
    device: Literal["cpu", "cuda"] = "cpu"


class Serializer(Protocol):
    """What a serializer module provides (see the module docstring)."""

    NAME: str
    PRIORITY: int

    def accepts(self, obj: object) -> bool:
        """Whether ``encode`` can take ``obj``."""

    def encode(self, obj: Any) -> Encoded:
        """Turn ``obj`` into metadata and buffers."""

    def decode(self, meta: Mapping[str, Any], buffers: Sequence[Buffer], device: str) -> object:
        """Rebuild the object; raise ``FrameError`` on inconsistent input."""
