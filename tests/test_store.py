"""The receive store's semantics, in-process: ReceiveStore fed by a Codec's frames."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import types
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import msgspec
import pytest
import torch

import sidecar_core._store as store_module
from sidecar_core import (
    AlreadyDoneError,
    ArrivingParts,
    Buffer,
    CapacityError,
    Codec,
    DuplicateChunkError,
    Encoded,
    Frame,
    FrameError,
    Header,
    PartRoutes,
    PeerLostError,
    PeerUnreachableError,
    RecvTimeoutError,
    SidecarClosedError,
    check_sender,
)
from sidecar_core._frame import MAX_HEADER_BYTES, decode_header
from sidecar_core._store import ReceiveStore


class RawBytes:
    """A minimal serializer: bytes in one buffer (parts arrive joined as a uint8 tensor)."""

    NAME = "raw"
    PRIORITY = 0

    @staticmethod
    def accepts(obj: object) -> bool:
        return type(obj) is bytes

    @staticmethod
    def encode(obj: bytes) -> Encoded:
        return Encoded(meta={"n": len(obj)}, buffers=[memoryview(obj)])

    @staticmethod
    def decode(meta: Mapping[str, Any], buffers: Sequence[Buffer], device: str) -> object:
        (buf,) = buffers
        data = bytes(buf) if isinstance(buf, memoryview) else buf.numpy().tobytes()
        if len(data) != meta["n"]:
            raise FrameError(f"raw: meta says {meta['n']} bytes, {len(data)} arrived")
        return data


class Pair:
    """Two bytes buffers in one message (exercises parts that cross buffer boundaries)."""

    NAME = "pair"
    PRIORITY = 1

    @staticmethod
    def accepts(obj: object) -> bool:
        return isinstance(obj, tuple)

    @staticmethod
    def encode(obj: tuple[bytes, bytes]) -> Encoded:
        return Encoded(buffers=[memoryview(obj[0]), memoryview(obj[1])])

    @staticmethod
    def decode(meta: Mapping[str, Any], buffers: Sequence[Buffer], device: str) -> object:
        return tuple(bytes(b) if isinstance(b, memoryview) else b.numpy().tobytes() for b in buffers)


CODEC = Codec([RawBytes(), Pair()])


class Releases:
    """Counts release() calls per label."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __call__(self, label: str) -> Callable[[], None]:
        def release() -> None:
            self.calls[label] = self.calls.get(label, 0) + 1

        return release


def make_store(max_bytes: int = 1 << 20, on_recv: Callable[[Header, int], None] | None = None) -> ReceiveStore:
    return ReceiveStore(CODEC, rank=5, transport="memory", max_bytes=max_bytes, device="cpu", on_recv=on_recv)


def capturing_store(max_bytes: int = 1 << 20) -> tuple[ReceiveStore, list[Sequence[Buffer]]]:
    """A store whose raw-bytes serializer records the buffers each message was decoded from."""
    captured: list[Sequence[Buffer]] = []

    class Capture(RawBytes):
        @staticmethod
        def decode(meta: Mapping[str, Any], buffers: Sequence[Buffer], device: str) -> object:
            captured.append(buffers)
            return RawBytes.decode(meta, buffers, device)

    store = ReceiveStore(Codec([Capture()]), rank=5, transport="memory", max_bytes=max_bytes, device="cpu")
    return store, captured


def frames(
    obj: object, id: str = "m", chunk_id: int = 0, num_chunks: int | None = 1, src: int = 1, part: int | None = None
) -> list[Frame]:
    return CODEC.frames(obj, id=id, chunk_id=chunk_id, num_chunks=num_chunks, src=src, max_part_bytes=part)


def close_frame(id: str, num_chunks: int, src: int = 1) -> Frame:
    return Frame(Header(kind="close", id=id, num_chunks=num_chunks, src=src))


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_recv_after_deliver_and_idempotent() -> None:
    async def main() -> None:
        store = make_store()
        store.deliver(frames(b"hello")[0])
        first = await store.get("m", 0, 1.0)
        second = await store.get("m", 0, 1.0)
        assert first == b"hello"
        assert second is first

    run(main())


def test_recv_before_deliver_waits() -> None:
    async def main() -> None:
        store = make_store()
        waiting = [asyncio.create_task(store.get("m", 0, 5.0)) for _ in range(2)]
        await settle()
        assert not any(task.done() for task in waiting)
        store.deliver(frames(b"late")[0])
        assert await asyncio.gather(*waiting) == [b"late", b"late"]

    run(main())


def test_close_releases_after_letting_go_of_the_store() -> None:
    # A release may wait for a transport's lock that a thread delivering a frame holds while it waits
    # for the store: run under the store's lock, that would deadlock shutdown.
    store = make_store()
    free: list[bool] = []

    def release() -> None:
        def try_store() -> None:
            acquired = store._lock.acquire(timeout=1)
            if acquired:
                store._lock.release()
            free.append(acquired)

        other = threading.Thread(target=try_store)
        other.start()
        other.join()

    store.deliver(frames(b"abc", id="held")[0], release)
    store.close()
    assert free == [True], "another thread could take the store while the closing store released"


