"""The objects the conformance suite sends, and exact fingerprints to compare what arrived.

Both the test process and its peers build a payload from its name (deterministically), so nothing
but a name crosses the harness pipe on the way in, and only a fingerprint on the way back.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable
from typing import Any

import torch


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(20240601)


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator()).to(dtype)


def _non_contiguous() -> torch.Tensor:
    base = _randn(6, 10)
    return base.t()[::2]  # transposed and strided: neither C- nor F-contiguous


def _tensor_list() -> list[torch.Tensor]:
    return [_randn(2, 3), torch.arange(5, dtype=torch.int64), _randn(4, dtype=torch.bfloat16), torch.empty(0)]


def _large_tensor_list() -> list[torch.Tensor]:
    # About 290 KB over buffers of uneven sizes (one empty): parts cut across buffer boundaries.
    return [
        _randn(300, 100),
        torch.arange(20000, dtype=torch.int64),
        torch.empty(0),
        _randn(5001, dtype=torch.bfloat16),
    ]


_FACTORIES: dict[str, Callable[[], Any]] = {
    # One tensor (the ``tensor`` serializer): dtypes, 0-d, empty, non-contiguous, large.
    "float32-matrix": lambda: _randn(3, 4),
    "float64-vector": lambda: _randn(7, dtype=torch.float64),
    "float16-0d": lambda: torch.tensor(3.5, dtype=torch.float16),
    "bfloat16-matrix": lambda: _randn(5, 7, dtype=torch.bfloat16),
    "float8-e4m3": lambda: _randn(16, dtype=torch.float8_e4m3fn),
    "float8-e5m2": lambda: _randn(2, 8, dtype=torch.float8_e5m2),
    "int64-arange": lambda: torch.arange(-10, 10, dtype=torch.int64),
    "int8-cube": lambda: torch.arange(-60, 60, dtype=torch.int8).reshape(2, 3, 20),
    "uint8-bytes": lambda: torch.arange(256, dtype=torch.uint8),
    "bool-mask": lambda: torch.tensor([[True, False, True], [False, False, True]]),
    "empty-2d": lambda: torch.empty(0, 3),
    "non-contiguous": _non_contiguous,
    "large-4mib": lambda: _randn(1024, 1024),
    # A list of tensors (the ``chunked_tensor`` serializer).
    "tensor-list": _tensor_list,
    "tensor-list-large": _large_tensor_list,
    # Primitives.
    "none": lambda: None,
    "true": lambda: True,
    "zero": lambda: 0,
    "big-int": lambda: 2**200 + 7,
    "negative-big-int": lambda: -(2**100),
    "float": lambda: 1.25,
    "nan": lambda: math.nan,
    "infinity": lambda: -math.inf,
    "negative-zero": lambda: -0.0,
    "text": lambda: "héllo ✓ sidecar",
    "empty-text": lambda: "",
    "bytes": lambda: bytes(range(256)) * 3,
    "empty-bytes": lambda: b"",
    # JSON values.
    "dict": lambda: {"a": 1, "b": [1, 2.5, "x", None, True], "nested": {"k": [], "v": {"deep": -3}}},
    "list": lambda: [1, "two", {"three": 3.0}, [None]],
    "empty-dict": lambda: {},
}

#: Every payload name, in a stable order.
PAYLOADS: tuple[str, ...] = tuple(_FACTORIES)


def payload(name: str) -> Any:
    """Build the payload called ``name`` (the same object in every process).

    Raises:
        KeyError: No payload has that name.
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise KeyError(f"no conformance payload {name!r}; known: {', '.join(PAYLOADS)}") from None
    return factory()


def fingerprint(obj: Any) -> Any:
    """An exact, comparable and printable summary of ``obj``.

    Tensors are summarized by dtype, shape, device class and a digest of their bytes; floats by
    their bit pattern (so ``nan`` and ``-0.0`` compare exactly); ``bool`` and ``int``, ``list`` and
    ``tuple`` stay distinct.

    Raises:
        TypeError: ``obj`` holds a type the suite does not send.
    """
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:20]
        return ("tensor", str(obj.dtype), tuple(obj.shape), obj.device.type, digest)
    if obj is None or isinstance(obj, bool | int | str | bytes):
        return (type(obj).__name__, obj)
    if isinstance(obj, float):
        return ("float", struct.pack("<d", obj).hex())
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, tuple(fingerprint(item) for item in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((key, fingerprint(value)) for key, value in obj.items()))
    raise TypeError(f"cannot fingerprint {type(obj).__module__}.{type(obj).__qualname__}")
