"""Payload-buffer helpers shared by the built-in serializers.

A buffer that reaches ``decode`` is a flat byte ``memoryview`` (host memory a transport received
into) or a flat ``torch.uint8`` tensor (on CUDA, or on the CPU where the core joined a message's
parts). These helpers turn either into what a decoder needs, without copying host memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sidecar_core import Buffer, FrameError


def expect_buffers(buffers: Sequence[Buffer], count: int, serializer: str) -> None:
    """Check that a message carries ``count`` well-formed buffers.

    Raises:
        FrameError: The count differs, or a tensor buffer is not a flat ``torch.uint8`` tensor.
    """
    if len(buffers) != count:
        raise FrameError(f"{serializer}: expected {count} buffer(s), got {len(buffers)}")
    for index, buf in enumerate(buffers):
        if isinstance(buf, torch.Tensor) and (buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous()):
            raise FrameError(
                f"{serializer}: buffer {index} must be a flat contiguous uint8 tensor, got dtype {buf.dtype} "
                f"and shape {list(buf.shape)}"
            )


def expect_keys(where: str, value: object, expected: set[str]) -> Mapping[str, Any]:
    """Check that ``value`` is a JSON object with exactly the ``expected`` keys and return it.

    Raises:
        FrameError: ``value`` is not an object, or a key is missing or unexpected.
    """
    if not isinstance(value, Mapping):
        raise FrameError(f"{where} must be a JSON object, got {type(value).__name__}")
    keys = set(value)
    if keys != expected:
        missing = sorted(expected - keys)
        extra = sorted(map(str, keys - expected))
        raise FrameError(
            f"{where} must have exactly the keys {sorted(expected)} (missing: {missing or 'none'}, "
            f"unexpected: {extra or 'none'})"
        )
    return value


def host_view(buf: Buffer) -> memoryview:
    """A host ``memoryview`` of a buffer's bytes: the buffer itself, or a copy of a CUDA buffer."""
    if isinstance(buf, memoryview):
        return buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    return buf.detach().cpu().numpy().data
