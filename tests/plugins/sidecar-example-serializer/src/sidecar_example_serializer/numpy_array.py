"""The ``numpy`` serializer: a ``numpy.ndarray`` as its bytes, with ``{"dtype", "shape"}`` metadata.

``dtype`` is numpy's array-protocol string (byte order, kind, item size: ``"<f4"``, ``"|b1"``);
only numeric and boolean kinds are accepted, so nothing the receiver builds can run code. The one
buffer holds the array's elements in C order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sidecar_core import Buffer, Encoded, FrameError

NAME = "numpy"
PRIORITY = 15  # after ``tensor`` (10); nothing else takes numpy arrays
#: Kinds sent: bool, signed and unsigned ints, floats, complex.
KINDS = "biufc"
MAX_DIMS = 64
_DTYPE = re.compile(r"[<>|][biufc][0-9]{1,2}")


def accepts(obj: object) -> bool:
    """Whether ``obj`` is exactly a ``numpy.ndarray`` of a numeric or boolean dtype."""
    return type(obj) is np.ndarray and obj.dtype.kind in KINDS


def encode(obj: np.ndarray[Any, Any]) -> Encoded:
    """Metadata and a byte view of the array (non-contiguous arrays are copied into C order once)."""
    flat = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
    return Encoded(meta={"dtype": obj.dtype.str, "shape": list(obj.shape)}, buffers=[flat.data])


def decode(meta: Mapping[str, Any], buffers: Sequence[Buffer], device: str) -> object:
    """Rebuild the array as a view of the received bytes.

    Raises:
        FrameError: The metadata is malformed or disagrees with the buffer's size.
    """
    if set(meta) != {"dtype", "shape"}:
        raise FrameError(f"numpy: metadata must have exactly the keys dtype and shape, got {sorted(meta)}")
    dtype_str, shape = meta["dtype"], meta["shape"]
    if not isinstance(dtype_str, str) or not _DTYPE.fullmatch(dtype_str):
        raise FrameError(f"numpy: dtype {dtype_str!r} is not a numeric or bool array-protocol string like '<f4'")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError as exc:
        raise FrameError(f"numpy: unknown dtype {dtype_str!r}") from exc
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(type(n) is int and n >= 0 for n in shape):
        raise FrameError(f"numpy: shape must be a list of at most {MAX_DIMS} ints >= 0, got {shape!r}")
    if len(buffers) != 1:
        raise FrameError(f"numpy: expected 1 buffer, got {len(buffers)}")
    data = _host_view(buffers[0])
    expected = math.prod(shape) * dtype.itemsize
    if data.nbytes != expected:
        raise FrameError(
            f"numpy: dtype {dtype_str} and shape {shape} need {expected} bytes, the buffer has {data.nbytes}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _host_view(buf: Buffer) -> memoryview:
    if isinstance(buf, memoryview):
        return buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    return buf.detach().cpu().contiguous().numpy().data.cast("B")
