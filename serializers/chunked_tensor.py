"""The ``chunked_tensor`` serializer: a list or tuple of tensors, of any shapes and dtypes, as one message.

Metadata is a safetensors header with one entry per tensor, named ``"0"``, ``"1"``, ..., whose
``data_offsets`` locate each tensor in the buffers laid end to end, plus
``"__metadata__": {"container": "list" | "tuple"}``; one buffer per tensor. The receiver gets the
same container type back. ``safetensors_bytes(meta)`` followed by the buffers is a ``.safetensors``
file.

Only exact ``list`` and ``tuple`` objects whose items are all tensors are taken (a named tuple would
come back as a plain tuple, so it is not); all tensors must be on one device class (CPU or CUDA).
An empty list or tuple is taken too, so that ``()`` comes back as ``()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from serializers._buffers import expect_buffers, expect_keys
from serializers._safetensors import TensorSpec, check_device, check_entry, encode_tensor, load_tensor
from sidecar_core import Buffer, Encoded, FrameError, SerializationError
from sidecar_core._frame import MAX_BUFFERS

NAME = "chunked_tensor"
PRIORITY = 20
#: The safetensors key that holds the container kind.
METADATA = "__metadata__"
CONTAINERS: dict[str, type[list[torch.Tensor]] | type[tuple[torch.Tensor, ...]]] = {"list": list, "tuple": tuple}


def accepts(obj: object) -> bool:
    """Whether ``obj`` is a list or tuple (exact types) of tensors."""
    return (type(obj) is list or type(obj) is tuple) and all(isinstance(item, torch.Tensor) for item in obj)


def encode(obj: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Encoded:
    """Describe every tensor and give one buffer per tensor.

    Raises:
        SerializationError: Too many tensors, tensors on both CPU and CUDA, or a tensor that cannot
            be sent (the message says how to fix it).
    """
    if len(obj) > MAX_BUFFERS:
        raise SerializationError(
            f"{len(obj)} tensors in one message exceed the limit of {MAX_BUFFERS}; send them in several messages"
        )
    meta: dict[str, Any] = {METADATA: {"container": type(obj).__name__}}
    buffers: list[Buffer] = []
    devices: set[str] = set()
    begin = 0
    for index, tensor in enumerate(obj):
        try:
            entry, buf, device = encode_tensor(tensor, begin)
        except SerializationError as exc:
            raise SerializationError(f"tensor {index} of the {type(obj).__name__}: {exc}") from None
        meta[str(index)] = entry
        buffers.append(buf)
        devices.add(device)
        begin = entry["data_offsets"][1]
    if len(devices) > 1:
        raise SerializationError(
            f"the {type(obj).__name__} mixes CPU and CUDA tensors; move them to one device class before sending"
        )
    return Encoded(meta=meta, buffers=buffers, device="cuda" if devices == {"cuda"} else "cpu")


def decode(
    meta: Mapping[str, Any], buffers: Sequence[Buffer], device: str
) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """Rebuild the list or tuple, validating all metadata against the buffers first.

    Raises:
        FrameError: The metadata is malformed or disagrees with the buffers.
    """
    expect_buffers(buffers, len(buffers), NAME)
    names = [str(index) for index in range(len(buffers))]
    entries = expect_keys("meta", meta, {METADATA, *names})
    info = expect_keys(f"meta[{METADATA!r}]", entries[METADATA], {"container"})
    container = CONTAINERS.get(info["container"]) if isinstance(info["container"], str) else None
    if container is None:
        raise FrameError(f"meta[{METADATA!r}].container is {info['container']!r}; expected 'list' or 'tuple'")
    specs: list[TensorSpec] = []
    begin = 0
    for name, buf in zip(names, buffers, strict=True):
        specs.append(check_entry(f"meta[{name!r}]", entries[name], buf, begin))
        begin = specs[-1].end
    target = check_device(device)
    return container(
        load_tensor(f"meta[{name!r}]", spec, buf, target) for name, spec, buf in zip(names, specs, buffers, strict=True)
    )