def test_an_on_recv_callback_that_raises_leaves_the_chunk_stored_and_released_once() -> None:
    def broken(header: Header, nbytes: int) -> None:
        raise RuntimeError("a broken callback")

    async def main() -> None:
        releases = Releases()
        store = make_store(on_recv=broken)
        store.deliver(frames(b"abc", id="kept")[0], releases("kept"))  # does not raise
        assert releases.calls == {}
        assert await store.get("kept", 0, 1.0) == b"abc"
        store.mark_done("kept", 0)
        assert releases.calls == {"kept": 1}

    asyncio.run(main())


def test_a_failure_after_a_chunk_is_stored_does_not_release_it() -> None:
    # A waiter filed under a key that cannot be compared with the chunk numbers (the client refuses
    # such keys now) made handing out a chunk raise after it was stored: deliver then released the
    # memory of a chunk the store still held and would hand out.
    async def main() -> None:
        releases = Releases()
        store = make_store()
        odd: concurrent.futures.Future[object] = concurrent.futures.Future()
        store.add_waiter("kept", None, odd)  # type: ignore[arg-type]
        store.deliver(frames(b"abc", id="kept")[0], releases("kept"))  # logs; does not raise
        assert releases.calls == {}
        assert await store.get("kept", 0, 1.0) == b"abc"
        store.mark_done("kept", 0)
        assert releases.calls == {"kept": 1}

    asyncio.run(main())


def test_a_frame_whose_header_is_too_large_is_refused_when_sent() -> None:
    # Receivers refuse headers over MAX_HEADER_BYTES; ucx could not even take the header message
    # (the connection broke). The sender now raises before anything is sent.
    class Wordy(RawBytes):
        NAME = "wordy"

        @staticmethod
        def encode(obj: bytes) -> Encoded:
            return Encoded(meta={"n": len(obj), "notes": "x" * MAX_HEADER_BYTES}, buffers=[memoryview(obj)])

    codec = Codec([Wordy()])
    with pytest.raises(FrameError, match=r"id='big' chunk=0: its frame header would be \d+ bytes, over the 1048576"):
        codec.frames(b"abc", id="big", chunk_id=0, num_chunks=1, src=0, max_part_bytes=None)
    with pytest.raises(FrameError, match="metadata of serializer 'wordy'"):
        codec.frames(b"abcdef", id="big", chunk_id=0, num_chunks=1, src=0, max_part_bytes=2)
    assert len(frames(b"x" * (1 << 10), part=None)[0].header.meta) == 1  # an ordinary header passes


def test_a_frame_must_come_from_the_rank_its_connection_proved() -> None:
    header = frames(b"abc", src=3)[0].header
    check_sender(header, 3)
    with pytest.raises(FrameError, match="says it comes from rank 3, but it came over the connection from rank 4"):
        check_sender(header, 4)


def test_parts_lost_drops_only_those_messages_and_fails_no_receive() -> None:
    # A connection from rank 1 broke while rank 1 is connected over a newer one: the message whose
    # parts came over the broken connection is dropped (with the memory set aside for its part still
    # landing), the one coming over the new connection goes on, and receives keep waiting.
    async def main() -> None:
        store = make_store()
        old = frames(b"a" * 8, id="old", part=4)
        new = frames(b"b" * 8, id="new", part=4)
        waiting = asyncio.create_task(store.get("new", 0, 5.0))
        store.deliver(old[0])
        landing = store.part_landing(old[1].header)
        assert landing is not None
        store.deliver(new[0])
        assert store.buffered_bytes == 16
        store.parts_lost(1, {old[0].header.message})
        assert store.buffered_bytes == 8, "the old message and its landing memory are let go"
        store.parts_lost(2, {new[0].header.message})  # another sender's message: nothing of rank 1 goes
        assert store.buffered_bytes == 8
        store.deliver(new[1])
        assert await waiting == b"b" * 8

    run(main())


