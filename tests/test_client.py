"""The public client: Sidecar and SidecarConfig, over the in-process ``memory`` transport."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from _checkout import checkout_env
from _waiting import wait_until

from sidecar_core import (
    AlreadyDoneError,
    DuplicateChunkError,
    PeerUnreachableError,
    PluginError,
    RecvTimeoutError,
    Registry,
    RemoteError,
    SerializationError,
    SettingsError,
    Sidecar,
    SidecarClosedError,
    SidecarConfig,
    SidecarError,
    build_registry,
    hookimpl,
)
from sidecar_core._client import flatten_ranks
from sidecar_core.testing import MemoryPlugin
from sidecar_core.testing._memory import MemoryTransport

WAIT = 10.0


@dataclass
class Event:
    hook: str
    id: str
    chunk_id: int
    rank: int
    nbytes: int
    transport: str
    thread: str


class Recorder:
    """An in-process plugin that records the observability hooks."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.errors: list[tuple[str, BaseException, str]] = []

    @hookimpl
    def sidecar_on_send(
        self, id: str, chunk_id: int, dst_rank: int, nbytes: int, seconds: float, transport: str
    ) -> None:
        assert seconds >= 0
        self.events.append(Event("send", id, chunk_id, dst_rank, nbytes, transport, threading.current_thread().name))

    @hookimpl
    def sidecar_on_recv(self, id: str, chunk_id: int, src_rank: int, nbytes: int, transport: str) -> None:
        self.events.append(Event("recv", id, chunk_id, src_rank, nbytes, transport, threading.current_thread().name))

    @hookimpl
    def sidecar_on_error(self, operation: str, error: BaseException, transport: str) -> None:
        self.errors.append((operation, error, transport))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def registry(recorder: Recorder) -> Registry:
    return build_registry(extra_plugins=(MemoryPlugin(), recorder))


def make(registry: Registry, rank: int, **settings: object) -> Sidecar:
    return Sidecar(SidecarConfig(sidecar_rank=rank, transport="memory", settings=dict(settings)), registry=registry)


@pytest.fixture
def pair(registry: Registry) -> Iterator[tuple[Sidecar, Sidecar]]:
    with make(registry, 0) as a, make(registry, 1) as b:
        yield a, b


