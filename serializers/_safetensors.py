"""The safetensors header schema, shared by the ``tensor`` and ``chunked_tensor`` serializers.

Tensor metadata is a safetensors header: one entry per tensor,
``{"<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}}``, where the offsets
locate the tensor's bytes in the message's buffers laid end to end. So a frame's metadata, written
with :func:`safetensors_bytes` and followed by its buffers, is a valid ``.safetensors`` file::

    with open("x.safetensors", "wb") as f:
        f.write(safetensors_bytes(encoded.meta))
        for buf in encoded.buffers:
            f.write(buf)

Decoding runs on untrusted input: every entry is checked (:func:`check_entry`: dtype, shape,
offsets, buffer size) before a byte is viewed (:func:`load_tensor`), and a view of host memory is
zero-copy.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch

from serializers._buffers import expect_keys
from sidecar_core import Buffer, FrameError, SerializationError, buffer_nbytes, buffer_tensor

#: safetensors dtype codes and the torch dtypes they load as (those this torch build has).
DTYPES: dict[str, torch.dtype] = {
    code: dtype
    for code, dtype in (
        ("BOOL", torch.bool),
        ("U8", torch.uint8),
        ("I8", torch.int8),
        ("I16", torch.int16),
        ("U16", getattr(torch, "uint16", None)),
        ("I32", torch.int32),
        ("U32", getattr(torch, "uint32", None)),
        ("I64", torch.int64),
        ("U64", getattr(torch, "uint64", None)),
        ("F16", torch.float16),
        ("BF16", torch.bfloat16),
        ("F32", torch.float32),
        ("F64", torch.float64),
        ("C64", torch.complex64),
        ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
        ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
        ("F8_E4M3FNUZ", getattr(torch, "float8_e4m3fnuz", None)),
        ("F8_E5M2FNUZ", getattr(torch, "float8_e5m2fnuz", None)),
    )
    if isinstance(dtype, torch.dtype)
}
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}

ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
#: Most dimensions a received tensor may have.
MAX_NDIM = 64
#: Largest dimension and element count torch can index (int64).
_MAX_INDEX = (1 << 63) - 1

Device = Literal["cpu", "cuda"]


def safetensors_bytes(meta: Mapping[str, Any]) -> bytes:
    """The start of a ``.safetensors`` file for ``meta``: 8-byte little-endian length plus JSON header.

    The header is padded with spaces so that the tensor data after it starts 8-byte aligned; write the
    message's buffers, back to back, after these bytes.
    """
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def encode_tensor(tensor: torch.Tensor, begin: int) -> tuple[dict[str, Any], Buffer, Device]:
    """Describe ``tensor`` as a safetensors entry starting at byte ``begin`` and give its bytes.

    A non-contiguous tensor is made contiguous (one copy), and a bool tensor is copied as the 0 and 1
    bytes torch reads its elements as; otherwise the buffer is a view of the tensor: a
    ``memoryview`` for CPU tensors, a flat ``torch.uint8`` CUDA tensor for CUDA tensors.

    Raises:
        SerializationError: The tensor's dtype has no safetensors code, or its layout, device or number
            of dimensions is not one the sidecar moves (the message says how to convert it).
    """
    code = CODES.get(tensor.dtype)
    if code is None:
        raise SerializationError(
            f"tensor dtype {tensor.dtype} has no safetensors code; supported: "
            f"{', '.join(str(d).removeprefix('torch.') for d in DTYPES.values())}. Convert it first "
            "(e.g. torch.view_as_real for complex128, .to(torch.float32) otherwise)"
        )
    if tensor.is_nested:  # strided by layout, but one buffer cannot hold it
        raise SerializationError("nested tensors are not supported; send their parts as a list (tensor.unbind())")
    if tensor.layout != torch.strided:
        raise SerializationError(f"tensor layout {tensor.layout} is not supported; send tensor.to_dense()")
    if tensor.device.type not in ("cpu", "cuda"):
        raise SerializationError(f"tensor on device {tensor.device} is not supported; move it to the CPU or CUDA")
    if tensor.dim() > MAX_NDIM:  # receivers refuse more
        raise SerializationError(
            f"tensor has {tensor.dim()} dimensions, more than the {MAX_NDIM} a receiver takes; reshape it first"
        )
    # Torch calls cost tens of µs each on caches a large tensor has just flushed: the common case (a
    # contiguous tensor, no lazy conjugate or negation, already flat or uint8) makes as few as it can.
    data = tensor.detach()
    if not data.is_contiguous() or data.is_conj() or data.is_neg():
        data = data.resolve_conj().resolve_neg().contiguous()
    if data.dtype == torch.bool:
        # A bool view of other bytes (uint8 2 viewed as bool) is true to torch but not a safetensors
        # BOOL, which the receiver refuses: send each element as the 0 or 1 torch reads it as.
        data = data.view(torch.uint8).ne(0)
    if data.numel() <= 1:
        # Tensors of 0 or 1 elements count as contiguous whatever their stride, which view() refuses.
        data = data.as_strided((data.numel(),), (1,))
    elif data.dim() != 1:
        data = data.reshape(-1)
    flat = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    nbytes = flat.numel()
    entry = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [begin, begin + nbytes]}
    if flat.is_cuda:
        return entry, flat, "cuda"
    return entry, flat.numpy().data, "cpu"


class TensorSpec(NamedTuple):
    """A validated safetensors entry."""

    dtype: torch.dtype
    shape: list[int]
    #: Where the tensor's bytes end in the message's payload.
    end: int


def check_entry(where: str, entry: object, buf: Buffer, begin: int) -> TensorSpec:
    """Validate one safetensors entry against its buffer, before anything is viewed or allocated.

    Args:
        where: The entry's place in the metadata, for error messages (e.g. ``meta['0']``).
        entry: The entry, as it arrived.
        buf: The tensor's bytes.
        begin: Where the entry's ``data_offsets`` must start.

    Raises:
        FrameError: The entry is malformed or disagrees with the buffer (the message names the field).
    """
    fields = expect_keys(where, entry, ENTRY_KEYS)
    code = fields["dtype"]
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise FrameError(f"{where}.dtype is {code!r:.100}; expected one of {', '.join(DTYPES)}")
    shape = _shape(f"{where}.shape", fields["shape"])
    offsets = fields["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(x) is int for x in offsets)
        or offsets[0] != begin
        or offsets[1] < begin
    ):
        raise FrameError(f"{where}.data_offsets is {offsets!r:.100}; expected [{begin}, end] with end >= {begin}")
    span = offsets[1] - begin
    expected = math.prod(shape) * dtype.itemsize
    if expected != span:
        raise FrameError(
            f"{where}: shape {shape} of {code} needs {expected} bytes but data_offsets {offsets} span {span}"
        )
    size = buffer_nbytes(buf)
    if size != span:
        raise FrameError(f"{where}: data_offsets {offsets} span {span} bytes but its buffer holds {size}")
    return TensorSpec(dtype, shape, offsets[1])


@functools.cache  # every received tensor asks; a refusal is not remembered
def check_device(device: str) -> torch.device:
    """The device received tensors land on.

    Raises:
        FrameError: ``device`` is a CUDA device but this process has none.
    """
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise FrameError(f"tensors are to land on {device} (SIDECAR_RECV_DEVICE) but this process has no CUDA device")
    return target


def load_tensor(where: str, spec: TensorSpec, buf: Buffer, target: torch.device) -> torch.Tensor:
    """The tensor a validated entry describes, on ``target``.

    A host buffer bound for the CPU is viewed without copying, unless its bytes are not aligned for
    the dtype (then they are copied once); otherwise the tensor is copied to ``target``.

    Raises:
        FrameError: A BOOL tensor holds bytes other than 0 and 1.
    """
    dtype, shape, _ = spec
    if buffer_nbytes(buf) == 0:
        return torch.empty(shape, dtype=dtype, device=target)
    flat = buffer_tensor(buf)
    if dtype == torch.bool and bool((flat > 1).any()):
        raise FrameError(f"{where}: a BOOL tensor holds bytes other than 0 and 1")
    # Each torch call below is cheap in a loop but costs tens of µs on caches a large payload has just
    # flushed, so the ones that change nothing (a uint8 view, a flat reshape, ...) are skipped.
    size = dtype.itemsize
    if size > 1 and (flat.storage_offset() % size or flat.data_ptr() % size):
        flat = flat.clone()  # unaligned bytes: one copy, so that kernels see aligned elements
    tensor = flat if dtype == torch.uint8 else flat.view(dtype)
    if len(shape) != 1:  # a flat view already has the one dimension check_entry matched to the bytes
        tensor = tensor.reshape(shape)
    if not tensor.is_cuda:
        return tensor if target.type == "cpu" else tensor.to(target)
    if target.type == "cpu":
        return tensor.cpu()
    if target.index in (None, tensor.device.index):
        return tensor
    return tensor.to(target)


def _shape(where: str, shape: object) -> list[int]:
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise FrameError(f"{where} is {shape!r:.200}; expected a list of at most {MAX_NDIM} ints")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= _MAX_INDEX:
            raise FrameError(f"{where} is {shape!r:.200}; every entry must be an int in [0, 2**63)")
    if math.prod(max(dim, 1) for dim in shape) > _MAX_INDEX:
        raise FrameError(f"{where} is {shape!r:.200}; its element count overflows int64")
    return shape