def test_a_message_in_parts_that_no_part_reached_for_long_is_dropped_and_its_late_parts_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A send that timed out or was cancelled mid-message, its connection up, refuses nothing and
    # breaks nothing: its parts stayed counted until their key was sent again or marked done.
    clock = [100.0]
    monkeypatch.setattr(store_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    store = ReceiveStore(CODEC, rank=5, transport="memory", max_bytes=31, device="cpu", abandon_after=10.0)
    stale, landing = frames(b"f" * 12, id="stale", part=4), frames(b"h" * 12, id="landing", part=4)
    store.deliver(stale[0])
    assert store.part_landing(landing[0].header) is not None  # its bytes are still on their way
    clock[0] += 9.0
    store.deliver(frames(b"g" * 4, id="young")[0])  # fits: nothing is looked at
    assert store.buffered_bytes == 28
    clock[0] += 2.0
    store.deliver(frames(b"g" * 3, id="roomy")[0])  # fits too: the stale message stays until room is short
    assert store.buffered_bytes == 31
    store.mark_done("roomy", 0)
    store.deliver(frames(b"g" * 8, id="fresh")[0])  # short of room: the stale message goes
    assert store.buffered_bytes == 24, "the stale message went; the one with a part landing stays"
    late = r"part 1 from rank 1 came after its message was given up on rank 5, which no part had reached for 10s"
    with pytest.raises(FrameError, match=late):
        store.deliver(stale[1])
    assert store.buffered_bytes == 24
    for key in ("young", "fresh"):
        store.mark_done(key, 0)
    for frame in frames(b"f" * 12, id="stale", part=4):  # sent again: a new message of the same key
        store.deliver(frame)
    assert store.peek("stale", 0) == (True, b"f" * 12)


def test_part_routes_keep_a_message_on_the_connection_of_its_first_part() -> None:
    routes = PartRoutes()
    first, second = object(), object()

    async def on(connection: object) -> object:
        return connection

    async def unreachable() -> object:
        raise PeerUnreachableError("rank 1 does not answer")

    async def main() -> None:
        parts = [frame.header for frame in frames(b"c" * 12, id="routed", part=4)]
        async with routes.route(1, parts[0], lambda: on(first)) as got:
            assert got is first
        broke = r"connection to rank 1 broke between the parts of id='routed' chunk=0 "
        with pytest.raises(PeerLostError, match=broke):
            async with routes.route(1, parts[1], lambda: on(second)):
                raise AssertionError("not sent over a new connection")
        with pytest.raises(PeerLostError):  # the message is given up
            async with routes.route(1, parts[2], lambda: on(first)):
                pass
        # Sent again in full (a new message), over the new connection.
        again = [frame.header for frame in frames(b"c" * 12, id="routed", part=4)]
        for header in again:
            async with routes.route(1, header, lambda: on(second)):
                pass
        assert not routes._first, "a message is forgotten once its last part went"
        # A part that fails, or whose connection cannot be made, forgets its message.
        async with routes.route(2, again[0], lambda: on(first)):
            pass
        with pytest.raises(PeerUnreachableError):
            async with routes.route(2, again[1], unreachable):
                pass
        with pytest.raises(RuntimeError):
            async with routes.route(3, again[0], lambda: on(first)):
                raise RuntimeError("the first part failed")
        async with routes.route(4, frames(b"single")[0].header, lambda: on(first)):  # one frame: nothing kept
            pass
        assert not routes._first

    run(main())


def test_a_refused_part_drops_its_message_at_once() -> None:
    # Its send fails, so nothing more of the message comes: what came before stays counted no longer.
    store = make_store()
    parts = ArrivingParts()
    message = frames(b"d" * 12, id="refused-part", part=4)
    for frame in (message[0], message[1], message[1]):  # the second copy of part 1 is refused
        parts.arrived(frame.header)
        try:
            store.deliver(frame)
        except FrameError:
            parts.taken(frame.header, store, refused=True)
        else:
            parts.taken(frame.header, store, refused=False)
    assert store.buffered_bytes == 0
    assert not parts.messages
    whole = frames(b"e" * 12, id="whole", part=4)
    for frame in whole:
        parts.arrived(frame.header)
        store.deliver(frame)
        parts.taken(frame.header, store, refused=False)
    assert not parts.messages, "forgotten after its last part"
    assert store.buffered_bytes == 12


def test_releases_of_frames_delivered_off_the_loop_run_on_the_loop() -> None:
    # A transport may deliver from a thread inside poll_while_waiting; the Inbox promises that
    # release runs on the loop thread, also for a frame refused, or joined into its message, there.
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="store-loop")
    runner.start()
    try:
        store = ReceiveStore(CODEC, rank=5, transport="memory", max_bytes=1 << 20, device="cpu", loop=loop)
        ran_on: dict[str, str] = {}
        done = threading.Event()

        def release(label: str) -> Callable[[], None]:
            def run() -> None:
                ran_on[label] = threading.current_thread().name
                if len(ran_on) == 3:
                    done.set()

            return run

        store.deliver(frames(b"held", id="twice")[0])
        with pytest.raises(DuplicateChunkError):
            store.deliver(frames(b"held", id="twice")[0], release("refused"))
        store.deliver(frames(b"i" * 8, id="parts", part=4)[0], release("part"))
        store.deliver(close_frame("closed", 1), release("close"))
        assert done.wait(5), f"released: {ran_on}"
        assert ran_on == {"refused": "store-loop", "part": "store-loop", "close": "store-loop"}
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()


def test_a_receive_that_starts_after_close_fails_at_once() -> None:
    store = make_store()
    store.close()
    waiter: concurrent.futures.Future[object] = concurrent.futures.Future()
    store.add_waiter("late", 0, waiter)
    with pytest.raises(SidecarClosedError, match="recv id='late' chunk=0: sidecar rank 5 was shut down"):
        waiter.result(0)


def test_mark_done_releases_and_later_recv_raises() -> None:
    async def main() -> None:
        releases = Releases()
        store = make_store()
        store.deliver(frames(b"abc", id="done")[0], releases("done"))
        assert store.buffered_bytes == 3
        assert await store.get("done", 0, 1.0) == b"abc"
        store.mark_done("done", 0)
        assert releases.calls == {"done": 1}
        assert store.buffered_bytes == 0
        with pytest.raises(AlreadyDoneError, match="id='done' chunk=0 was marked done on rank 5"):
            await store.get("done", 0, 1.0)
        store.mark_done("done", 0)  # a second mark_done, and one of an unknown chunk, do nothing
        store.mark_done("never-seen", 3)
        assert releases.calls == {"done": 1}

    run(main())


def test_close_before_data() -> None:
    async def main() -> None:
        store = make_store()
        store.deliver(close_frame("s", 2))
        assert await store.get("s", 2, 1.0) is None
        assert await store.get("s", 9, 1.0) is None
        waiting = asyncio.create_task(store.get("s", 1, 5.0))
        store.deliver(frames(b"zero", id="s", num_chunks=None)[0])
        store.deliver(frames(b"one", id="s", chunk_id=1, num_chunks=None)[0])
        assert await waiting == b"one"
        assert await store.get("s", 0, 1.0) == b"zero"

    run(main())


