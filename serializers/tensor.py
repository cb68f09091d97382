"""The ``tensor`` serializer: one ``torch.Tensor``, described by a safetensors header.

Metadata is ``{"tensor": {"dtype": "F32", "shape": [...], "data_offsets": [0, nbytes]}}`` and the
one buffer holds the tensor's bytes, so ``safetensors_bytes(meta) + buffer`` is a ``.safetensors``
file holding one tensor named ``tensor``. Every dtype safetensors can load is supported (see
:data:`serializers._safetensors.DTYPES`), 0-d and empty tensors included.

Sending: a CPU tensor's buffer is a ``memoryview`` of its memory, a CUDA tensor's is a flat uint8
CUDA view (``Encoded.device == "cuda"``); a non-contiguous tensor is copied once to make it
contiguous. Subclasses (``nn.Parameter``) are sent as their data; the receiver gets a plain tensor.

Receiving: a host buffer becomes a zero-copy view (copied once only where the bytes are not
aligned for the dtype); ``device`` decides where the tensor lands (a host buffer bound for CUDA is
copied to the GPU, a CUDA buffer bound for ``cpu`` is copied to the host).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from serializers._buffers import expect_buffers, expect_keys
from serializers._safetensors import check_device, check_entry, encode_tensor, load_tensor, safetensors_bytes
from sidecar_core import Buffer, Encoded

NAME = "tensor"
PRIORITY = 10
#: The safetensors name of the one tensor.
KEY = "tensor"

__all__ = ["KEY", "NAME", "PRIORITY", "accepts", "decode", "encode", "safetensors_bytes"]


def accepts(obj: object) -> bool:
    """Whether ``obj`` is a tensor (its dtype is checked by :func:`encode`, which says what to do)."""
    return isinstance(obj, torch.Tensor)


def encode(obj: torch.Tensor) -> Encoded:
    """Describe a tensor and give its bytes as the one buffer.

    Raises:
        SerializationError: Its dtype, layout or device cannot be sent (the message says how to fix).
    """
    entry, buf, device = encode_tensor(obj, 0)
    return Encoded(meta={KEY: entry}, buffers=[buf], device=device)


def decode(meta: Mapping[str, Any], buffers: Sequence[Buffer], device: str) -> torch.Tensor:
    """Rebuild the tensor, validating the metadata against the buffer first.

    Raises:
        FrameError: The metadata is malformed or disagrees with the buffer.
    """
    expect_buffers(buffers, 1, NAME)
    where = f"meta[{KEY!r}]"
    spec = check_entry(where, expect_keys("meta", meta, {KEY})[KEY], buffers[0], 0)
    return load_tensor(where, spec, buffers[0], check_device(device))