# -- flatten_ranks and SidecarConfig ------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "ranks"),
    [(3, [3]), ([3, 4], [3, 4]), ([[3, 4], [5]], [3, 4, 5]), ([[2], [2, 1]], [2, 1]), ((7,), [7]), ([[0]], [0])],
)
def test_flatten_ranks(dst: object, ranks: list[int]) -> None:
    assert flatten_ranks(dst) == ranks  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dst", "message"),
    [
        (-1, "got -1 in -1"),
        ([1, -2], r"got -2 in \[1, -2\]"),
        ([[True]], "got True"),
        (["1"], "got '1'"),
        ([[1.0]], "got 1.0"),
        ([], "dst_sidecar_ranks is empty"),
        ([[]], "dst_sidecar_ranks is empty"),
    ],
)
def test_flatten_ranks_rejects(dst: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flatten_ranks(dst)  # type: ignore[arg-type]


def test_sidecar_config_accepts_cornserve_fields() -> None:
    config = SidecarConfig(
        sidecar_rank=1,
        group=[3, 1],
        max_workers=4,
        send_tensor_dtype=torch.bfloat16,
        send_tensor_shape=(1, 4096),
        recv_tensor_dtype=torch.float16,
        recv_tensor_shape=(2, 8),
        concurrent_copy=False,
    )
    assert config.group == [1, 3]
    assert SidecarConfig(sidecar_rank=2).group == [2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sidecar_rank": -1}, "sidecar_rank must be >= 0"),
        ({"sidecar_rank": 1, "group": [0, 2]}, "not in its group"),
        ({"sidecar_rank": 1, "settings": {"rank": 3}}, r"settings\['rank'\]=3 contradicts sidecar_rank=1"),
        (
            {"sidecar_rank": 1, "transport": "localhost", "settings": {"transport": "ucx"}},
            r"settings\['transport'\]='ucx' contradicts transport='localhost'",
        ),
    ],
)
def test_sidecar_config_rejects(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SidecarConfig(**kwargs)  # type: ignore[arg-type]


def test_rank_from_environment(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_TRANSPORT", "memory")
    monkeypatch.setenv("SIDECAR_RANK", "4")
    with Sidecar(registry=registry) as sidecar:
        assert sidecar.sidecar_rank == 4
        assert sidecar.group == [4]
        assert repr(sidecar) == "<Sidecar rank=4 transport=memory open>"
    monkeypatch.delenv("SIDECAR_RANK")
    with pytest.raises(SidecarError, match="no sidecar rank"):
        Sidecar(registry=registry)


def test_config_settings_override_the_environment(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_RECV_TIMEOUT", "30")
    with make(registry, 0, recv_timeout=0.05) as sidecar:
        assert sidecar.settings.recv_timeout == 0.05
        with pytest.raises(TimeoutError, match=r"timed out after 0\.05s"):
            sidecar.recv_sync("nothing")
    # The transport too, when the config's own transport field is left unset.
    monkeypatch.setenv("SIDECAR_TRANSPORT", "localhost")
    with Sidecar(SidecarConfig(sidecar_rank=0, settings={"transport": "memory"}), registry=registry) as sidecar:
        assert sidecar.transport_name == "memory"


# -- sending and receiving ----------------------------------------------------------------------


def test_async_recv_with_no_time_to_wait_returns_a_held_chunk(pair: tuple[Sidecar, Sidecar]) -> None:
    a, b = pair
    a.send({"x": 1}, "held", 1).result(WAIT)
    assert b.recv_sync("held") == {"x": 1}
    assert asyncio.run(b.recv("held", timeout=0)) == {"x": 1}
    with pytest.raises(RecvTimeoutError):
        asyncio.run(b.recv("not-sent", timeout=0))


def test_send_and_receive(pair: tuple[Sidecar, Sidecar]) -> None:
    a, b = pair
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous
    assert a.send(tensor, "t", [[1]]).result(WAIT) is None
    got = b.recv_sync("t")
    assert torch.equal(got, tensor)
    assert got.dtype == torch.float32
    assert b.recv_sync("t") is got  # idempotent until mark_done
    b.mark_done_sync("t")
    with pytest.raises(AlreadyDoneError):
        b.recv_sync("t")


def test_async_api(pair: tuple[Sidecar, Sidecar]) -> None:
    a, b = pair

    async def main() -> list[object]:
        waiting = asyncio.create_task(b.recv("obj", 1))
        for chunk_id, value in enumerate([{"k": [1, 2]}, "two"]):
            await asyncio.wrap_future(a.send(value, "obj", 1, chunk_id=chunk_id, num_chunks=2))
        got = [await b.recv("obj", 0), await waiting, await b.recv("obj", 2)]
        await b.mark_done("obj", 0)
        return got

    assert asyncio.run(main()) == [{"k": [1, 2]}, "two", None]


def test_stream_and_iter_chunks(pair: tuple[Sidecar, Sidecar]) -> None:
    a, b = pair
    for chunk_id in range(3):
        a.send(torch.full((2,), chunk_id), "s", 1, chunk_id=chunk_id, stream=True).result(WAIT)
    a.close_stream("s", 3, 1).result(WAIT)

    async def main() -> list[list[int]]:
        return [chunk.tolist() async for chunk in b.iter_chunks("s", mark_done=True)]

    assert asyncio.run(main()) == [[0, 0], [1, 1], [2, 2]]
    with pytest.raises(AlreadyDoneError):
        b.recv_sync("s", 2)


def test_send_to_self_is_a_value_error(pair: tuple[Sidecar, Sidecar]) -> None:
    a, _ = pair
    with pytest.raises(ValueError, match="rank 0 cannot send to itself"):
        a.send(1, "x", [[1], [0]])
    with pytest.raises(ValueError, match="cannot send to itself"):
        a.close_stream("x", 1, 0)


@pytest.mark.parametrize(("chunk_id", "num_chunks"), [(-1, 1), (1, 1), (5, 3)])
def test_chunk_id_out_of_range(pair: tuple[Sidecar, Sidecar], chunk_id: int, num_chunks: int) -> None:
    a, _ = pair
    with pytest.raises(ValueError, match=rf"chunk_id {chunk_id} must be in \[0, num_chunks={num_chunks}\)"):
        a.send(1, "x", 1, chunk_id=chunk_id, num_chunks=num_chunks)


@pytest.mark.parametrize(
    ("send", "close", "message"),
    [
        ({"id": ""}, ("", 1), "id must be a str of 1 to 1024 characters, got ''"),
        ({"id": "x" * 1025}, ("x" * 1025, 1), "id must be a str of 1 to 1024 characters"),
        ({"id": 7}, (7, 1), "id must be a str of 1 to 1024 characters, got 7"),
        ({"id": "ok-\udc80"}, ("ok-\udc80", 1), "id must be valid Unicode text, got 'ok-\\udc80': character 3 is"),
        ({"id": "x", "chunk_id": True, "num_chunks": 2}, None, "chunk_id must be an int, got True"),
        ({"id": "x", "chunk_id": 1.0, "num_chunks": 2}, None, "chunk_id must be an int, got 1.0"),
        ({"id": "x", "num_chunks": 2.0}, ("x", 2.0), "num_chunks must be an int, got 2.0"),
    ],
)
def test_bad_ids_and_chunk_numbers_are_value_errors(
    pair: tuple[Sidecar, Sidecar], send: dict[str, Any], close: tuple[Any, Any] | None, message: str
) -> None:
    """Refused at the sender, before anything is encoded (a receiver would refuse the header)."""
    a, b = pair
    with pytest.raises(ValueError, match=re.escape(message)):
        a.send(1, dst_sidecar_ranks=1, **send)
    if close is not None:
        with pytest.raises(ValueError, match=re.escape(message)):
            a.close_stream(*close, dst_sidecar_ranks=1)
    a.send(2, "x-ok", 1).result(WAIT)  # the sidecar goes on
    assert b.recv_sync("x-ok", timeout=WAIT) == 2
    b.mark_done_sync("x-ok")


@pytest.mark.parametrize(
    ("key", "timeout", "message"),
    [
        (("", 0), None, "id must be a str of 1 to 1024 characters, got ''"),
        ((7, 0), None, "id must be a str of 1 to 1024 characters, got 7"),
        (("\ud800", 0), None, "id must be valid Unicode text, got '\\ud800': character 0 is a surrogate code point"),
        (("x", None), None, "chunk_id must be an int >= 0, got None"),
        (("x", "1"), None, "chunk_id must be an int >= 0, got '1'"),
        (("x", True), None, "chunk_id must be an int >= 0, got True"),
        (("x", -1), None, "chunk_id must be an int >= 0, got -1"),
        (("x", 0), float("nan"), "timeout must be a number of seconds >= 0, or None for SIDECAR_RECV_TIMEOUT; got nan"),
        (("x", 0), -1.0, "got -1.0"),
        (("x", 0), "5", "got '5'"),
    ],
)
def test_bad_receive_arguments_are_value_errors(
    pair: tuple[Sidecar, Sidecar], key: tuple[Any, Any], timeout: Any, message: str
) -> None:
    """Refused before the store files anything: a waiter filed under a chunk_id of None once made the
    next delivery of that id fail after the chunk was stored, and release memory the store still held."""
    a, b = pair
    with pytest.raises(ValueError, match=re.escape(message)):
        b.recv_sync(*key, timeout=timeout)
    with pytest.raises(ValueError, match=re.escape(message)):
        asyncio.run(b.recv(*key, timeout=timeout))
    if timeout is None:
        with pytest.raises(ValueError, match=re.escape(message)):
            b.mark_done_sync(*key)
    a.send(torch.arange(3), "x", 1).result(WAIT)  # the sidecar goes on, and so does the id
    assert torch.equal(b.recv_sync("x", timeout=WAIT), torch.arange(3))
    b.mark_done_sync("x")


def test_a_timeout_may_be_any_real_number(pair: tuple[Sidecar, Sidecar]) -> None:
    a, b = pair
    a.send(5, "numpy-timeout", 1).result(WAIT)
    assert b.recv_sync("numpy-timeout", timeout=numpy.float32(WAIT)) == 5
    assert asyncio.run(b.recv("numpy-timeout", timeout=numpy.int64(WAIT))) == 5
    b.mark_done_sync("numpy-timeout")


def test_stream_chunk_ids_are_unbounded_and_close_needs_a_count(pair: tuple[Sidecar, Sidecar]) -> None:
    a, b = pair
    a.send(b"far", "far", 1, chunk_id=100, stream=True).result(WAIT)
    assert b.recv_sync("far", 100) == b"far"
    with pytest.raises(ValueError, match="num_chunks must be >= 0"):
        a.close_stream("far", -1, 1)
    with pytest.raises(ValueError, match="chunk_id -1"):
        a.send(b"", "far", 1, chunk_id=-1, stream=True)


def test_unserializable_object_fails_at_once(pair: tuple[Sidecar, Sidecar]) -> None:
    a, _ = pair
    with pytest.raises(SerializationError, match=r"no serializer accepts builtins\.object"):
        a.send(object(), "x", 1)
    with pytest.raises(SerializationError, match="unknown serializer 'nope'"):
        a.send(1, "x", 1, serializer="nope")


def test_forced_serializer(pair: tuple[Sidecar, Sidecar]) -> None:
    a, b = pair
    a.send([1, 2], "forced", 1, serializer="json").result(WAIT)
    assert b.recv_sync("forced") == [1, 2]
    # A forced serializer still refuses what it cannot carry exactly: a tuple would arrive as a list.
    refused = r"serializer 'json' refuses this builtins\.tuple: it cannot carry it exactly"
    with pytest.raises(SerializationError, match=refused):
        a.send((1, 2), "tuple", 1, serializer="json")
    with pytest.raises(SerializationError, match=r"serializer 'json' refuses this builtins\.dict"):
        a.send({"nan": float("nan")}, "nan", 1, serializer="json")


def test_send_errors_come_through_the_future(pair: tuple[Sidecar, Sidecar], recorder: Recorder) -> None:
    a, b = pair
    with pytest.raises(PeerUnreachableError, match="rank 7 is not served"):
        a.send(1, "lost", 7).result(WAIT)
    a.send(1, "dup", 1).result(WAIT)
    with pytest.raises(RemoteError, match="already held on rank 1"):
        a.send(2, "dup", 1).result(WAIT)
    assert b.recv_sync("dup") == 1
    with pytest.raises(PeerUnreachableError, match="rank 8 is not served"):
        a.send(3, "half", [[1], [8]]).result(WAIT)
    assert b.recv_sync("half") == 3  # the reachable destination got it
    with pytest.raises(PeerUnreachableError, match=r"2 of 3 destinations failed: .*rank 8.*; .*rank 9"):
        a.send(4, "most", [[1], [8, 9]]).result(WAIT)
    operations = [(op, type(error), transport) for op, error, transport in recorder.errors]
    assert operations == [
        ("send", PeerUnreachableError, "memory"),
        ("send", RemoteError, "memory"),
        ("send", PeerUnreachableError, "memory"),
        ("send", PeerUnreachableError, "memory"),
        ("send", PeerUnreachableError, "memory"),
    ]


def test_rejections_name_the_receivers_reason(registry: Registry) -> None:
    with make(registry, 0) as a, make(registry, 1, max_buffered_bytes=100) as b:
        with pytest.raises(RemoteError, match="SIDECAR_MAX_BUFFERED_BYTES=100 on rank 1"):
            a.send(torch.zeros(100), "big", 1).result(WAIT)
        a.send(torch.zeros(10), "small", 1).result(WAIT)
        assert b.recv_sync("small").shape == (10,)


def test_chunk_size_splits_messages(registry: Registry) -> None:
    with make(registry, 0, chunk_size=64) as a, make(registry, 1) as b:
        tensors = [torch.randn(50), torch.arange(33), torch.empty(0)]
        a.send(tensors, "parts", 1).result(WAIT)
        got = b.recv_sync("parts")
        assert [torch.equal(x, y) for x, y in zip(got, tensors, strict=True)] == [True] * 3


def test_hooks_see_sends_and_receives(pair: tuple[Sidecar, Sidecar], recorder: Recorder) -> None:
    a, b = pair
    a.send(torch.zeros(4, dtype=torch.float64), "h", 1, chunk_id=1, num_chunks=2).result(WAIT)
    b.recv_sync("h", 1)
    a.close_stream("h", 2, 1).result(WAIT)  # control frames are not reported as sends
    got = [(e.hook, e.id, e.chunk_id, e.rank, e.nbytes, e.transport) for e in recorder.events]
    assert sorted(got) == [("recv", "h", 1, 0, 32, "memory"), ("send", "h", 1, 1, 32, "memory")]
    assert {e.thread for e in recorder.events} == {"sidecar-0", "sidecar-1"}  # on the sidecars' own loops


def test_duplicate_chunk_error_is_the_receivers_reason(pair: tuple[Sidecar, Sidecar]) -> None:
    a, _ = pair
    a.send(1, "again", 1).result(WAIT)
    with pytest.raises(RemoteError) as info:
        a.send(1, "again", 1).result(WAIT)
    assert DuplicateChunkError.__name__ not in str(info.value)  # the reason, not the class, travels
    assert "send it under a fresh id" in str(info.value)


def test_calls_from_many_threads(pair: tuple[Sidecar, Sidecar]) -> None:
    a, b = pair

    def roundtrip(i: int) -> int:
        a.send(i, f"thread-{i}", 1).result(WAIT)
        value: int = b.recv_sync(f"thread-{i}")
        b.mark_done_sync(f"thread-{i}")
        return value

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(roundtrip, range(32))) == list(range(32))


def test_blocking_call_on_the_sidecars_own_thread_is_refused(pair: tuple[Sidecar, Sidecar]) -> None:
    a, _ = pair

    async def inside() -> None:
        a.recv_sync("x", timeout=0.1)

    with pytest.raises(RuntimeError, match="use the async form"):
        a._loop_thread.submit(inside()).result(WAIT)


def test_waiting_for_a_send_on_the_sidecars_own_thread_is_refused(pair: tuple[Sidecar, Sidecar]) -> None:
    # A callback that waits for another send would hold the very thread that finishes that send.
    a, b = pair
    gate = threading.Event()
    b._loop_thread.loop.call_soon_threadsafe(gate.wait, WAIT)  # b takes nothing in: a's send stays pending
    try:
        pending = a.send(1, "pending", 1)

        async def inside(wait: Callable[[], object]) -> None:
            wait()

        for wait in (pending.result, pending.exception, lambda: pending.result(timeout=0.1)):
            with pytest.raises(RuntimeError, match=r"on the sidecar's own thread .* before the send finished"):
                a._loop_thread.submit(inside(wait)).result(WAIT)
    finally:
        gate.set()
    pending.result(WAIT)
    a._loop_thread.submit(inside(pending.result)).result(WAIT)  # done: nothing to wait for
    assert b.recv_sync("pending") == 1


def test_a_send_in_flight_at_shutdown_fails_with_sidecar_closed(registry: Registry) -> None:
    with make(registry, 1) as b:
        gate = threading.Event()
        b._loop_thread.loop.call_soon_threadsafe(gate.wait, WAIT)
        try:
            a = make(registry, 0)
            pending = a.send(1, "cut-short", 1)
            a.shutdown_sync()
            error = pending.exception(WAIT)
        finally:
            gate.set()
        assert isinstance(error, SidecarClosedError), repr(error)
        assert str(error) == "send id='cut-short' chunk=0: sidecar rank 0 was shut down before it finished"


def test_errors_of_several_destinations_are_joined_whatever_their_class(
    pair: tuple[Sidecar, Sidecar], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = pair

    class Coded(SidecarError):  # a plugin's own error, whose class needs more than a message
        def __init__(self, message: str, code: int) -> None:
            super().__init__(message)
            self.code = code

    async def broken(dst: int, frame: Any) -> None:
        raise Coded("refused with a code", 7)

    monkeypatch.setattr(a._transport, "send", broken)
    with pytest.raises(SidecarError, match=r"2 of 2 destinations failed: Coded: refused with a code") as info:
        a.send(1, "both", [1, 2]).result(WAIT)
    assert isinstance(info.value.__cause__, Coded)


def test_sidecars_left_open_at_exit_take_five_seconds_at_most_together(tmp_path: Path) -> None:
    # Each held by a callback that never ends: the exit handler gives up on them after 5 s in all.
    script = textwrap.dedent(
        """
        import threading, time
        from sidecar_core import Sidecar, SidecarConfig

        for rank in range(3):
            sidecar = Sidecar(SidecarConfig(sidecar_rank=rank, transport="mock-file"))
            sidecar._loop_thread.loop.call_soon_threadsafe(threading.Event().wait)
        print("exiting", flush=True)
        """
    )
    env = checkout_env({"SIDECAR_MOCK_FILE__DIR": str(tmp_path)})
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "exiting"
        start = time.monotonic()
        process.wait(60)
        elapsed = time.monotonic() - start
    finally:
        process.kill()
    assert elapsed < 10.0, f"exiting took {elapsed:.1f}s with three stuck sidecars"


def test_a_stream_closed_again_with_another_count_is_refused(pair: tuple[Sidecar, Sidecar]) -> None:
    a, b = pair
    a.send(b"c3", "twice", 1, chunk_id=3, stream=True).result(WAIT)
    a.close_stream("twice", 5, 1).result(WAIT)
    with pytest.raises(RemoteError, match="close_stream gives id 'twice' 3 chunks, but it has 5 on rank 1"):
        a.close_stream("twice", 3, 1).result(WAIT)
    assert b.recv_sync("twice", 3) == b"c3"  # acknowledged, so kept


def test_a_fractional_timeout_times_out_and_leaves_no_waiter(pair: tuple[Sidecar, Sidecar]) -> None:
    _, b = pair
    with pytest.raises(RecvTimeoutError, match=r"timed out after 0\.05s"):
        b.recv_sync("never", timeout=Fraction(1, 20))
    with pytest.raises(RecvTimeoutError, match=r"timed out after 0\.05s"):
        asyncio.run(b.recv("never", timeout=Fraction(1, 20)))
    assert not b._store._waiters


# -- life cycle ---------------------------------------------------------------------------------


def test_context_managers(registry: Registry) -> None:
    with make(registry, 0) as sidecar:
        thread = sidecar._loop_thread.thread
        assert thread.is_alive()
    assert repr(sidecar) == "<Sidecar rank=0 transport=memory closed>"
    assert not thread.is_alive()

    async def main() -> Sidecar:
        async with make(registry, 0) as inner:
            assert repr(inner).endswith("open>")
        return inner

    assert repr(asyncio.run(main())).endswith("closed>")
    with make(registry, 0):  # the rank is free again
        pass


def test_shutdown_is_idempotent(registry: Registry) -> None:
    sidecar = make(registry, 0)
    sidecar.shutdown_sync()
    sidecar.shutdown_sync()
    asyncio.run(sidecar.shutdown())
    assert repr(sidecar).endswith("closed>")


CLOSED_CALLS: dict[str, Callable[[Sidecar], object]] = {
    "send": lambda s: s.send(1, "x", 1),
    "close_stream": lambda s: s.close_stream("x", 1, 1),
    "recv_sync": lambda s: s.recv_sync("x"),
    "mark_done_sync": lambda s: s.mark_done_sync("x"),
    "recv": lambda s: asyncio.run(s.recv("x")),
    "mark_done": lambda s: asyncio.run(s.mark_done("x")),
}


@pytest.mark.parametrize("call", CLOSED_CALLS.values(), ids=CLOSED_CALLS.keys())
def test_calls_after_shutdown_raise(registry: Registry, call: Callable[[Sidecar], object]) -> None:
    sidecar = make(registry, 0)
    sidecar.shutdown_sync()
    with pytest.raises(SidecarClosedError, match="sidecar rank 0 was shut down; create a new Sidecar"):
        call(sidecar)


def test_shutdown_ends_a_waiting_recv(registry: Registry) -> None:
    sidecar = make(registry, 0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(sidecar.recv_sync, "never", 0, 30.0)
        time.sleep(0.2)
        sidecar.shutdown_sync()
        with pytest.raises(SidecarClosedError, match="recv id='never' chunk=0: sidecar rank 0 was shut down"):
            waiting.result(WAIT)


def test_shutdown_on_the_sidecars_own_thread_is_refused_and_a_later_one_completes(registry: Registry) -> None:
    a, b = make(registry, 0), make(registry, 1)
    refused: list[BaseException] = []

    def shut_down_here() -> None:
        try:
            a.shutdown_sync()
        except RuntimeError as exc:
            refused.append(exc)

    a.send(1, "x", 1).result(5)
    # On the sidecar's thread, as a send future's callback runs (attached to a future that is done
    # already, a callback runs on the attaching thread instead: the send above is too quick for that).
    a._loop_thread.call_soon(shut_down_here)
    wait_until(lambda: refused, "the blocking call on the sidecar's thread is refused")
    assert "sidecar's own thread" in str(refused[0])
    assert b.recv_sync("x", timeout=5) == 1
    a.shutdown_sync()
    b.shutdown_sync()
    with make(registry, 0) as again:  # the rank's transport was closed: it can serve again
        assert again.sidecar_rank == 0


def test_recv_sync_takes_an_infinite_timeout(pair: tuple[Sidecar, Sidecar]) -> None:
    a, b = pair
    later = threading.Timer(0.2, lambda: a.send("late", "forever", 1))
    later.start()
    try:
        assert b.recv_sync("forever", timeout=math.inf) == "late"
    finally:
        later.join()


def test_a_misspelt_setting_in_the_config_is_refused_with_a_suggestion(registry: Registry) -> None:
    with pytest.raises(
        SettingsError, match=r"unknown sidecar setting\(s\) 'recv_timout' \(did you mean 'recv_timeout'\?\)"
    ):
        make(registry, 0, recv_timout=5)


def test_a_callback_attached_while_another_thread_settles_a_send_never_runs_on_that_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A transport may report a fast-path send's outcome from a thread polling in result(). The guide
    # promises callbacks run on the sidecar's thread, or at once on the thread attaching one to a
    # future that is done: never on that polling thread, even when attached while it settles.
    from sidecar_core._client import SendFuture
    from sidecar_core._frame import Frame, Header

    with make(build_registry(extra_plugins=(MemoryPlugin(),)), 0) as sidecar:
        assert not sidecar._reports_sends  # no hooks: an outcome off the loop is set where it arrives
        future: SendFuture[None] = SendFuture("send id='x'")
        done, _ = sidecar._fast_send_outcome(future, 1, Frame(Header(kind="data", id="x", src=0)))
        settling, go_on = threading.Event(), threading.Event()
        report = sidecar._report_send

        def slow_report(*args: Any) -> None:  # the polling thread, between deciding and setting
            settling.set()
            assert go_on.wait(WAIT)
            report(*args)

        monkeypatch.setattr(sidecar, "_report_send", slow_report)
        ran_on: list[str] = []
        poller = threading.Thread(target=done, args=(None,), name="poller")
        attacher = threading.Thread(
            target=lambda: future.add_done_callback(lambda _: ran_on.append(threading.current_thread().name)),
            name="attacher",
        )
        poller.start()
        assert settling.wait(WAIT)
        attacher.start()
        attacher.join(0.2)
        assert attacher.is_alive(), "attaching must wait while another thread sets the outcome"
        go_on.set()
        poller.join(WAIT)
        attacher.join(WAIT)
        future.result(WAIT)
        assert ran_on == ["attacher"], "the outcome was in: the callback runs at once on the attaching thread"

        # Attached before the outcome comes off the loop: the sidecar's thread runs it.
        monkeypatch.setattr(sidecar, "_report_send", report)
        early: SendFuture[None] = SendFuture("send id='y'")
        early.add_done_callback(lambda _: ran_on.append(threading.current_thread().name))
        poller = threading.Thread(
            target=sidecar._fast_send_outcome(early, 1, Frame(Header(kind="data", id="y", src=0)))[0], args=(None,)
        )
        poller.start()
        poller.join(WAIT)
        early.result(WAIT)
        wait_until(lambda: len(ran_on) == 2, "the second callback ran", WAIT)
        assert ran_on[1] == sidecar._loop_thread.thread.name


def test_a_fast_path_send_that_raises_leaves_no_deadline_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    # A transport's send_nowait that raises fails the send at once; its deadline must not stay filed
    # (it would later fail a future nobody holds, log that, and report a second error to the hooks).
    with make(build_registry(extra_plugins=(MemoryPlugin(),)), 0) as sidecar:

        def broken(rank: int, frame: Any, done: Any) -> bool:
            raise OSError("the transport broke")

        monkeypatch.setattr(sidecar, "_sends_nowait", True)
        monkeypatch.setattr(sidecar._transport, "send_nowait", broken)
        with pytest.raises(PluginError, match="failed in send_nowait: OSError: the transport broke") as info:
            sidecar.send(1, "x", 1)
        assert isinstance(info.value.__cause__, OSError)
        assert not sidecar._deadlines._filed


def test_a_coroutine_for_a_loop_that_ran_for_the_last_time_is_refused_not_lost() -> None:
    # A receive or send handed to a loop that will not run again used to wait forever.
    from sidecar_core._client import _LoopThread

    loop_thread = _LoopThread("finished-loop")
    loop_thread.stop()

    async def never() -> None:
        raise AssertionError("ran on a finished loop")

    with pytest.raises(SidecarClosedError, match="shut down"):
        loop_thread.submit(never())


def test_a_callback_for_a_loop_that_ran_for_the_last_time_is_refused_not_lost() -> None:
    # A loop that stopped but was not closed (stop() gave up joining its thread, or a thread hands
    # something over between the loop's last pass and its closing) would queue the callback forever:
    # whoever handed it over must hear that it has to do the work itself.
    from sidecar_core._client import _LoopThread

    loop_thread = _LoopThread("finished-loop")
    loop_thread.loop.call_soon_threadsafe(loop_thread.loop.stop)
    loop_thread.thread.join(WAIT)
    assert not loop_thread.loop.is_closed()
    with pytest.raises(SidecarClosedError, match="shut down"):
        loop_thread.call_soon(print, "never")
    loop_thread.loop.close()


# -- a transport's own bugs ---------------------------------------------------------------------


def test_a_transport_failing_with_a_foreign_error_reaches_the_caller_as_a_plugin_error(
    registry: Registry, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The guide promises SidecarErrors only; a plugin's own bug used to reach the caller as a bare
    # KeyError or OSError that named neither the transport nor the rank.
    async def broken_send(self: MemoryTransport, dst: int, frame: Any) -> None:
        raise KeyError("oops")

    with make(registry, 0) as a, make(registry, 1):
        monkeypatch.setattr(MemoryTransport, "send", broken_send)
        with pytest.raises(PluginError, match=r"transport 'memory' on rank 0 failed in send: KeyError: 'oops'") as info:
            a.send(1, "x", 1).result(WAIT)
        assert isinstance(info.value.__cause__, KeyError)
        assert recorder.errors[-1][0] == "send"
        assert isinstance(recorder.errors[-1][1], PluginError)

    async def broken_start(self: MemoryTransport) -> None:
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(MemoryTransport, "start", broken_start)
    with pytest.raises(PluginError, match=r"failed in start: OSError: \[Errno 98\] Address already in use"):
        make(registry, 2)


def test_a_transport_that_fails_to_close_is_logged_and_one_that_hangs_is_given_up(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def raising_close(self: MemoryTransport) -> None:
        raise RuntimeError("close broke")

    monkeypatch.setattr(MemoryTransport, "close", raising_close)
    make(registry, 3).shutdown_sync()
    assert "the transport failed to close" in caplog.text
    assert "close broke" in caplog.text

    async def hanging_close(self: MemoryTransport) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(MemoryTransport, "close", hanging_close)
    monkeypatch.setattr("sidecar_core._client._CLOSE_LIMIT", 0.5)
    sidecar = make(registry, 4)
    start = time.monotonic()
    sidecar.shutdown_sync()  # it used to wait for ever
    assert time.monotonic() - start < 5.0
    assert "did not close within 0.5s" in caplog.text