def test_close_wakes_receivers_past_the_end() -> None:
    async def main() -> None:
        store = make_store()
        past = asyncio.create_task(store.get("s", 3, 5.0))
        inside = asyncio.create_task(store.get("s", 0, 0.3))
        await settle()
        store.deliver(close_frame("s", 1))
        assert await past is None
        with pytest.raises(RecvTimeoutError):
            await inside

    run(main())


def test_end_from_num_chunks() -> None:
    async def main() -> None:
        store = make_store()
        store.deliver(frames(b"a", id="n", chunk_id=0, num_chunks=2)[0])
        assert await store.get("n", 2, 1.0) is None
        assert await store.get("n", 5, 1.0) is None
        with pytest.raises(RecvTimeoutError):
            await store.get("n", 1, 0.05)

    run(main())


def test_chunks_past_a_known_end_are_refused_or_let_go() -> None:
    async def main() -> None:
        releases = Releases()
        store = make_store()
        store.deliver(close_frame("s", 2))
        with pytest.raises(FrameError, match="chunk=3 is past the end of id 's', which has 2 chunks"):
            store.deliver(frames(b"late", id="s", chunk_id=3, num_chunks=None)[0], releases("late"))
        assert (store.buffered_bytes, releases.calls) == (0, {"late": 1})
        assert await store.get("s", 3, 1.0) is None
        # Chunks that came before a smaller end are past it: a recv returns None for them. One that
        # no receive got is let go; one a receive got stays until mark_done (its views may be in
        # use); a message past the end still in parts is let go, as its later parts are refused.
        store.deliver(frames(b"early", id="t", chunk_id=4, num_chunks=None)[0], releases("early"))
        store.deliver(frames(b"seen", id="t", chunk_id=5, num_chunks=None)[0], releases("seen"))
        store.deliver(frames(b"part", id="t", chunk_id=6, num_chunks=None, part=2)[0])
        assert await store.get("t", 5, 1.0) == b"seen"
        assert store.buffered_bytes == 13
        store.deliver(close_frame("t", 2))
        assert (store.buffered_bytes, releases.calls) == (4, {"late": 1, "early": 1})
        assert await store.get("t", 4, 1.0) is None
        assert await store.get("t", 5, 1.0) is None
        assert store.peek("t", 5) == (False, None)
        store.mark_done("t", 5)
        assert (store.buffered_bytes, releases.calls["seen"]) == (0, 1)

    run(main())


def test_a_conflicting_end_is_refused_and_nothing_is_dropped() -> None:
    # Taking a smaller end from a sender would drop chunks already acknowledged past it.
    async def main() -> None:
        store = make_store()
        store.deliver(close_frame("s", 5))
        for chunk_id in (3, 4):
            store.deliver(frames(f"c{chunk_id}".encode(), id="s", chunk_id=chunk_id, num_chunks=None)[0])
        with pytest.raises(FrameError, match="close_stream gives id 's' 3 chunks, but it has 5 on rank 5"):
            store.deliver(close_frame("s", 3))
        with pytest.raises(FrameError, match="gives id 's' 6 chunks, but it has 5"):
            store.deliver(close_frame("s", 6))
        assert [await store.get("s", c, 1.0) for c in (3, 4, 5)] == [b"c3", b"c4", None]
        store.deliver(close_frame("s", 5))  # the same end again is fine
        # Chunks of one message must agree on num_chunks.
        store.deliver(frames(b"n0", id="n", chunk_id=0, num_chunks=2)[0])
        with pytest.raises(FrameError, match="id='n' chunk=1 gives id 'n' 3 chunks, but it has 2"):
            store.deliver(frames(b"n1", id="n", chunk_id=1, num_chunks=3)[0])
        assert store.peek("n", 1) == (False, None)
        assert await store.get("n", 0, 1.0) == b"n0"

    run(main())


def test_a_pull_based_transports_smaller_end_found_later_wins() -> None:
    # mock-file learns an id's end one missing chunk at a time: chunk 5 missing, then chunk 2.
    async def main() -> None:
        store = ReceiveStore(CODEC, rank=5, transport="mock-file", max_bytes=1 << 20, device="cpu", ends_learned=True)
        store.deliver(close_frame("r", 5))
        store.deliver(close_frame("r", 2))
        assert store.past_end("r", 2)
        assert await store.get("r", 3, 1.0) is None

    run(main())


def test_an_ids_end_and_sender_are_kept_while_its_chunks_are_held(monkeypatch: pytest.MonkeyPatch) -> None:
    # The store remembers ends and senders of the last DONE_MEMORY ids; a stream whose chunks wait
    # for a slow reader must not lose its end (the reader would then wait for the timeout at the
    # end, and a chunk past it would be taken) or its sender (a lost peer would not fail receives).
    monkeypatch.setattr(store_module, "DONE_MEMORY", 8)

    async def main() -> None:
        store = make_store()
        store.deliver(close_frame("audio", 3))
        store.deliver(frames(b"a0", id="audio", chunk_id=0, num_chunks=None)[0])
        for i in range(40):  # many messages after it, each with an end of its own
            store.deliver(frames(b"x", id=f"other-{i}")[0])
            store.mark_done(f"other-{i}", 0)
        assert len(store._ends) <= 9
        assert store.past_end("audio", 3)
        with pytest.raises(FrameError, match="past the end of id 'audio'"):
            store.deliver(frames(b"a7", id="audio", chunk_id=7, num_chunks=None)[0])
        waiting = asyncio.create_task(store.get("audio", 1, 5.0))
        await settle()
        store.peer_lost(1, "it exited")
        with pytest.raises(PeerLostError, match="rank 1 was lost: it exited"):
            await waiting
        assert await store.get("audio", 0, 1.0) == b"a0"

    run(main())


