"""The ``primitives`` serializer: ``None``, ``bool``, ``int``, ``float``, ``str`` and ``bytes``.

Metadata is ``{"type": T}``; every value except ``None`` travels in one buffer:

======== =================================================================================
``T``    buffer
======== =================================================================================
none     (no buffer)
bool     one byte, 0 or 1
int      two's complement, little endian, as few bytes as hold the sign (any size)
float    the 8 bytes of the IEEE 754 double, little endian: nan payloads, ±inf and -0.0
         come back bit for bit
str      UTF-8
bytes    the bytes themselves (sent zero-copy; the receiver gets a ``bytes`` copy)
======== =================================================================================

Types are checked exactly: ``bool`` is not taken as ``int``, and subclasses (``IntEnum``,
``StrEnum``, ...) are not taken at all, because the receiver could only rebuild them by importing a
class by name. Send ``int(member)`` or ``member.value`` instead.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from serializers._buffers import expect_buffers, expect_keys, host_view
from sidecar_core import Buffer, Encoded, FrameError, SerializationError

NAME = "primitives"
PRIORITY = 30

_FLOAT = struct.Struct("<d")
_TYPES: dict[type, str] = {type(None): "none", bool: "bool", int: "int", float: "float", str: "str", bytes: "bytes"}


def accepts(obj: object) -> bool:
    """Whether ``obj``'s type is exactly one of ``None``, bool, int, float, str or bytes."""
    return type(obj) in _TYPES


def encode(obj: bool | int | float | str | bytes | None) -> Encoded:
    """Put the value in one buffer (none for ``None``).

    Raises:
        SerializationError: ``obj`` is not a primitive, or is a ``str`` that is not valid UTF-8 (it
            holds a lone surrogate).
    """
    kind = _TYPES.get(type(obj))
    if kind is None:
        raise SerializationError(f"primitives cannot encode {type(obj).__qualname__}")
    meta = {"type": kind}
    if obj is None:
        return Encoded(meta=meta)
    data: bytes
    if isinstance(obj, bytes):
        return Encoded(meta=meta, buffers=[memoryview(obj)])
    if isinstance(obj, bool):
        data = b"\x01" if obj else b"\x00"
    elif isinstance(obj, int):
        data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
    elif isinstance(obj, float):
        data = _FLOAT.pack(obj)
    else:
        try:
            data = obj.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SerializationError(
                f"the str is not valid UTF-8 ({exc.reason} at index {exc.start}); send it as bytes, e.g. "
                "s.encode('utf-8', 'surrogatepass')"
            ) from None
    return Encoded(meta=meta, buffers=[memoryview(data)])


def decode(meta: Mapping[str, Any], buffers: Sequence[Buffer], device: str) -> bool | int | float | str | bytes | None:
    """Rebuild the value (``device`` does not apply).

    Raises:
        FrameError: Unknown ``type``, or a buffer whose size or content does not fit it.
    """
    kind = expect_keys("meta", meta, {"type"})["type"]
    if kind not in _TYPES.values():
        raise FrameError(f"meta.type is {kind!r:.100}; expected one of {', '.join(_TYPES.values())}")
    if kind == "none":
        expect_buffers(buffers, 0, NAME)
        return None
    expect_buffers(buffers, 1, NAME)
    data = host_view(buffers[0])
    if kind == "bytes":
        return bytes(data)
    if kind == "str":
        try:
            return str(data, "utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError(f"str buffer is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    if kind == "int":
        if not data.nbytes:
            raise FrameError("int buffer is empty; expected at least 1 byte")
        return int.from_bytes(data, "little", signed=True)
    if kind == "float":
        if data.nbytes != _FLOAT.size:
            raise FrameError(f"float buffer holds {data.nbytes} bytes; expected {_FLOAT.size}")
        value: float = _FLOAT.unpack(data)[0]
        return value
    if data.nbytes != 1 or data[0] > 1:
        raise FrameError(f"bool buffer is {bytes(data[:8])!r}; expected one byte, 0 or 1")
    return data[0] == 1
