"""The built-in serializers: exact round trips, the safetensors schema, validation, part joining."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import json
import math
import random
import struct
import sys
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import serializers.chunked_tensor as chunked_tensor
import serializers.json as json_serializer
import serializers.primitives as primitives
import serializers.tensor as tensor
from serializers._safetensors import DTYPES, MAX_NDIM, safetensors_bytes
from sidecar_core import (
    Buffer,
    Codec,
    Encoded,
    FrameError,
    SerializationError,
    buffer_tensor,
    get_registry,
    header_length,
)
from sidecar_core._store import ReceiveStore

CODEC = Codec([tensor, chunked_tensor, primitives, json_serializer])
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers --------------------------------------------------------------------------------------


def raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for bit-exact comparison (NaN payloads included)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.as_strided((flat.numel(),), (1,)).view(torch.uint8)


def assert_same(got: Any, want: Any) -> None:
    """Exact equality: same types all the way down, floats and tensors compared bit for bit."""
    assert type(got) is type(want), f"{type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        assert torch.equal(raw(got), raw(want))
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want)
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    else:
        assert got == want


def readonly_copies(buffers: Sequence[Buffer]) -> list[Buffer]:
    """The buffers as a receiver might hold them: read-only host memory."""
    return [memoryview(bytes(b)) for b in buffers]  # type: ignore[arg-type]


def misaligned_copies(buffers: Sequence[Buffer]) -> list[Buffer]:
    """The buffers copied to odd addresses, as they land inside a received byte stream."""
    out: list[Buffer] = []
    for b in buffers:
        data = bytearray(1) + bytearray(b)  # type: ignore[arg-type]
        out.append(memoryview(data)[1:])
    return out


def round_trips(obj: Any) -> list[Any]:
    """Decode ``obj``'s encoding from the sender's buffers, read-only copies and misaligned copies."""
    name, enc = CODEC.encode(obj)
    serializer = {s.NAME: s for s in (tensor, chunked_tensor, primitives, json_serializer)}[name]
    json.dumps(enc.meta)  # the metadata must be plain JSON
    return [
        serializer.decode(enc.meta, bufs, "cpu")
        for bufs in (enc.buffers, readonly_copies(enc.buffers), misaligned_copies(enc.buffers))
    ]


def safetensors_file(enc: Encoded) -> bytes:
    """A frame's metadata and buffers as one file."""
    return safetensors_bytes(enc.meta) + b"".join(bytes(b) for b in enc.buffers)  # type: ignore[arg-type]


