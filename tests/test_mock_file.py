"""The mock-file transport: Cornserve's mock mode, through the real Sidecar and real processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import resource
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from _waiting import wait_until

from sidecar_core import (
    AlreadyDoneError,
    CapacityError,
    FrameError,
    RecvTimeoutError,
    SerializationError,
    SettingsError,
    Sidecar,
    SidecarClosedError,
    SidecarConfig,
    SidecarError,
    UnknownKeyError,
)
from sidecar_core.testing import PeerProcess
from transports.mock_file import MAPPING_VAR, MockFileTransport

VARS = (
    "SIDECAR_TRANSPORT",
    "SIDECAR_MOCK_FILE__MAPPING",
    "SIDECAR_MOCK_FILE__DIR",
    "CORNSERVE_MOCK_SIDECAR",
    "CORNSERVE_MOCK_SIDECAR_MAPPING",
    "SIDECAR_CHUNK_SIZE",
)
WAIT = 30.0

Env = Callable[..., None]


def assert_same(got: Any, want: Any) -> None:
    """Exact equality: same types all the way down, tensors compared bit for bit."""
    assert type(got) is type(want), f"{type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == want


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Env:
    """Set exactly the given mock-file variables (all others unset) for this test."""

    def apply(**values: str) -> None:
        for name in VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return apply


@contextmanager
def mock_sidecar(transport: str | None = "mock-file", **settings: Any) -> Iterator[Sidecar]:
    sidecar = Sidecar(SidecarConfig(sidecar_rank=0, transport=transport, settings=settings))
    try:
        yield sidecar
    finally:
        sidecar.shutdown_sync()


def mapping_env(mapping: dict[str, Path], **more: str) -> dict[str, str]:
    return {"SIDECAR_MOCK_FILE__MAPPING": json.dumps({k: str(v) for k, v in mapping.items()}), **more}


# -- mapping mode in one process ------------------------------------------------------------------

OBJECTS: dict[str, tuple[str, Any]] = {
    "tensor": (".pt", torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))),
    "bf16": (".pth", torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t()),
    "safetensor": (".safetensors", torch.arange(10, dtype=torch.int16)),
    "list": (".pt", [torch.ones(2, 3), torch.arange(4, dtype=torch.int64)]),
    "tuple": (".pt", (torch.zeros(0), torch.tensor(True))),
    "dict": (".json", {"key1": "value1", "key2": 123, "key3": [1, 2, 3]}),
    "int": (".json", 42),
    "str": (".json", "héllo"),
    "none": (".json", None),
    "bytes": (".bin", b"\x00\xffraw"),
    "empty-bytes": (".bin", b""),
    "nan": (".pt", math.nan),
}


def test_round_trips_through_the_sidecar(env: Env, tmp_path: Path) -> None:
    mapping = {f"{name}-0": tmp_path / f"{name}{suffix}" for name, (suffix, _) in OBJECTS.items()}
    env(**mapping_env(mapping))
    with mock_sidecar() as sidecar:
        for name, (_, obj) in OBJECTS.items():
            sidecar.send(obj, name, [[]]).result(WAIT)  # Cornserve sends to [[]]
        for name, (_, obj) in OBJECTS.items():
            assert mapping[f"{name}-0"].exists()
            assert_same(sidecar.recv_sync(name), obj)
            sidecar.mark_done_sync(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in mapping.values())


def test_written_files_are_plain_torch_safetensors_and_json(env: Env, tmp_path: Path) -> None:
    mapping = {"t-0": tmp_path / "t.pt", "s-0": tmp_path / "s.safetensors", "j-0": tmp_path / "j.json"}
    env(**mapping_env(mapping))
    t = torch.arange(6.0).reshape(2, 3)
    with mock_sidecar() as sidecar:
        sidecar.send(t, "t", 1).result(WAIT)
        sidecar.send(t, "s", 1).result(WAIT)
        sidecar.send({"a": [1, None]}, "j", 1).result(WAIT)
    assert_same(torch.load(mapping["t-0"], weights_only=True), t)
    assert_same(safetensors.torch.load_file(mapping["s-0"])["tensor"], t)
    assert json.loads(mapping["j-0"].read_text()) == {"a": [1, None]}


def test_files_cornserve_wrote_load_unchanged(env: Env, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    tensor, chunk0, chunk1 = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    values: dict[str, Any] = {"dict": {"key1": "value1", "key2": 123, "key3": [1, 2, 3]}, "int": 42, "list": [1, "x"]}
    mapping = {
        "tensor-0": tmp_path / "tmp_tensor.pt",
        "chunked-0": tmp_path / "tmp_tensor-chunk0.pt",
        "chunked-1": tmp_path / "tmp_tensor-chunk1.pth",
        **{f"{name}-0": tmp_path / f"tmp_{name}.json" for name in values},
    }
    # Exactly how Cornserve's mock mode writes: torch.save for tensors, json.dumps + write_text otherwise.
    torch.save(tensor, mapping["tensor-0"])
    torch.save(chunk0, mapping["chunked-0"])
    torch.save(chunk1, mapping["chunked-1"])
    for name, value in values.items():
        mapping[f"{name}-0"].write_text(json.dumps(value))
    env(CORNSERVE_MOCK_SIDECAR="1", CORNSERVE_MOCK_SIDECAR_MAPPING=json.dumps({k: str(v) for k, v in mapping.items()}))
    with mock_sidecar(transport=None) as receiver:
        assert receiver.transport_name == "mock-file"
        assert_same(receiver.recv_sync("tensor"), tensor)
        assert_same(receiver.recv_sync("chunked", 0), chunk0)
        assert_same(receiver.recv_sync("chunked", 1), chunk1)
        for name, value in values.items():
            assert_same(receiver.recv_sync(name), value)


def test_sender_and_receiver_of_the_same_rank_as_cornserve_tests_do(env: Env, tmp_path: Path) -> None:
    env(CORNSERVE_MOCK_SIDECAR="true", CORNSERVE_MOCK_SIDECAR_MAPPING=json.dumps({"x-0": str(tmp_path / "x.pt")}))
    t = torch.randn(4, 4)
    with mock_sidecar(transport=None) as sender, mock_sidecar(transport=None) as receiver:
        sender.send(t, "x", [[]]).result(WAIT)
        assert_same(receiver.recv_sync("x"), t)


def test_missing_mapped_file_is_the_end_of_the_stream(env: Env, tmp_path: Path) -> None:
    mapping = {"s-0": tmp_path / "s0.pt", "s-1": tmp_path / "s1.pt", "gone-0": tmp_path / "gone.json"}
    torch.save(torch.ones(2), mapping["s-0"])
    env(**mapping_env(mapping))
    with mock_sidecar() as sidecar:
        assert sidecar.recv_sync("gone") is None
        assert_same(sidecar.recv_sync("s", 0), torch.ones(2))
        assert sidecar.recv_sync("s", 1) is None
    assert not mapping["gone-0"].exists()


def test_chunks_past_a_missing_file_are_past_the_end(env: Env, tmp_path: Path) -> None:
    mapping = {f"r-{i}": tmp_path / f"r{i}.pt" for i in range(3)}
    torch.save(torch.zeros(1), mapping["r-0"])
    torch.save(torch.full((1,), 2.0), mapping["r-2"])  # r-1 is missing: the stream ends there
    env(**mapping_env(mapping))
    with mock_sidecar() as sidecar:
        assert sidecar.recv_sync("r", 1) is None
        assert sidecar.recv_sync("r", 2) is None  # past the end: the transport is not asked
    with mock_sidecar() as sidecar:
        assert_same(sidecar.recv_sync("r", 2), torch.full((1,), 2.0))  # the end is not known yet
        assert sidecar.recv_sync("r", 1) is None
        assert sidecar.recv_sync("r", 2) is None  # now it is
        sidecar.mark_done_sync("r", 2)
        with pytest.raises(AlreadyDoneError):
            sidecar.recv_sync("r", 2)


def test_a_receive_with_no_time_to_wait_still_looks_once(env: Env, tmp_path: Path) -> None:
    # A lookup runs on the sidecar's loop: a timeout of 0 used to expire before it had looked.
    (tmp_path / "there-0.json").write_text('{"v": 1}')
    mapping = {"mapped-0": tmp_path / "m.json", "gone-0": tmp_path / "gone.json"}
    mapping["mapped-0"].write_text("[2]")
    env(**mapping_env(mapping, SIDECAR_MOCK_FILE__DIR=str(tmp_path)))
    with mock_sidecar() as sidecar:
        assert sidecar.recv_sync("there", timeout=0) == {"v": 1}
        assert asyncio.run(sidecar.recv("mapped", timeout=0)) == [2]
        assert sidecar.recv_sync("gone", timeout=0) is None  # a mapped file that is missing ends the stream
        with pytest.raises(RecvTimeoutError, match="recv id='absent' chunk=0 timed out after 0s"):
            sidecar.recv_sync("absent", timeout=0)
        with pytest.raises(RecvTimeoutError, match="recv id='absent' chunk=0 timed out after 0s"):
            asyncio.run(sidecar.recv("absent", timeout=0))


def test_a_receive_does_not_wait_much_past_its_timeout_while_the_loop_is_held(env: Env, tmp_path: Path) -> None:
    # Lookups run on the sidecar's loop; a callback holding it must not hold receives far past their timeout.
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    with mock_sidecar() as sidecar:
        release = threading.Event()
        sidecar._loop_thread.loop.call_soon_threadsafe(release.wait, WAIT)
        try:
            start = time.monotonic()
            with pytest.raises(RecvTimeoutError, match=r"timed out after 0\.5s"):
                sidecar.recv_sync("held", timeout=0.5)
            elapsed = time.monotonic() - start
        finally:
            release.set()
        assert elapsed < 3.0, f"a receive with a 0.5 s timeout took {elapsed:.1f}s"


def test_a_file_found_in_time_is_loaded_however_long_that_takes(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The timeout bounds the looking, not the loading: a large file found at once must not time out.
    import transports.mock_file as mock_file_module

    load = mock_file_module._load

    def slow_load(name: str, path: Path) -> object:
        time.sleep(2.0)
        return load(name, path)

    monkeypatch.setattr(mock_file_module, "_load", slow_load)
    mapping = {"big-0": tmp_path / "big.json"}
    mapping["big-0"].write_text("[1, 2, 3]")
    env(**mapping_env(mapping))
    with mock_sidecar() as sidecar:
        assert sidecar.recv_sync("big", timeout=0.2) == [1, 2, 3]


def test_a_receive_that_gives_up_stops_looking_for_its_file(env: Env, tmp_path: Path) -> None:
    # Each receive looks for its file on the sidecar's loop until the chunk is found or the receive's
    # timeout ends; one cancelled early (or with no timeout) must not keep looking.
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    with mock_sidecar() as sidecar:

        async def lookups() -> int:
            return len(asyncio.all_tasks()) - 1  # less this one

        async def give_up(i: int) -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sidecar.recv(f"never-{i}", timeout=math.inf), 0.05)

        for i in range(5):
            asyncio.run(give_up(i))
        with pytest.raises(RecvTimeoutError):
            sidecar.recv_sync("never-sync", timeout=0.05)
        wait_until(lambda: sidecar._loop_thread.submit(lookups()).result(WAIT) == 0, "the lookups stopped")


def test_unmapped_key_raises_naming_key_and_variable(env: Env, tmp_path: Path) -> None:
    # An empty SIDECAR_MOCK_FILE__DIR is unset, as in a shell: not the working directory.
    env(**mapping_env({"known-0": tmp_path / "k.pt"}), SIDECAR_MOCK_FILE__DIR="")
    with mock_sidecar() as sidecar:
        with pytest.raises(UnknownKeyError) as recv_error:
            sidecar.recv_sync("nope", 3)
        with pytest.raises(UnknownKeyError) as send_error:
            sidecar.send(torch.ones(1), "nope", [[]], chunk_id=3, num_chunks=4).result(WAIT)
    for error in (recv_error.value, send_error.value):
        assert isinstance(error, KeyError)
        message = str(error)
        assert message.startswith("mock-file: key 'nope-3' is not in the mapping")
        assert "SIDECAR_MOCK_FILE__MAPPING" in message
        assert "SIDECAR_MOCK_FILE__DIR" in message


def test_sidecar_keeps_serving_after_errors(env: Env, tmp_path: Path) -> None:
    env(**mapping_env({"ok-0": tmp_path / "ok.json", "bad-0": tmp_path / "bad.json"}))
    with mock_sidecar() as sidecar:
        with pytest.raises(SerializationError):
            sidecar.send(b"raw", "bad", 1).result(WAIT)
        with pytest.raises(UnknownKeyError):
            sidecar.recv_sync("other")
        sidecar.send([1, 2], "ok", 1).result(WAIT)
        assert sidecar.recv_sync("ok") == [1, 2]


# -- errors that name what to fix -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["SIDECAR_MOCK_FILE__MAPPING", "CORNSERVE_MOCK_SIDECAR_MAPPING"])
@pytest.mark.parametrize(
    ("value", "needle"), [('{"a-0": ', "is not valid JSON"), ("[1, 2]", "valid dictionary"), ('{"a-0": 3}', "path")]
)
def test_bad_mapping_names_the_variable(env: Env, name: str, value: str, needle: str) -> None:
    env(**{name: value})
    with pytest.raises(SettingsError, match=needle) as error:
        Sidecar(SidecarConfig(sidecar_rank=0, transport="mock-file"))
    assert name in str(error.value)


def test_unsupported_suffix_is_refused_at_start_naming_key_path_and_fix(env: Env, tmp_path: Path) -> None:
    # Refused when the settings load, so that `sidecar doctor` reports it too, not when the key is used.
    path = tmp_path / "data.npy"
    env(**mapping_env({"a-0": tmp_path / "fine.pt", "b-0": path}))
    with pytest.raises(SettingsError) as error, mock_sidecar():
        pass
    message = str(error.value)
    for part in (MAPPING_VAR, "'b-0'", str(path), "'.npy'", ".pt"):
        assert part in message


@pytest.mark.parametrize(
    ("suffix", "value"),
    [
        (".json", b"bytes"),
        (".json", (torch.ones(1),)),
        (".json", math.inf),
        (".json", torch.ones(1)),
        (".safetensors", [1]),
        (".safetensors", b"bytes"),
    ],
    ids=["bytes-json", "tuple-json", "inf-json", "tensor-json", "list-safetensors", "bytes-safetensors"],
)
def test_object_the_format_cannot_hold_is_refused(env: Env, tmp_path: Path, suffix: str, value: Any) -> None:
    path = tmp_path / f"out{suffix}"
    env(**mapping_env({"k-0": path}))
    with mock_sidecar() as sidecar, pytest.raises(SerializationError) as error:
        sidecar.send(value, "k", 1).result(WAIT)
    message = str(error.value)
    for part in ("'k-0'", str(path), f"map 'k-0' to a {'.bin' if isinstance(value, bytes) else '.pt'} file"):
        assert part in message
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file left behind


class Planted:
    """Unpickling this would create a file: loading must never get that far."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_files_that_cannot_be_read_raise_frame_errors(env: Env, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    files = {
        "pickle-0": tmp_path / "pickle.pt",
        "garbage-0": tmp_path / "garbage.pth",
        "json-0": tmp_path / "broken.json",
        "two-0": tmp_path / "two.safetensors",
        "dict-0": tmp_path / "dict.pt",
    }
    torch.save(Planted(marker), files["pickle-0"])
    files["garbage-0"].write_bytes(b"not a torch file")
    files["json-0"].write_text("{")
    safetensors.torch.save_file({"a": torch.ones(1), "b": torch.ones(1)}, files["two-0"])
    torch.save({"weights": torch.ones(1)}, files["dict-0"])
    env(**mapping_env(files))
    with mock_sidecar() as sidecar:
        for key, path in files.items():
            with pytest.raises(FrameError) as error:
                sidecar.recv_sync(key.removesuffix("-0"))
            assert str(path) in str(error.value)
    assert not marker.exists()


