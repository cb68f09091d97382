"""The example ``numpy`` serializer: encode/decode, hostile metadata, and real processes.

Run with ``pytest -p sidecar_core.testing`` (this package's pytest settings pass it already).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sidecar_example_serializer import numpy_array

from sidecar_core import (
    PREFIX_BYTES,
    Codec,
    FrameError,
    Header,
    SerializationError,
    Sidecar,
    decode_header,
    encode_header,
    get_registry,
)
from sidecar_core.testing import Deployment

#: The round trip between processes runs over the default transport.
sidecar_transports = ("localhost",)

ARRAYS = {
    "float32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "big-endian": np.arange(5, dtype=">i8"),
    "bool": np.array([[True, False], [False, True]]),
    "complex": np.array([1 + 2j, -3.5j], dtype=np.complex64),
    "uint16": np.arange(7, dtype=np.uint16),
    "0-d": np.array(2.5),
    "empty": np.empty((0, 3), dtype=np.int32),
    "non-contiguous": np.arange(24, dtype=np.float64).reshape(4, 6).T[::2],
}


def codec() -> Codec:
    return Codec(get_registry().load_serializers())


def same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_registered_through_the_entry_point() -> None:
    entry = get_registry().serializers["numpy"]
    assert entry.source.startswith("sidecar-example-serializer ")
    assert entry.target == "sidecar_example_serializer.numpy_array"


def test_picked_for_arrays_only() -> None:
    c = codec()
    assert c.encode(ARRAYS["float32"])[0] == "numpy"
    assert c.encode(torch.zeros(2))[0] == "tensor"
    assert c.encode([1, 2])[0] == "json"
    with pytest.raises(SerializationError):  # object arrays would need pickle: nobody takes them
        c.encode(np.array([object()], dtype=object))


@pytest.mark.parametrize("name", ARRAYS)
def test_round_trip_through_frames(name: str) -> None:
    c = codec()
    array = ARRAYS[name]
    for limit in (None, 5):  # in one frame, and split into 5-byte parts joined as one uint8 tensor
        frames = c.frames(array, id="a", chunk_id=0, num_chunks=1, src=0, max_part_bytes=limit)
        # As on the wire: the metadata travels as JSON (a tuple would come back as a list, NaN as None).
        header = decode_header(encode_header(frames[0].header)[PREFIX_BYTES:])
        if len(frames) == 1:
            buffers: list[Any] = frames[0].buffers
        else:
            joined = torch.cat([torch.frombuffer(bytearray(b), dtype=torch.uint8) for f in frames for b in f.buffers])
            buffers = [joined]
        got = c.decode(header, buffers, "cpu")
        assert isinstance(got, np.ndarray), (name, limit)
        assert same(got, array), (name, limit)


def bad_header(meta: dict[str, Any], size: int) -> Header:
    return Header(kind="data", id="bad", src=1, serializer="numpy", meta=meta, layout=[size], sizes=[size])


@pytest.mark.parametrize(
    ("meta", "size", "message"),
    [
        ({"dtype": "|O8", "shape": [1]}, 8, "not a numeric or bool"),
        ({"dtype": "<f4,<i4", "shape": [1]}, 8, "not a numeric or bool"),
        ({"dtype": "<U4", "shape": [1]}, 16, "not a numeric or bool"),
        ({"dtype": "<f3", "shape": [1]}, 3, "unknown dtype"),
        ({"dtype": "<f4", "shape": [-1]}, 4, "shape must be a list"),
        ({"dtype": "<f4", "shape": [True]}, 4, "shape must be a list"),
        ({"dtype": "<f4", "shape": "4"}, 16, "shape must be a list"),
        ({"dtype": "<f4", "shape": [1] * 65}, 4, "shape must be a list"),
        ({"dtype": "<f4", "shape": [3]}, 8, "need 12 bytes, the buffer has 8"),
        ({"dtype": "<f4", "shape": [2**40, 2**40]}, 8, "the buffer has 8"),
        ({"dtype": "<f4"}, 4, "exactly the keys dtype and shape"),
        ({"dtype": "<f4", "shape": [1], "pickle": True}, 4, "exactly the keys dtype and shape"),
    ],
)
def test_hostile_metadata_is_a_frame_error(meta: dict[str, Any], size: int, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        codec().decode(bad_header(meta, size), [memoryview(bytes(size))], "cpu")


def test_buffer_count_is_checked() -> None:
    header = Header(
        kind="data",
        id="bad",
        src=1,
        serializer="numpy",
        meta={"dtype": "<i1", "shape": [1]},
        layout=[1, 1],
        sizes=[1, 1],
    )
    with pytest.raises(FrameError, match="expected 1 buffer, got 2"):
        codec().decode(header, [memoryview(b"a"), memoryview(b"b")], "cpu")


def recv_array(sidecar: Sidecar, id: str) -> tuple[str, tuple[int, ...], bytes]:
    """Runs in the peer: receive an array and describe it exactly."""
    array = sidecar.recv_sync(id, timeout=30)
    assert isinstance(array, np.ndarray)
    described = (array.dtype.str, array.shape, array.tobytes())
    sidecar.mark_done_sync(id)
    return described


def test_round_trip_between_processes(sidecar_deployment: Deployment) -> None:
    peer = sidecar_deployment.peer(1)
    for name, array in ARRAYS.items():
        sidecar_deployment.sidecar.send(array, f"np-{name}", 1).result(60)
        assert peer.call(recv_array, f"np-{name}") == (array.dtype.str, array.shape, array.tobytes()), name


def test_module_protocol() -> None:
    assert numpy_array.NAME == "numpy"
    assert numpy_array.PRIORITY < 20