def test_a_header_string_that_is_not_utf8_is_a_frame_error() -> None:
    text = msgspec.json.encode(frames(b"x", id="abc")[0].header).replace(b'"abc"', b'"\xff"')
    with pytest.raises(FrameError, match="malformed frame header: a string in it is not UTF-8 text"):
        decode_header(text)


def test_a_refused_frame_does_not_make_its_sender_the_ids_sender() -> None:
    # Else a stray frame from rank 2 would tie the id's receives to rank 2's connection.
    async def main() -> None:
        store = make_store()
        store.deliver(frames(b"zero", id="x", num_chunks=None, src=1)[0])
        with pytest.raises(DuplicateChunkError):
            store.deliver(frames(b"stray", id="x", num_chunks=None, src=2)[0])
        waiting = asyncio.create_task(store.get("x", 1, 5.0))
        await settle()
        store.peer_lost(2, "it exited")
        await settle()
        assert not waiting.done()
        store.peer_lost(1, "its connection broke")
        with pytest.raises(PeerLostError, match="rank 1 was lost"):
            await waiting

    run(main())


def test_timeout_message_names_id_chunk_transport_and_rank() -> None:
    async def main() -> None:
        store = make_store()
        with pytest.raises(RecvTimeoutError) as info:
            await store.get("nobody-sent-this", 3, 0.05)
        message = str(info.value)
        for part in ("'nobody-sent-this'", "chunk=3", "transport memory", "rank 5", "SIDECAR_RECV_TIMEOUT"):
            assert part in message
        assert isinstance(info.value, TimeoutError)
        store.deliver(frames(b"x", id="known", num_chunks=3)[0])
        with pytest.raises(RecvTimeoutError, match="last data for this id came from rank 1"):
            await store.get("known", 1, 0.05)

    run(main())


def test_capacity_bound() -> None:
    async def main() -> None:
        releases = Releases()
        store = make_store(max_bytes=100)
        store.deliver(frames(b"x" * 60, id="a")[0], releases("a"))
        with pytest.raises(CapacityError, match="SIDECAR_MAX_BUFFERED_BYTES=100 on rank 5") as info:
            store.deliver(frames(b"y" * 60, id="b")[0], releases("b"))
        assert isinstance(info.value, MemoryError)
        assert releases.calls == {"b": 1}  # the rejected frame's buffers go back at once
        assert store.buffered_bytes == 60
        with pytest.raises(CapacityError):  # a message in parts is bounded as a whole
            store.deliver(frames(b"z" * 60, id="c", part=16)[0])
        store.mark_done("a", 0)
        store.deliver(frames(b"y" * 60, id="b")[0])
        assert await store.get("b", 0, 1.0) == b"y" * 60
        assert store.buffered_bytes == 60

    run(main())


def test_peer_lost_fails_waiters_of_that_peer_only() -> None:
    async def main() -> None:
        store = make_store()
        store.deliver(frames(b"first", id="from-1", num_chunks=None, src=1)[0])
        store.deliver(frames(b"first", id="from-2", num_chunks=None, src=2)[0])
        lost = asyncio.create_task(store.get("from-1", 1, 5.0))
        other = asyncio.create_task(store.get("from-2", 1, 5.0))
        await settle()
        store.peer_lost(1, "its connection broke")
        with pytest.raises(PeerLostError) as info:
            await lost
        assert "rank 1 was lost: its connection broke" in str(info.value)
        assert "id='from-1' chunk=1 on rank 5" in str(info.value)
        assert isinstance(info.value, ConnectionError)
        with pytest.raises(PeerLostError):  # later receives of the id fail at once
            await store.get("from-1", 2, 5.0)
        assert await store.get("from-1", 0, 1.0) == b"first"  # what already arrived is kept
        assert not other.done()
        store.deliver(frames(b"second", id="from-2", chunk_id=1, num_chunks=None, src=2)[0])
        assert await other == b"second"
        # The peer came back and sends the id again: receiving works again.
        store.deliver(frames(b"again", id="from-1", chunk_id=2, num_chunks=None, src=1)[0])
        assert await store.get("from-1", 2, 1.0) == b"again"

    run(main())


def test_peer_lost_drops_its_unfinished_parts() -> None:
    store = make_store()
    store.deliver(frames(b"p" * 40, id="parts", part=16)[0])
    assert store.buffered_bytes == 40
    store.peer_lost(1, "gone")
    assert store.buffered_bytes == 0


def test_duplicate_chunk() -> None:
    async def main() -> None:
        releases = Releases()
        store = make_store()
        store.deliver(frames(b"one")[0])
        with pytest.raises(DuplicateChunkError, match="id='m' chunk=0 is already held on rank 5") as info:
            store.deliver(frames(b"two")[0], releases("dup"))
        assert isinstance(info.value, ValueError)
        assert releases.calls == {"dup": 1}
        assert await store.get("m", 0, 1.0) == b"one"  # the first copy is kept
        store.mark_done("m", 0)
        with pytest.raises(DuplicateChunkError, match="was already marked done"):
            store.deliver(frames(b"three")[0])

    run(main())