def test_a_small_file_of_a_large_tensor_view_is_refused_before_it_is_copied(env: Env, tmp_path: Path) -> None:
    # torch.save keeps an expanded view's one element; making it contiguous to send it on took all
    # 512 MiB before the bound was checked, and a view of 2**50 bytes failed with RuntimeError.
    files = {"wide-0": tmp_path / "wide.pt", "huge-0": tmp_path / "huge.pt"}
    torch.save(torch.zeros(1, dtype=torch.uint8).expand(512 << 20), files["wide-0"])
    torch.save(torch.zeros(1, dtype=torch.uint8).expand(1 << 50), files["huge-0"])
    assert files["huge-0"].stat().st_size < 4096
    env(**mapping_env(files))
    with mock_sidecar(max_buffered_bytes=1 << 20) as sidecar:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for key, nbytes in (("wide", 512 << 20), ("huge", 1 << 50)):
            with pytest.raises(CapacityError, match=f"holds {nbytes} bytes of tensors, more than SIDECAR_MAX_BUF"):
                sidecar.recv_sync(key)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB: nothing was copied


def test_a_file_holding_a_list_that_contains_itself_is_refused_not_walked_for_ever(env: Env, tmp_path: Path) -> None:
    # torch.load rebuilds shared and self-containing lists; counting a file's tensor bytes walked
    # such a list without end, on the sidecar's loop, its memory growing.
    looped: list[Any] = [torch.ones(4)]
    looped.append(looped)
    files = {"looped-0": tmp_path / "looped.pt", "fine-0": tmp_path / "fine.pt"}
    torch.save(looped, files["looped-0"])
    torch.save(torch.arange(3), files["fine-0"])
    env(**mapping_env(files))
    with mock_sidecar() as sidecar:
        with pytest.raises(FrameError, match="holds what no serializer takes"):
            sidecar.recv_sync("looped", timeout=5.0)
        assert_same(sidecar.recv_sync("fine"), torch.arange(3))  # still serving