# -- strategies -----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=40,
)
json_containers = st.lists(json_values, max_size=5) | st.dictionaries(st.text(), json_values, max_size=5)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Tensors of every supported dtype with arbitrary bit patterns, 0-d, empty and non-contiguous."""
    dtype = draw(st.sampled_from(sorted(DTYPES.values(), key=str)))
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed" and len(shape) < 2:
        layout = "contiguous"
    if layout == "strided":
        shape = [2 * shape[0], *shape[1:]] if shape else shape
    n = math.prod(shape) * dtype.itemsize
    data = bytearray(draw(st.binary(min_size=n, max_size=n)))
    if dtype == torch.bool:
        data = bytearray(x & 1 for x in data)
    flat = torch.frombuffer(data, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    t = flat.view(dtype).reshape(shape)
    if layout == "transposed":
        t = t.transpose(0, 1)
    elif layout == "strided" and shape:
        t = t[::2]
    return t


# -- registration ---------------------------------------------------------------------------------


def test_registry_orders_built_ins_by_priority() -> None:
    # Other installed serializer plugins may slot in between; the built-ins keep their relative order.
    names = [s.NAME for s in get_registry().load_serializers()]
    builtins = ["tensor", "chunked_tensor", "primitives", "json"]
    assert [name for name in names if name in builtins] == builtins


# -- round trips ----------------------------------------------------------------------------------


@PROPERTY
@given(
    st.none() | st.booleans() | st.integers() | st.integers(-(2**300), 2**300) | st.floats() | st.text() | st.binary()
)
def test_primitives_round_trip(value: Any) -> None:
    assert CODEC.encode(value)[0] == "primitives"
    for got in round_trips(value):
        assert_same(got, value)


@pytest.mark.parametrize(
    "bits", [0x7FF8000000000000, 0x7FF0000000000001, 0xFFF4000000ABCDEF, 0x8000000000000000, 0xFFF0000000000000]
)
def test_float_bits_survive(bits: int) -> None:
    value = struct.unpack("<d", struct.pack("<Q", bits))[0]
    for got in round_trips(value):
        assert struct.unpack("<Q", struct.pack("<d", got))[0] == bits


@PROPERTY
@given(json_containers)
def test_json_round_trip(value: Any) -> None:
    # An empty list is also a list of no tensors: chunked_tensor takes it, with the same result.
    assert CODEC.encode(value)[0] == ("chunked_tensor" if value == [] else "json")
    for got in round_trips(value):
        assert_same(got, value)


def test_json_refuses_containers_that_hold_themselves_or_nest_too_deep_through_sharing() -> None:
    # Walking one level at a time (an earlier version) doubled the work per level here: it
    # never returned. Depth first, the limit is reached along the first path.
    loop: list[Any] = []
    loop.append(loop)
    loop.append(loop)
    shared: list[Any] = []
    for _ in range(json_serializer.MAX_DEPTH + 10):
        shared = [shared, shared]
    assert not json_serializer.accepts(loop)
    assert not json_serializer.accepts(shared)
    with pytest.raises(SerializationError):
        CODEC.encode({"loop": loop})


@PROPERTY
@given(tensors())
def test_tensor_round_trip_bit_exact(t: torch.Tensor) -> None:
    assert CODEC.encode(t)[0] == "tensor"
    for got in round_trips(t):
        assert_same(got, t)


@PROPERTY
@given(st.lists(tensors(), max_size=5), st.sampled_from([list, tuple]))
def test_chunked_tensor_round_trip_bit_exact(items: list[torch.Tensor], container: type) -> None:
    value = container(items)
    assert CODEC.encode(value)[0] == "chunked_tensor"
    for got in round_trips(value):
        assert_same(got, value)


@PROPERTY
@given(tensors())
def test_tensor_frame_is_a_safetensors_file(t: torch.Tensor) -> None:
    loaded = safetensors.torch.load(safetensors_file(tensor.encode(t)))
    assert list(loaded) == [tensor.KEY]
    assert_same(loaded[tensor.KEY], t.contiguous())


@PROPERTY
@given(st.lists(tensors(), max_size=5), st.sampled_from([list, tuple]))
def test_chunked_frame_is_a_safetensors_file(items: list[torch.Tensor], container: type) -> None:
    loaded = safetensors.torch.load(safetensors_file(chunked_tensor.encode(container(items))))
    assert sorted(loaded, key=int) == [str(i) for i in range(len(items))]
    for i, item in enumerate(items):
        assert_same(loaded[str(i)], item.contiguous())


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_every_dtype_writes_a_file_load_file_reads(tmp_path: Path, code: str) -> None:
    dtype = DTYPES[code]
    t = torch.frombuffer(bytearray(range(32)), dtype=torch.uint8).view(dtype).reshape(2, -1)
    if dtype == torch.bool:
        t = torch.tensor([[True, False, True], [False, True, True]])
    path = tmp_path / "frame.safetensors"
    path.write_bytes(safetensors_file(tensor.encode(t)))
    assert_same(safetensors.torch.load_file(path)[tensor.KEY], t)


def test_a_bool_view_of_other_bytes_arrives_as_torch_reads_it() -> None:
    # Masks made by viewing uint8 as bool hold bytes other than 0 and 1; torch reads them as True.
    mask = torch.tensor([0, 2, 1, 255], dtype=torch.uint8).view(torch.bool)
    for got in round_trips(mask):
        assert got.dtype == torch.bool
        assert got.tolist() == [False, True, True, True]
        assert set(got.view(torch.uint8).tolist()) <= {0, 1}


def test_chunked_file_records_the_container(tmp_path: Path) -> None:
    path = tmp_path / "frame.safetensors"
    path.write_bytes(safetensors_file(chunked_tensor.encode((torch.ones(2), torch.arange(3)))))
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"container": "tuple"}
        assert sorted(f.keys()) == ["0", "1"]


def test_safetensors_header_is_padded_to_eight_bytes() -> None:
    head = safetensors_bytes({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    assert len(head) % 8 == 0
    assert int.from_bytes(head[:8], "little") == len(head) - 8


# -- tensor specifics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "buffer",
    [
        memoryview(bytes(range(16)))[::2],
        torch.arange(16, dtype=torch.uint8).reshape(4, 4).t(),
        torch.arange(16, dtype=torch.uint8).reshape(4, 4),
        torch.arange(4, dtype=torch.float32),
    ],
    ids=["strided memoryview", "transposed tensor", "2-d tensor", "float32 tensor"],
)
def test_a_serializer_that_returns_a_buffer_of_other_than_flat_bytes_is_named(buffer: Buffer) -> None:
    # Transports send every buffer as one block: a third-party serializer's strided buffer used to
    # fail deep in a transport (BufferError or TypeError), after the send was already filed there.
    class Strided:
        NAME = "strided"
        PRIORITY = 1

        @staticmethod
        def accepts(obj: object) -> bool:
            return True

        @staticmethod
        def encode(obj: object) -> Encoded:
            return Encoded(buffers=[buffer])

        @staticmethod
        def decode(meta: Any, buffers: Sequence[Buffer], device: str) -> object:
            raise AssertionError("not reached")

    # A wider element type would also be cut in the wrong places when the message goes in parts.
    with pytest.raises(SerializationError, match="serializer 'strided' returned a buffer that is not one flat block"):
        Codec([Strided]).frames("x", id="a", chunk_id=0, num_chunks=1, src=0, max_part_bytes=8)


def test_any_failure_of_a_serializers_decode_is_a_frame_error() -> None:
    # A transport refuses what deliver raises as documented and keeps serving; a serializer's own bug
    # (or a buffer view it cannot read) used to escape as AttributeError or BufferError instead.
    class Buggy:
        NAME = "buggy"
        PRIORITY = 1

        @staticmethod
        def accepts(obj: object) -> bool:
            return isinstance(obj, str)

        @staticmethod
        def encode(obj: object) -> Encoded:
            return Encoded(meta={"label": 3})

        @staticmethod
        def decode(meta: Any, buffers: Sequence[Buffer], device: str) -> object:
            return meta["label"].strip()

    codec = Codec([Buggy, primitives])
    [frame] = codec.frames("x", id="a", chunk_id=0, num_chunks=1, src=0, max_part_bytes=None)
    with pytest.raises(FrameError, match="serializer 'buggy' failed to decode the frame: AttributeError: 'int'"):
        codec.decode(frame.header, frame.buffers, "cpu")
    [frame] = codec.frames(1.5, id="b", chunk_id=0, num_chunks=1, src=0, max_part_bytes=None)
    strided = memoryview(bytes(2 * frame.header.sizes[0]))[::2]  # not one block: the buffer protocol refuses it
    with pytest.raises(FrameError, match="serializer 'primitives' failed to decode the frame: BufferError"):
        codec.decode(frame.header, [strided], "cpu")


def test_a_frame_prefix_of_the_wrong_length_is_a_frame_error() -> None:
    with pytest.raises(FrameError, match="frame prefix of 7 bytes, expected 8"):
        header_length(b"SCF1\x00\x00\x00")


def test_zero_d_empty_and_non_contiguous_tensors() -> None:
    for t in (torch.tensor(7.5), torch.empty(0, 3, dtype=torch.bfloat16), torch.arange(12.0).reshape(3, 4).t()):
        for got in round_trips(t):
            assert_same(got, t.contiguous())
            assert got.is_contiguous()


def test_cpu_encode_and_decode_are_zero_copy() -> None:
    t = torch.arange(16, dtype=torch.float32)
    enc = tensor.encode(t)
    (buf,) = enc.buffers
    assert isinstance(buf, memoryview)
    assert torch.frombuffer(buf, dtype=torch.uint8).data_ptr() == t.data_ptr()
    got = tensor.decode(enc.meta, enc.buffers, "cpu")
    assert got.data_ptr() == t.data_ptr()
    assert enc.device == "cpu"


def test_read_only_buffer_decodes_without_a_warning() -> None:
    enc = tensor.encode(torch.arange(4, dtype=torch.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tensor.decode(enc.meta, readonly_copies(enc.buffers), "cpu")
    assert got.tolist() == [0, 1, 2, 3]


def test_misaligned_buffer_is_copied_once_to_aligned_memory() -> None:
    enc = tensor.encode(torch.arange(4, dtype=torch.float64))
    got = tensor.decode(enc.meta, misaligned_copies(enc.buffers), "cpu")
    assert got.data_ptr() % 8 == 0
    assert got.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_uint8_cpu_tensor_buffers_decode() -> None:
    enc = chunked_tensor.encode([torch.arange(3, dtype=torch.uint8), torch.ones(2, dtype=torch.float32)])
    joined = torch.frombuffer(bytearray(b"".join(bytes(b) for b in enc.buffers)), dtype=torch.uint8)  # type: ignore[arg-type]
    got = chunked_tensor.decode(enc.meta, [joined[:3], joined[3:]], "cpu")  # the float32 view starts at offset 3
    assert_same(got, [torch.arange(3, dtype=torch.uint8), torch.ones(2)])


def test_requires_grad_and_parameters_are_sent_as_data() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    got = tensor.decode(*tensor_parts(tensor.encode(p)))
    assert type(got) is torch.Tensor
    assert not got.requires_grad


def tensor_parts(enc: Encoded) -> tuple[dict[str, Any], list[Buffer], str]:
    return enc.meta, enc.buffers, "cpu"


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (torch.ones(2, dtype=torch.complex128), "complex128"),
        (torch.ones(2).to_sparse(), "to_dense"),
        (torch.ones(2, device="meta"), "meta"),
        (torch.zeros([1] * (MAX_NDIM + 1)), "65 dimensions, more than the 64 a receiver takes; reshape it"),
    ],
)
def test_unsupported_tensors_say_how_to_fix(value: torch.Tensor, needle: str) -> None:
    with pytest.raises(SerializationError, match=needle):
        CODEC.encode(value)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_tensors_are_refused_with_how_to_send_them() -> None:
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    for value in (nested, [torch.ones(1), nested]):
        with pytest.raises(SerializationError, match=r"send their parts as a list \(tensor\.unbind\(\)\)"):
            CODEC.encode(value)


def test_mixed_devices_and_too_many_tensors_are_refused() -> None:
    from sidecar_core._frame import MAX_BUFFERS

    with pytest.raises(SerializationError, match="several messages"):
        chunked_tensor.encode([torch.ones(1)] * (MAX_BUFFERS + 1))
    with pytest.raises(SerializationError, match="tensor 1 of the list"):
        chunked_tensor.encode([torch.ones(1), torch.ones(1, dtype=torch.complex128)])


@pytest.mark.gpu
def test_cuda_tensor_travels_as_a_cuda_buffer() -> None:
    t = torch.arange(10, dtype=torch.bfloat16, device="cuda").reshape(2, 5).t()
    enc = tensor.encode(t)
    (buf,) = enc.buffers
    assert enc.device == "cuda"
    assert isinstance(buf, torch.Tensor)
    assert (buf.device.type, buf.dtype, buf.dim()) == ("cuda", torch.uint8, 1)
    on_gpu = tensor.decode(enc.meta, enc.buffers, "cuda")
    assert on_gpu.is_cuda
    assert on_gpu.data_ptr() == buf.data_ptr()
    on_host = tensor.decode(enc.meta, enc.buffers, "cpu")
    assert on_host.device.type == "cpu"
    assert_same(on_host, t.cpu().contiguous())


@pytest.mark.gpu
def test_host_buffer_lands_on_the_requested_gpu() -> None:
    t = torch.arange(6, dtype=torch.float32)
    enc = tensor.encode(t)
    got = tensor.decode(enc.meta, enc.buffers, "cuda:0")
    assert got.device == torch.device("cuda:0")
    assert_same(got.cpu(), t)
    enc = chunked_tensor.encode([t.cuda(), t.cuda().half()])
    assert enc.device == "cuda"
    items = chunked_tensor.decode(enc.meta, enc.buffers, "cpu")
    assert_same(items, [t, t.half()])


@pytest.mark.gpu
def test_cpu_and_cuda_tensors_in_one_list_are_refused() -> None:
    with pytest.raises(SerializationError, match="mixes CPU and CUDA"):
        chunked_tensor.encode([torch.ones(1), torch.ones(1, device="cuda")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a process without a CUDA device")
def test_cuda_recv_device_without_cuda_is_a_clear_error() -> None:
    enc = tensor.encode(torch.ones(2))
    with pytest.raises(FrameError, match="no CUDA device"):
        tensor.decode(enc.meta, enc.buffers, "cuda")


# -- type selection -------------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    "value",
    [
        Color.RED,
        (1, 2),
        {"a": (1, 2)},
        {1: "x"},
        {"x": math.nan},
        [math.inf],
        OrderedDict(a=1),
        [torch.ones(1), 1],
        {"t": torch.ones(1)},
        bytearray(b"x"),
        {"a": Color.RED},
        [2 ** (json_serializer.MAX_INT_BITS + 1)],
    ],
    ids=lambda value: type(value).__name__,
)
def test_values_no_serializer_holds_exactly_are_refused(value: Any) -> None:
    with pytest.raises(SerializationError, match="no serializer accepts"):
        CODEC.encode(value)


def test_self_containing_and_too_deep_containers_are_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert not json_serializer.accepts(loop)
    deep: list[Any] = []
    for _ in range(json_serializer.MAX_DEPTH):
        deep = [deep]
    assert not json_serializer.accepts(deep)
    assert json_serializer.accepts(deep[0])


@pytest.mark.parametrize(
    ("value", "name"),
    [(True, "primitives"), (1, "primitives"), ([], "chunked_tensor"), ((), "chunked_tensor"), ({}, "json")],
)
def test_serializer_choice(value: Any, name: str) -> None:
    assert CODEC.encode(value)[0] == name
    assert_same(round_trips(value)[0], value)


def test_lone_surrogates_are_refused_with_a_fix() -> None:
    with pytest.raises(SerializationError, match="send it as bytes"):
        primitives.encode("\ud800")
    with pytest.raises(SerializationError, match="send such text as bytes"):
        json_serializer.encode({"k": "\ud800"})


# -- validation: every rule raises FrameError naming the field --------------------------------------


def tensor_meta(**entry: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    base.update(entry)
    return {"tensor": base}


EIGHT = [memoryview(bytes(8))]


@pytest.mark.parametrize(
    ("meta", "buffers", "needle"),
    [
        ({}, EIGHT, r"meta must have exactly the keys \['tensor'\]"),
        ({**tensor_meta(), "x": 1}, EIGHT, r"unexpected: \['x'\]"),
        ({"tensor": [1]}, EIGHT, r"meta\['tensor'\] must be a JSON object"),
        ({"tensor": {"dtype": "F32", "shape": [2]}}, EIGHT, r"missing: \['data_offsets'\]"),
        ({"tensor": {**tensor_meta()["tensor"], "extra": 0}}, EIGHT, r"unexpected: \['extra'\]"),
        (tensor_meta(dtype="F128"), EIGHT, r"meta\['tensor'\]\.dtype is 'F128'; expected one of"),
        (tensor_meta(dtype=4), EIGHT, r"\.dtype is 4"),
        (tensor_meta(shape=[-2]), EIGHT, r"\.shape is \[-2\]; every entry must be an int in \[0, 2\*\*63\)"),
        (tensor_meta(shape=[True, 2]), EIGHT, r"\.shape is \[True, 2\]"),
        (tensor_meta(shape=[2.0]), EIGHT, r"\.shape is \[2\.0\]"),
        (tensor_meta(shape="2"), EIGHT, r"\.shape is '2'; expected a list of at most 64 ints"),
        (tensor_meta(shape=[1] * (MAX_NDIM + 1)), EIGHT, r"expected a list of at most 64 ints"),
        (tensor_meta(shape=[0, 2**63]), EIGHT, r"every entry must be an int in \[0, 2\*\*63\)"),
        (tensor_meta(shape=[0, 2**62, 2**62]), EIGHT, r"element count overflows int64"),
        (tensor_meta(shape=[2**31, 2**31]), EIGHT, r"needs 18446744073709551616 bytes but data_offsets"),
        (tensor_meta(data_offsets=[0]), EIGHT, r"\.data_offsets is \[0\]; expected \[0, end\]"),
        (tensor_meta(data_offsets=[4, 12]), EIGHT, r"\.data_offsets is \[4, 12\]"),
        (tensor_meta(data_offsets=[0, -8]), EIGHT, r"\.data_offsets is \[0, -8\]"),
        (tensor_meta(data_offsets=[0, 8.0]), EIGHT, r"\.data_offsets is \[0, 8\.0\]"),
        (tensor_meta(data_offsets=[0, 4]), EIGHT, r"shape \[2\] of F32 needs 8 bytes but data_offsets \[0, 4\] span 4"),
        (tensor_meta(), [memoryview(bytes(12))], r"span 8 bytes but its buffer holds 12"),
        (tensor_meta(), [], r"expected 1 buffer\(s\), got 0"),
        (tensor_meta(), EIGHT * 2, r"expected 1 buffer\(s\), got 2"),
        (tensor_meta(), [torch.zeros(2, dtype=torch.float32)], r"buffer 0 must be a flat contiguous uint8 tensor"),
        (tensor_meta(dtype="BOOL", shape=[2], data_offsets=[0, 2]), [memoryview(b"\x01\x02")], r"BOOL tensor"),
    ],
)
def test_tensor_validation(meta: dict[str, Any], buffers: list[Buffer], needle: str) -> None:
    with pytest.raises(FrameError, match=needle):
        tensor.decode(meta, buffers, "cpu")


def chunked_meta(container: Any = "list", **extra: Any) -> dict[str, Any]:
    return {
        "__metadata__": {"container": container},
        "0": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "1": {"dtype": "F32", "shape": [1], "data_offsets": [3, 7]},
        **extra,
    }


TWO = [memoryview(bytes(3)), memoryview(bytes(4))]


@pytest.mark.parametrize(
    ("meta", "buffers", "needle"),
    [
        ({k: v for k, v in chunked_meta().items() if k != "__metadata__"}, TWO, r"missing: \['__metadata__'\]"),
        (chunked_meta(container="set"), TWO, r"container is 'set'; expected 'list' or 'tuple'"),
        ({**chunked_meta(), "__metadata__": {"container": "list", "n": "2"}}, TWO, r"unexpected: \['n'\]"),
        (chunked_meta(), TWO[:1], r"unexpected: \['1'\]"),
        (chunked_meta(), [*TWO, memoryview(b"")], r"missing: \['2'\]"),
        (
            {**chunked_meta(), "1": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            TWO,
            r"meta\['1'\]\.data_offsets is \[0, 4\]; expected \[3, end\]",
        ),
        ({**chunked_meta(), "1": {"dtype": "F32", "shape": [1], "data_offsets": [3, 7]}}, TWO[:1] * 2, r"holds 3"),
    ],
)
def test_chunked_tensor_validation(meta: dict[str, Any], buffers: list[Buffer], needle: str) -> None:
    with pytest.raises(FrameError, match=needle):
        chunked_tensor.decode(meta, buffers, "cpu")


@pytest.mark.parametrize(
    ("meta", "buffers", "needle"),
    [
        ({"type": "complex"}, [], r"meta\.type is 'complex'; expected one of none, bool"),
        ({"type": "int", "x": 1}, [memoryview(b"\x01")], r"unexpected: \['x'\]"),
        ({"type": "none"}, [memoryview(b"")], r"expected 0 buffer\(s\), got 1"),
        ({"type": "str"}, [], r"expected 1 buffer\(s\), got 0"),
        ({"type": "bool"}, [memoryview(b"\x02")], r"bool buffer is b'\\x02'; expected one byte, 0 or 1"),
        ({"type": "bool"}, [memoryview(b"\x01\x00")], r"bool buffer"),
        ({"type": "float"}, [memoryview(bytes(4))], r"float buffer holds 4 bytes; expected 8"),
        ({"type": "int"}, [memoryview(b"")], r"int buffer is empty"),
        ({"type": "str"}, [memoryview(b"\xff")], r"str buffer is not valid UTF-8"),
    ],
)
def test_primitives_validation(meta: dict[str, Any], buffers: list[Buffer], needle: str) -> None:
    with pytest.raises(FrameError, match=needle):
        primitives.decode(meta, buffers, "cpu")


@pytest.mark.parametrize(
    ("meta", "text", "needle"),
    [
        ({"x": 1}, b"{}", r"meta must have exactly the keys \[\]"),
        ({}, b"\xff{}", r"json buffer is not valid UTF-8"),
        ({}, b"{", r"json buffer is not valid JSON"),
        ({}, b"[NaN]", r"json buffer holds NaN, which JSON does not allow"),
        ({}, b'{"a": -Infinity}', r"json buffer holds -Infinity"),
        ({}, b"3", r"json buffer holds a int; expected an object or an array"),
        ({}, b"[" + b"1" * 5000 + b"]", r"json buffer is not valid JSON"),
        ({}, b"[" * 100_000 + b"]" * 100_000, r"json buffer nests too deeply"),
        # What encode refuses (see test_self_containing_and_too_deep_containers_are_refused) is refused here too.
        ({}, b"[" * 257 + b"]" * 257, r"json buffer nests deeper than 256"),
        ({}, b"[" + b"9" * 4250 + b"]", r"or holds an int of more than 14000 bits"),
        ({}, b'{"x": 1e400}', r"json buffer is not valid JSON: Number out of range"),  # not inf
        ({}, b'["\\ud800"]', r"json buffer is not valid JSON"),  # a lone surrogate, which no str encodes
    ],
)
def test_json_validation(meta: dict[str, Any], text: bytes, needle: str) -> None:
    with pytest.raises(FrameError, match=needle):
        json_serializer.decode(meta, [memoryview(text)], "cpu")


def test_codec_names_the_message_of_a_bad_frame() -> None:
    frame = CODEC.frames(torch.ones(2), id="req-9", chunk_id=3, num_chunks=4, src=0, max_part_bytes=None)[0]
    bad = msgspec.structs.replace(frame.header, meta=tensor_meta(dtype="X"))
    with pytest.raises(FrameError, match=r"meta\['tensor'\]\.dtype is 'X'"):
        CODEC.decode(bad, frame.buffers, "cpu")


# -- parts: Codec.frames splits, ReceiveStore joins -----------------------------------------------


def deliver_shuffled(value: Any, limit: int, seed: int) -> tuple[int, Any]:
    frames = CODEC.frames(value, id="big", chunk_id=0, num_chunks=1, src=1, max_part_bytes=limit)
    random.Random(seed).shuffle(frames)
    store = ReceiveStore(CODEC, rank=0, transport="test", max_bytes=1 << 30, device="cpu")
    for frame in frames:
        store.deliver(frame)
    got = asyncio.run(store.get("big", 0, 5.0))
    return len(frames), got


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parts_of_a_big_tensor_join_in_any_order(seed: int) -> None:
    big = torch.randn(300, 70, generator=torch.Generator().manual_seed(seed))
    parts, got = deliver_shuffled(big, 4096, seed)
    assert parts == math.ceil(big.numel() * 4 / 4096)
    assert_same(got, big)


@pytest.mark.parametrize("container", [list, tuple])
def test_parts_of_a_tensor_list_join_in_any_order(container: type) -> None:
    gen = torch.Generator().manual_seed(5)
    items = container(
        [
            torch.arange(3, dtype=torch.uint8),  # leaves every later tensor at an odd offset in the joined bytes
            torch.randn(40, 33, generator=gen),
            torch.empty(0, 4),
            torch.randn(501, generator=gen).to(torch.bfloat16),
            torch.tensor(2.5, dtype=torch.float64),
            torch.tensor([True, False, True]),
        ]
    )
    parts, got = deliver_shuffled(items, 1000, 7)
    assert parts > 5
    assert_same(got, items)


@pytest.mark.parametrize("value", [bytes(range(256)) * 40, "é" * 5000, {"k": list(range(3000))}], ids=type)
def test_parts_of_other_objects_join(value: Any) -> None:
    parts, got = deliver_shuffled(value, 999, 3)
    assert parts > 1
    assert_same(got, value)


@PROPERTY
@given(
    st.lists(tensors(), max_size=6),
    st.sampled_from([list, tuple]),
    st.integers(1, 64),
    st.integers(0, 2**32 - 1),
)
def test_parts_of_any_tensor_list_join_in_any_order(
    items: list[torch.Tensor], container: type, limit: int, seed: int
) -> None:
    value = container(items)
    _, got = deliver_shuffled(value, limit, seed)
    assert_same(got, value)


def test_buffer_tensor_stays_quiet_when_torch_warns_always() -> None:
    # Torch warns about read-only buffers once per process, so the filter is skipped after that
    # first time; under torch.set_warn_always(True) it warns every time, and must still be hidden.
    view = memoryview(bytes(range(256)))
    buffer_tensor(view)  # torch's one warning, if this process has not had it yet
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tensors = [buffer_tensor(view) for _ in range(3)]
    finally:
        torch.set_warn_always(False)
    assert all(bytes(t.numpy()) == bytes(range(256)) for t in tensors)


def test_buffer_tensor_wraps_read_only_memory_quietly_from_many_threads() -> None:
    """Receive memory is read-only: wrapped without a warning, and the warning filters are left as they were."""
    data = bytes(range(256)) * 64
    view = memoryview(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # threads switch often, so unguarded filter changes would interleave
        try:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                tensors = list(pool.map(lambda _: buffer_tensor(view), range(4000)))
        finally:
            sys.setswitchinterval(interval)
        after = list(warnings.filters)
    assert after == before, "concurrent calls left the process's warning filters changed"
    assert [str(w.message) for w in caught] == []
    assert all(t.dtype == torch.uint8 and t.numel() == len(data) for t in tensors)
    assert bytes(tensors[-1].numpy()) == data
    assert buffer_tensor(memoryview(b"")).numel() == 0