@pytest.mark.parametrize("part", [1, 3, 7, 16])
@pytest.mark.parametrize("value", [(bytes(range(37)), b"tail-bytes"), (b"", bytes(range(30)))], ids=["full", "empty"])
def test_parts_join_in_any_order(part: int, value: tuple[bytes, bytes]) -> None:
    async def main() -> None:
        releases = Releases()
        store = make_store()
        pieces = frames(value, part=part)
        assert len(pieces) > 1
        random.Random(part).shuffle(pieces)
        waiting = asyncio.create_task(store.get("m", 0, 5.0))
        for i, piece in enumerate(pieces):
            store.deliver(piece, releases(f"part-{i}"))
        assert await waiting == value
        # Each part's buffers are released once they are copied, not at mark_done.
        assert releases.calls == {f"part-{i}": 1 for i in range(len(pieces))}
        assert store.buffered_bytes == len(value[0]) + len(value[1])

    run(main())


def test_part_errors() -> None:
    store = make_store()
    pieces = frames(b"0123456789", part=4)
    store.deliver(pieces[0])
    with pytest.raises(FrameError, match="part 0 arrived twice"):
        store.deliver(pieces[0])
    other = frames(b"abcdefghijkl", part=4)[1]  # a part of another send under the same key
    with pytest.raises(FrameError, match="part 1 from rank 1 belongs to another send of this id and chunk"):
        store.deliver(other)
    same_send = msgspec.structs.replace(pieces[1].header, layout=[12], sizes=[4])
    with pytest.raises(FrameError, match="disagrees with part 0"):
        store.deliver(Frame(same_send, pieces[1].buffers))


def test_a_send_again_replaces_the_parts_of_one_given_up() -> None:
    # A sender whose send of a message in parts timed out or was cancelled may send it again; the
    # first send's parts are dropped (their bytes too), and a late part of it is refused.
    store = make_store()
    first, second = frames(b"0123456789", part=4), frames(b"abcdefghij", part=4)
    store.deliver(first[0])
    store.deliver(first[1])
    assert store.buffered_bytes == 10
    store.deliver(second[0])
    assert store.buffered_bytes == 10
    with pytest.raises(FrameError, match="part 2 from rank 1 belongs to another send"):
        store.deliver(first[2])
    for piece in second[1:]:
        store.deliver(piece)
    assert store.peek("m", 0) == (True, b"abcdefghij")
    assert store.buffered_bytes == 10


def test_parts_must_come_from_one_sender_and_fill_the_message_without_overlap() -> None:
    store = make_store()
    mine = frames(b"0123456789", id="joined", src=1, part=4)
    theirs = frames(b"abcdefghij", id="joined", src=2, part=4)
    store.deliver(mine[0])
    with pytest.raises(FrameError, match="part 1 from rank 2 disagrees with part 0 from rank 1"):
        store.deliver(theirs[1])
    # A part claiming the bytes of another would leave some of the message unwritten.
    forged = Frame(msgspec.structs.replace(mine[1].header, offset=0), mine[1].buffers)
    with pytest.raises(FrameError, match=r"part 1 \(bytes 0 to 4\) overlaps another part"):
        store.deliver(forged)
    store.deliver(mine[1])
    store.deliver(mine[2])
    assert bytes(run(store.get("joined", 0, 1.0))) == b"0123456789"


def test_an_empty_part_does_not_hide_an_overlap() -> None:
    # Parts (0 to 5), (3 to 3) and (3 to 8) of a 10-byte message: the last overlaps the first.
    store = make_store()
    header = frames(b"0123456789", id="gap", part=5)[0].header

    def part(index: int, offset: int, data: bytes) -> Frame:
        forged = msgspec.structs.replace(header, part=index, num_parts=3, offset=offset, sizes=[len(data)])
        return Frame(forged, [memoryview(data)])

    store.deliver(part(0, 0, b"AAAAA"))
    store.deliver(part(1, 3, b""))
    with pytest.raises(FrameError, match=r"part 2 \(bytes 3 to 8\) overlaps another part"):
        store.deliver(part(2, 3, b"BBBBB"))


def test_mark_done_of_a_message_still_in_parts_frees_it_and_refuses_the_rest() -> None:
    store = make_store()
    pieces = frames(b"0123456789", id="abandoned", part=4)
    store.deliver(pieces[0])
    assert store.buffered_bytes == 10
    store.mark_done("abandoned", 0)
    assert store.buffered_bytes == 0
    with pytest.raises(DuplicateChunkError, match="id='abandoned' chunk=0 was already marked done"):
        store.deliver(pieces[1])
    assert store.buffered_bytes == 0


def land(store: ReceiveStore, piece: Frame) -> Frame:
    """Receive ``piece`` the way a transport using ``part_landing`` does: into its place, then deliver that."""
    place = store.part_landing(piece.header)
    assert place is not None
    views, pos = [], 0
    for buf, size in zip(piece.buffers, piece.header.sizes, strict=True):
        view = place[pos : pos + size]
        view.copy_(torch.frombuffer(bytearray(buf), dtype=torch.uint8) if size else view)  # "the payload arrives"
        views.append(view)
        pos += size
    return Frame(piece.header, views)