def test_an_end_marker_that_cannot_be_read_is_a_frame_error(env: Env, tmp_path: Path) -> None:
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    (tmp_path / "deep.end.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "folder.end.json").mkdir()
    with mock_sidecar() as sidecar:
        with pytest.raises(FrameError, match=r"deep\.end\.json is malformed"):
            sidecar.recv_sync("deep", timeout=1.0)
        with pytest.raises(FrameError, match=r"folder\.end\.json cannot be read"):
            sidecar.recv_sync("folder", timeout=1.0)
        sidecar.send(1, "after", 0).result(WAIT)  # still serving
        assert sidecar.recv_sync("after") == 1


# -- atomic writes and parts ----------------------------------------------------------------------


def test_writes_are_atomic(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    env(**mapping_env({"big-0": path}))
    versions = [torch.full((1 << 21,), float(v)) for v in range(4)]  # 8 MiB each
    seen: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if not path.exists():
                continue
            try:
                t = torch.load(path, weights_only=True)
            except FileNotFoundError:
                continue
            except BaseException as exc:  # a partial file would land here
                errors.append(exc)
                return
            values = t.unique().tolist()
            if t.numel() != 1 << 21 or len(values) != 1:
                errors.append(AssertionError(f"mixed or short file: {t.numel()} elements, values {values[:5]}"))
                return
            seen.append(values[0])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with mock_sidecar() as sidecar:
            for version in versions:
                sidecar.send(version, "big", 1).result(WAIT)
            deadline = time.monotonic() + 10
            while 3.0 not in seen and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert seen, "the reader never saw the file"
    assert seen[-1] == 3.0
    assert [p.name for p in tmp_path.iterdir()] == ["big.pt"]  # no temporary file left behind


def test_messages_split_into_parts_are_joined(env: Env, tmp_path: Path) -> None:
    mapping = {"t-0": tmp_path / "t.pt", "l-0": tmp_path / "l.pt", "s-0": tmp_path / "s.json"}
    env(**mapping_env(mapping, SIDECAR_MOCK_FILE__DIR=str(tmp_path / "dir")))
    gen = torch.Generator().manual_seed(3)
    values: dict[str, Any] = {
        "t": torch.randn(100, 50, generator=gen),
        "l": (torch.arange(3, dtype=torch.uint8), torch.randn(70, 3, generator=gen), torch.empty(0)),
        "s": "x" * 5000,
        "d": [torch.randn(300, generator=gen).to(torch.bfloat16)],  # directory mode
    }
    with mock_sidecar(chunk_size=1000) as sidecar:
        for name, value in values.items():
            sidecar.send(value, name, 1).result(WAIT)
        assert_same(torch.load(mapping["t-0"], weights_only=True), values["t"])
        for name, value in values.items():
            assert_same(sidecar.recv_sync(name), value)


# -- directory mode -------------------------------------------------------------------------------


def test_test_environment_gives_a_private_directory(env: Env, tmp_path: Path) -> None:
    variables = MockFileTransport.test_environment(tmp_path)
    assert variables == {"SIDECAR_MOCK_FILE__DIR": str(tmp_path / "mock-files")}
    env(**variables)
    with mock_sidecar() as sidecar:
        assert (tmp_path / "mock-files").is_dir()
        sidecar.send({"a": 1}, "req", 1).result(WAIT)
        assert sidecar.recv_sync("req") == {"a": 1}


def test_directory_picks_json_when_json_holds_it_exactly(env: Env, tmp_path: Path) -> None:
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    values: dict[str, Any] = {
        "dict": {"a": [1, 2.5]},
        "int": 2**70,
        "str": "s",
        "tensor": torch.ones(2),
        "tensors": [torch.ones(1)],
        "bytes": b"b",
        "empty-bytes": b"",
        "nan": math.nan,
        "tuple": (),
    }
    with mock_sidecar() as sidecar:
        for name, value in values.items():
            sidecar.send(value, name, 1).result(WAIT)
        for name, value in values.items():
            assert_same(sidecar.recv_sync(name), value)
    data = {p.name for p in tmp_path.iterdir() if not p.name.endswith(".end.json")}
    assert data == {
        "dict-0.json",
        "int-0.json",
        "str-0.json",
        "tensor-0.pt",
        "tensors-0.pt",
        "bytes-0.bin",
        "empty-bytes-0.bin",
        "nan-0.pt",
        "tuple-0.pt",
    }
    # Each send knew num_chunks (1), so each id has an end marker.
    for name in values:
        assert json.loads((tmp_path / f"{name}.end.json").read_text()) == {"num_chunks": 1}


def test_directory_file_names_stay_inside_the_directory(env: Env, tmp_path: Path) -> None:
    directory = tmp_path / "files"
    env(SIDECAR_MOCK_FILE__DIR=str(directory))
    ids = ["../escape", "a/b", ".", "x" * 900]
    with mock_sidecar() as sidecar:
        for index, id in enumerate(ids):
            sidecar.send(index, id, 1).result(WAIT)
        for index, id in enumerate(ids):
            assert sidecar.recv_sync(id) == index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files"]
    assert len(list(directory.iterdir())) == 2 * len(ids)  # a data file and an end marker per id
    assert all(len(p.name) < 255 for p in directory.iterdir())


def test_resending_in_another_format_replaces_the_old_file(env: Env, tmp_path: Path) -> None:
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    with mock_sidecar() as sender:
        sender.send({"v": 1}, "k", 1).result(WAIT)
        sender.send(torch.ones(3), "k", 1).result(WAIT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k-0.pt", "k.end.json"]
    with mock_sidecar() as receiver:
        assert_same(receiver.recv_sync("k"), torch.ones(3))


def test_directory_recv_waits_for_data_and_stream_end(env: Env, tmp_path: Path) -> None:
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    with mock_sidecar() as receiver, mock_sidecar() as sender, concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(receiver.recv_sync, "stream", 0, WAIT)
        end = pool.submit(receiver.recv_sync, "stream", 2, WAIT)
        time.sleep(0.2)
        assert not first.done()
        sender.send(torch.arange(3), "stream", 1, chunk_id=0, stream=True).result(WAIT)
        assert_same(first.result(WAIT), torch.arange(3))
        assert not end.done()
        sender.send("last", "stream", 1, chunk_id=1, stream=True).result(WAIT)
        sender.close_stream("stream", 2, 1).result(WAIT)
        assert end.result(WAIT) is None
        assert receiver.recv_sync("stream", 1) == "last"
        assert receiver.recv_sync("stream", 5) is None
    assert json.loads((tmp_path / "stream.end.json").read_text()) == {"num_chunks": 2}


def test_an_int_a_pt_file_cannot_give_back_is_refused_when_sent(env: Env, tmp_path: Path) -> None:
    env(**mapping_env({"big-0": tmp_path / "big.pt", "fits-0": tmp_path / "fits.pt"}))
    with mock_sidecar() as sidecar:
        with pytest.raises(SerializationError, match=r"an int of 2041 bits cannot be read back from a \.pt file"):
            sidecar.send(2**2040, "big", [[]]).result(WAIT)
        sidecar.send(2**2038, "fits", [[]]).result(WAIT)
        assert sidecar.recv_sync("fits", timeout=WAIT) == 2**2038
        with pytest.raises(SerializationError, match=r"an int of 2101 bits"):  # inside a container too
            sidecar.send({"x": [1, 2**2100]}, "big", [[]]).result(WAIT)


def test_directory_mode_takes_ids_that_are_not_valid_utf8(env: Env, tmp_path: Path) -> None:
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    with mock_sidecar() as sidecar:
        sidecar.send({"odd": True}, "lone-\ud800", [[]]).result(WAIT)
        assert sidecar.recv_sync("lone-\ud800", timeout=WAIT) == {"odd": True}
        assert sorted(path.name for path in tmp_path.iterdir()) == ["lone-%ED%A0%80-0.json", "lone-%ED%A0%80.end.json"]


def test_files_are_written_with_the_umasks_permissions(env: Env, tmp_path: Path) -> None:
    # Readers of another user (containers sharing a volume) must be able to read what was sent.
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    with mock_sidecar() as sidecar:
        sidecar.send({"shared": True}, "perm", [[]]).result(WAIT)
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "perm-0.json").stat().st_mode) == 0o666 & ~mask


def test_directory_recv_times_out_and_stops_looking(env: Env, tmp_path: Path) -> None:
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    with mock_sidecar(recv_timeout=0.2) as sidecar:
        with pytest.raises(SidecarError, match=r"recv id='never' chunk=0 timed out after 0.2s"):
            sidecar.recv_sync("never")
        time.sleep(0.3)
        transport = sidecar._transport
        assert isinstance(transport, MockFileTransport)
        assert transport._looking == set()


def _write_whole(path: Path, text: str) -> None:
    """Write a file as a producer should, so that a reader polling the directory never sees it half written."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def test_directory_recv_waits_its_own_timeout_not_the_settings(env: Env, tmp_path: Path) -> None:
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    with mock_sidecar(recv_timeout=0.3) as sidecar:
        writer = threading.Timer(0.8, _write_whole, (tmp_path / "late-0.json", '{"on": "time"}'))
        writer.start()
        try:
            assert sidecar.recv_sync("late", timeout=WAIT) == {"on": "time"}
        finally:
            writer.join()


def test_receives_that_timed_out_leave_nothing_behind(env: Env, tmp_path: Path) -> None:
    # The transport looks for the file as long as the recv waits and answers just after it gave
    # up; the recv's waiter must not be filed then (the store would keep one per timed-out recv).
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    with mock_sidecar() as sidecar:
        for _ in range(5):
            with pytest.raises(RecvTimeoutError):
                sidecar.recv_sync("missing", timeout=0.05)
        time.sleep(0.3)  # the transport's last looks end
        assert sidecar._store._waiters == {}


def test_shutdown_ends_a_recv_looking_for_a_file(env: Env, tmp_path: Path) -> None:
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    sidecar = Sidecar(SidecarConfig(sidecar_rank=0, transport="mock-file"))
    outcome: list[BaseException] = []

    def receive() -> None:
        try:
            sidecar.recv_sync("never", timeout=WAIT)
        except BaseException as exc:
            outcome.append(exc)

    receiver = threading.Thread(target=receive)
    receiver.start()
    time.sleep(0.3)  # it is looking for the file
    sidecar.shutdown_sync()
    receiver.join(WAIT / 2)
    assert not receiver.is_alive(), "the recv waited on after the shutdown"
    assert len(outcome) == 1
    assert isinstance(outcome[0], SidecarClosedError)


def test_a_file_that_cannot_be_read_fails_the_recv_waiting_for_it(env: Env, tmp_path: Path) -> None:
    env(SIDECAR_MOCK_FILE__DIR=str(tmp_path))
    with mock_sidecar() as sidecar:
        bad = tmp_path / "bad-0.pt"
        writer = threading.Timer(0.3, lambda: bad.write_bytes(b"not a torch file"))
        writer.start()
        start = time.monotonic()
        try:
            with pytest.raises(FrameError, match=r"bad-0"):
                sidecar.recv_sync("bad", timeout=WAIT)
        finally:
            writer.join()
        assert time.monotonic() - start < WAIT / 2, "failed when the file was read, not by the timeout"


def test_mapping_mode_close_stream_writes_nothing(env: Env, tmp_path: Path) -> None:
    env(**mapping_env({"m-0": tmp_path / "m.json"}))
    with mock_sidecar() as sidecar:
        sidecar.close_stream("m", 1, [[]]).result(WAIT)
    assert list(tmp_path.iterdir()) == []


# -- two real processes sharing a mapping ---------------------------------------------------------


@dataclass
class Shared:
    peer: PeerProcess
    env: dict[str, str]
    mapping: dict[str, Path]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    base = tmp_path_factory.mktemp("mock-file-shared")
    mapping = {
        "from-peer-0": base / "from_peer.pt",
        "from-peer-1": base / "from_peer_1.json",
        "to-peer-0": base / "to_peer.safetensors",
        "to-peer-1": base / "to_peer.json",
    }
    variables = mapping_env(mapping, SIDECAR_TRANSPORT="mock-file", SIDECAR_MOCK_FILE__DIR=str(base / "dir"))
    peer = PeerProcess(1, variables)
    try:
        yield Shared(peer, variables, mapping)
    finally:
        peer.close()


def peer_send(sidecar: Sidecar, value: Any, id: str, chunk_id: int, stream: bool) -> None:
    sidecar.send(value, id, [[0]], chunk_id=chunk_id, num_chunks=chunk_id + 1, stream=stream).result(WAIT)


def peer_close(sidecar: Sidecar, id: str, num_chunks: int) -> None:
    sidecar.close_stream(id, num_chunks, [[0]]).result(WAIT)


def peer_recv(sidecar: Sidecar, id: str, chunk_id: int) -> Any:
    return sidecar.recv_sync(id, chunk_id, timeout=WAIT)


def test_two_processes_share_a_mapping(shared: Shared, env: Env) -> None:
    env(**shared.env)
    t = torch.randn(4, 6, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    shared.peer.call(peer_send, t, "from-peer", 0, False)
    shared.peer.call(peer_send, {"done": True}, "from-peer", 1, False)
    with mock_sidecar() as sidecar:
        assert_same(sidecar.recv_sync("from-peer", 0), t)
        assert sidecar.recv_sync("from-peer", 1) == {"done": True}
        sidecar.send(t.float(), "to-peer", 1).result(WAIT)
        sidecar.send([1, "two"], "to-peer", 1, chunk_id=1, num_chunks=2).result(WAIT)
    assert_same(shared.peer.call(peer_recv, "to-peer", 0), t.float())
    assert shared.peer.call(peer_recv, "to-peer", 1) == [1, "two"]


def test_two_processes_stream_through_the_directory(shared: Shared, env: Env) -> None:
    env(**shared.env)
    with mock_sidecar() as sidecar, concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(sidecar.recv_sync, "peer-stream", 0, WAIT)
        time.sleep(0.2)  # the receive starts before the peer writes
        shared.peer.call(peer_send, torch.arange(5), "peer-stream", 0, True)
        shared.peer.call(peer_send, (torch.ones(2), torch.zeros(1)), "peer-stream", 1, True)
        shared.peer.call(peer_close, "peer-stream", 2)
        assert_same(waiting.result(WAIT), torch.arange(5))
        assert_same(sidecar.recv_sync("peer-stream", 1), (torch.ones(2), torch.zeros(1)))
        assert sidecar.recv_sync("peer-stream", 2) is None
    assert os.path.exists(Path(shared.env["SIDECAR_MOCK_FILE__DIR"]) / "peer-stream.end.json")