def test_parts_received_in_place_are_joined_without_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    store, captured = capturing_store(max_bytes=10)
    pieces = frames(b"0123456789", id="placed", part=4)
    assert store.part_landing(frames(b"whole", id="single")[0].header) is None, "only parts get a place"
    landed = [land(store, piece) for piece in pieces]
    assert store.buffered_bytes == 10, "the whole message was set aside at its first part"
    with pytest.raises(CapacityError, match=r"id='other' chunk=0: 4 bytes would exceed .* \(10 held\)"):
        store.part_landing(frames(b"abcd", id="other", part=2)[0].header)
    with pytest.raises(CapacityError, match=r"\(7 held or arriving\)"):  # what the transport holds counts too
        make_store(max_bytes=10).part_landing(pieces[0].header, arriving=7)
    copies: list[int] = []
    real_copy = torch.Tensor.copy_

    def counting_copy(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        copies.append(src.numel())
        return real_copy(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    for piece in reversed(landed):
        store.deliver(piece)
    assert copies == [], "no part was copied"
    assert run(store.get("placed", 0, 1.0)) == b"0123456789"
    ((joined,),) = captured
    first = landed[0].buffers[0]
    assert isinstance(joined, torch.Tensor)
    assert isinstance(first, torch.Tensor)
    assert joined.data_ptr() == first.data_ptr(), "the message is the memory its parts were received into"
    assert store.buffered_bytes == 10
    store.mark_done("placed", 0)
    for piece in frames(b"abcdefghij", id="copied", part=4):  # parts delivered from memory of their own
        store.deliver(piece)
    assert copies == [4, 4, 2]


def test_a_part_given_its_place_is_checked_then_and_refused_if_it_comes_twice() -> None:
    store = make_store()
    pieces = frames(b"0123456789", id="checked", part=4)
    arriving = land(store, pieces[0])
    with pytest.raises(FrameError, match="part 0 arrived twice"):
        store.part_landing(pieces[0].header)
    forged = msgspec.structs.replace(pieces[1].header, offset=2)
    with pytest.raises(FrameError, match=r"part 1 \(bytes 2 to 6\) overlaps another part"):
        store.part_landing(forged)
    other = frames(b"abcdefghijkl", id="checked", part=4)[1]
    with pytest.raises(FrameError, match="part 1 from rank 1 belongs to another send"):
        store.part_landing(other.header)
    store.mark_done("checked", 0)
    with pytest.raises(DuplicateChunkError, match="was already marked done"):
        store.part_landing(pieces[1].header)
    with pytest.raises(DuplicateChunkError, match="was already marked done"):  # when its bytes come
        store.deliver(arriving)
    assert store._landing == {}
    assert store.buffered_bytes == 0


def test_a_second_copy_of_a_part_given_its_place_is_refused() -> None:
    # Only the frame received into the memory handed out is that part: another copy of it (a peer
    # sending the part twice) must not complete the message while the real bytes are still landing
    # in it, or they would land in a value a receiver already holds.
    store = make_store()
    pieces = frames(b"0123456789", id="twice", part=4)
    arriving = land(store, pieces[0])
    with pytest.raises(FrameError, match="part 0 arrived twice"):
        store.deliver(pieces[0])
    with pytest.raises(FrameError, match="header lists 1 buffers, 0 arrived"):
        store.deliver(Frame(pieces[0].header, []))
    store.deliver(arriving)
    for piece in pieces[1:]:
        store.deliver(piece)
    assert store.peek("twice", 0) == (True, b"0123456789")
    assert store._landing == {}


def test_a_message_given_up_stays_counted_while_its_parts_still_land() -> None:
    store = make_store()
    pieces = frames(b"0123456789", id="dropped", part=4)
    store.deliver(land(store, pieces[0]))
    arriving = land(store, pieces[1])
    store.mark_done("dropped", 0)
    assert store.buffered_bytes == 10, "part 1 is still being received into its memory"
    with pytest.raises(DuplicateChunkError, match="was already marked done"):
        store.deliver(arriving)
    assert store.buffered_bytes == 0
    assert store._landing == {}
    # A stream's end before the chunk drops it the same way; so does losing its sender.
    land(store, frames(b"abcdefghij", id="cut", chunk_id=1, num_chunks=None, part=4)[0])
    store.deliver(close_frame("cut", 1))
    assert store._assembling == {}
    assert store.buffered_bytes == 10
    store.peer_lost(1, "gone")
    assert store.buffered_bytes == 0
    assert store._landing == {}


def test_a_part_landing_in_a_send_given_up_is_refused_and_the_new_send_goes_on() -> None:
    # Headers come before payloads: a sender's new send of the key may start (dropping the old one's
    # parts) while a part of the old send is still arriving into the old memory.
    store = make_store()
    old, new = frames(b"0123456789", part=4), frames(b"abcdefghij", part=4)
    late = land(store, old[0])
    fresh = land(store, new[0])
    assert store.buffered_bytes == 20, "the first send's memory is counted until its part has landed"
    with pytest.raises(FrameError, match="part 0 arrived twice"):  # another copy of it: the new send stays
        store.deliver(old[0])
    with pytest.raises(FrameError, match="part 0 from rank 1 arrived after its send was given up"):
        store.deliver(late)
    assert store.buffered_bytes == 10
    store.deliver(fresh)
    for piece in new[1:]:
        store.deliver(land(store, piece))
    assert store.peek("m", 0) == (True, b"abcdefghij")
    assert store.buffered_bytes == 10
    assert store._landing == {}


def test_peer_lost_forgets_the_parts_still_arriving_from_it() -> None:
    store = make_store()
    land(store, frames(b"0123456789", id="cut", part=4)[0])
    assert store.buffered_bytes == 10
    store.peer_lost(1, "gone")
    assert store.buffered_bytes == 0
    assert store._landing == {}


def test_a_header_nested_thousands_deep_is_a_frame_error() -> None:
    header = frames(b"x")[0].header
    deep = b"[" * 100_000 + b"]" * 100_000  # past any interpreter's recursion limit
    text = msgspec.json.encode(header).replace(b'"meta":{', b'"meta":{"deep":' + deep + b",", 1)
    with pytest.raises(FrameError, match="malformed frame header"):  # RecursionError or DecodeError inside
        decode_header(text)


def test_bad_frames_are_rejected_and_the_store_goes_on() -> None:
    async def main() -> None:
        releases = Releases()
        store = make_store()
        good = frames(b"kept", id="good")[0]
        store.deliver(good)
        unknown = Frame(
            Header(kind="data", id="u", src=1, serializer="nope", layout=[1], sizes=[1]), [memoryview(b"x")]
        )
        with pytest.raises(FrameError, match="unknown serializer 'nope'"):
            store.deliver(unknown, releases("unknown"))
        short = Frame(Header(kind="data", id="s", src=1, serializer="raw", layout=[1], sizes=[1]), [])
        with pytest.raises(FrameError, match="header lists 1 buffers, 0 arrived"):
            store.deliver(short, releases("short"))
        lying = Frame(
            Header(kind="data", id="l", src=1, serializer="raw", meta={"n": 9}, layout=[2], sizes=[2]),
            [memoryview(b"ab")],
        )
        with pytest.raises(FrameError, match="meta says 9 bytes"):
            store.deliver(lying, releases("lying"))
        assert releases.calls == {"unknown": 1, "short": 1, "lying": 1}
        assert store.buffered_bytes == 4
        assert await store.get("good", 0, 1.0) == b"kept"

    run(main())


def test_on_recv_reports_whole_messages() -> None:
    seen: list[tuple[str, int, int, int]] = []
    store = make_store(on_recv=lambda h, n: seen.append((h.id, h.chunk_id, h.src, n)))
    store.deliver(frames(b"abc", id="x", chunk_id=1, num_chunks=2, src=3)[0])
    for piece in frames(b"0123456789", id="y", src=4, part=4):
        store.deliver(piece)
    store.deliver(close_frame("x", 2))
    assert seen == [("x", 1, 3, 3), ("y", 0, 4, 10)]


def test_parts_land_as_uint8_tensors() -> None:
    store, captured = capturing_store()
    for piece in frames(b"0123456789", part=3):
        store.deliver(piece)
    (buffers,) = captured
    assert [(b.dtype, b.device.type, b.numel()) for b in buffers if isinstance(b, torch.Tensor)] == [
        (torch.uint8, "cpu", 10)
    ]


def test_close_releases_everything_and_ends_waiters() -> None:
    async def main() -> None:
        releases = Releases()
        store = make_store()
        store.deliver(frames(b"held")[0], releases("held"))
        waiting = asyncio.create_task(store.get("other", 0, 5.0))
        await settle()
        store.close()
        assert releases.calls == {"held": 1}
        assert store.buffered_bytes == 0
        with pytest.raises(SidecarClosedError, match="recv id='other' chunk=0: sidecar rank 5 was shut down"):
            await waiting
        # A transport still reading while the sidecar shuts down: refused, its buffers given back.
        with pytest.raises(SidecarClosedError, match="id='late' chunk=0: sidecar rank 5 is shutting down"):
            store.deliver(frames(b"late", id="late")[0], releases("late"))
        assert (store.buffered_bytes, releases.calls["late"]) == (0, 1)

    run(main())


def test_mark_done_of_a_message_in_parts_fails_its_waiting_receives() -> None:
    async def main() -> None:
        store = make_store()
        store.deliver(frames(b"0123456789", id="given-up", part=4)[0])
        waiting = asyncio.create_task(store.get("given-up", 0, 5.0))
        await settle()
        store.mark_done("given-up", 0)
        with pytest.raises(AlreadyDoneError, match="id='given-up' chunk=0 was marked done on rank 5"):
            await asyncio.wait_for(waiting, 1.0)

    run(main())


def test_receivers_use_the_store_from_their_own_threads_and_releases_run_on_the_loop() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        store = ReceiveStore(CODEC, rank=5, transport="memory", max_bytes=1 << 20, device="cpu", loop=loop)
        released_on: list[threading.Thread] = []
        waiter: concurrent.futures.Future[object] = concurrent.futures.Future()
        # A receiver thread registers before the chunk arrives and is woken by the delivery.
        await asyncio.to_thread(store.add_waiter, "t", 0, waiter)
        store.deliver(frames(b"abc", id="t")[0], lambda: released_on.append(threading.current_thread()))
        assert waiter.result(0) == b"abc"
        # mark_done on another thread takes effect at once; the frame's release runs on the loop thread.
        await asyncio.to_thread(store.mark_done, "t", 0)
        assert store.buffered_bytes == 0
        late: concurrent.futures.Future[object] = concurrent.futures.Future()
        store.add_waiter("t", 0, late)
        with pytest.raises(AlreadyDoneError):
            late.result(0)
        await settle()
        assert released_on == [threading.current_thread()]

    run(main())
