"""The transport conformance suite.

Subclass :class:`TransportConformance` in a test module and enable the plugin::

    # tests/test_my_transport.py  (run with: pytest -p sidecar_core.testing)
    from sidecar_core.testing import TransportConformance

    class TestMyTransport(TransportConformance):
        sidecar_transports = ("my-transport",)  # omit to run every installed transport

Every test runs real processes: rank 0 is a ``Sidecar`` in the test process, ranks 1 and 2 are
peer processes shared by the tests of one module, and a few tests start (and kill) a rank of their
own. Tests marked ``sidecar_needs_peer`` are not generated for peerless transports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn

import pytest

from sidecar_core._errors import (
    AlreadyDoneError,
    AuthenticationError,
    PeerLostError,
    PeerUnreachableError,
    RecvTimeoutError,
    RemoteError,
    SendTimeoutError,
)
from sidecar_core.testing import _peer_ops as ops
from sidecar_core.testing._deployment import (
    LATE_RANK,
    PART_SENDER_RANK,
    PART_SIZE,
    REUSED_RANK,
    TOKEN_RANK,
    TOKEN_SENDER_RANK,
    UNSERVED_RANK,
    Deployment,
)
from sidecar_core.testing._payloads import PAYLOADS, fingerprint, payload
from sidecar_core.testing._plugin import NEEDS_PEER, plugin_active
from sidecar_core.testing._probe import NAME as PROBE_SERIALIZER
from sidecar_core.testing._probe import HookEvent

#: How long the test process waits for its own sends and receives.
WAIT = 60.0
#: How long a receive waits for a killed peer to be reported lost.
LOST_WAIT = 30.0
#: Time given to a receive to start waiting before the matching send (the test stays valid without).
SETTLE = 0.3
#: How long a receive may wait for what a completed send delivered (it should be there already).
DELIVERED_WAIT = 5.0

needs_peer: pytest.MarkDecorator = getattr(pytest.mark, NEEDS_PEER)


#: What ``ops.recv`` reports for a recv at or past the end of an id.
END = fingerprint(None)


def new_id(label: str) -> str:
    """A fresh message id: tests of one deployment never share one."""
    return f"{label}-{uuid.uuid4().hex[:12]}"


def raised(call: Callable[[], object]) -> Exception | None:
    """The exception ``call()`` raised, or ``None``."""
    try:
        call()
    except Exception as exc:
        return exc
    return None


def _not_delivered(dep: Deployment, id: str, src: int, dst: int, why: str) -> NoReturn:
    """Fail a test whose send completed although its receiver cannot receive what it sent."""
    pytest.fail(
        f"{dep.name}: rank {src}'s send of {id!r} to rank {dst} completed, but rank {dst} could not receive it within "
        f"{DELIVERED_WAIT:g}s ({why}). A send completes only once the receiver's inbox holds the frame: deliver it "
        "(ctx.inbox.deliver) before acknowledging it"
    )


def expected(name: str) -> Any:
    """The fingerprint of the payload called ``name``."""
    return fingerprint(payload(name))


class TransportConformance:
    """The conformance suite; subclass it in a ``test_*.py`` module (see the module docstring)."""

    #: Restrict the suite to these transports (``None``: every installed one).
    sidecar_transports: ClassVar[tuple[str, ...] | None] = None

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Fail collection with instructions when the plugin is not enabled."""
        if not plugin_active(metafunc.config):
            pytest.fail(
                "TransportConformance needs the sidecar_core.testing pytest plugin: run "
                "'pytest -p sidecar_core.testing' or add pytest_plugins = ['sidecar_core.testing'] "
                "to your top-level conftest.py",
                pytrace=False,
            )

    # -- round trips (every transport; through storage for peerless ones) ---------------------

    @pytest.mark.parametrize("name", PAYLOADS)
    def test_round_trip_to_peer(self, sidecar_deployment: Deployment, name: str) -> None:
        """Rank 0 sends, the send completes, then rank 1 receives the same object."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id(name)
        dep.sidecar.send(payload(name), id, [[1]]).result(WAIT)
        outcome = peer.call(ops.outcome, id, 0, DELIVERED_WAIT)
        if outcome[0] == "error":
            _not_delivered(dep, id, 0, 1, f"{outcome[1]}: {outcome[2]}")
        peer.call(ops.mark_done, id)
        assert outcome[1] == expected(name), f"{dep.name}: payload {name!r} changed on its way from rank 0 to rank 1"

    @pytest.mark.parametrize("name", PAYLOADS)
    def test_round_trip_from_peer(self, sidecar_deployment: Deployment, name: str) -> None:
        """Rank 1 sends, then rank 0 (this process) receives the same object."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id(name)
        peer.call(ops.send, name, id, 0)
        try:
            got = fingerprint(dep.sidecar.recv_sync(id, timeout=DELIVERED_WAIT))
        except RecvTimeoutError as exc:
            _not_delivered(dep, id, 1, 0, f"RecvTimeoutError: {exc}")
        dep.sidecar.mark_done_sync(id)
        assert got == expected(name), f"{dep.name}: payload {name!r} changed on its way from rank 1 to rank 0"

    def test_multi_chunk_message(self, sidecar_deployment: Deployment) -> None:
        """The chunks of one id, sent concurrently, each arrive under their own chunk id."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id("chunks")
        names = ["float32-matrix", "dict", "bytes"]
        futures = [dep.sidecar.send(payload(n), id, 1, chunk_id=i, num_chunks=len(names)) for i, n in enumerate(names)]
        for future in futures:
            future.result(WAIT)
        got = [peer.call(ops.recv, id, chunk_id) for chunk_id in range(len(names))]
        assert got == [expected(n) for n in names], f"{dep.name}: chunks of one id were mixed up or changed"

    def test_recv_is_idempotent_until_mark_done(self, sidecar_deployment: Deployment) -> None:
        """Recv twice gives the same object; after mark_done, recv raises AlreadyDoneError."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id("idempotent")
        dep.sidecar.send(payload("int64-arange"), id, 1).result(WAIT)
        got = peer.call(ops.recv_twice_then_done, id)
        assert got["first"] == expected("int64-arange")
        assert got["second"] == got["first"], f"{dep.name}: a second recv of the same chunk differs"
        status, kind, message = got["after_done"]
        assert (status, kind) == ("error", "AlreadyDoneError"), (
            f"{dep.name}: recv after mark_done must raise AlreadyDoneError, got {status} {kind} {message}"
        )
        assert id in message

    # -- streams and chunk ends -----------------------------------------------------------------

    def test_recv_past_end_returns_none(self, sidecar_deployment: Deployment) -> None:
        """Once num_chunks is known, a recv at or past the end returns None at once."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id("end")
        for chunk_id in range(2):
            dep.sidecar.send(payload("zero"), id, 1, chunk_id=chunk_id, num_chunks=2).result(WAIT)
        assert peer.call(ops.recv, id, 2, 5.0) == END
        assert peer.call(ops.recv, id, 7, 5.0) == END
        assert [peer.call(ops.recv, id, c) for c in range(2)] == [expected("zero")] * 2

    def test_stream_to_peer(self, sidecar_deployment: Deployment) -> None:
        """Stream chunks then close_stream; the peer's async iteration yields them in order."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id("stream")
        names = ["float32-matrix", "text", "tensor-list"]
        iterating = peer.submit(ops.collect_stream, id)
        for chunk_id, name in enumerate(names):
            dep.sidecar.send(payload(name), id, 1, chunk_id=chunk_id, stream=True).result(WAIT)
        dep.sidecar.close_stream(id, len(names), 1).result(WAIT)
        assert iterating.result(WAIT) == [expected(n) for n in names], f"{dep.name}: stream chunks differ"
        assert peer.call(ops.recv, id, len(names), 5.0) == END, "recv past the end must return None"

    def test_stream_from_peer_async_iteration(self, sidecar_deployment: Deployment) -> None:
        """Rank 0 iterates a stream with ``async for ... in iter_chunks(id, mark_done=True)``."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id("stream-in")
        names = ["bfloat16-matrix", "dict", "big-int"]
        sending = peer.submit(ops.send_stream, names, id, 0)

        async def consume() -> list[Any]:
            return [fingerprint(chunk) async for chunk in dep.sidecar.iter_chunks(id, mark_done=True)]

        got = asyncio.run(consume())
        sending.result(WAIT)
        assert got == [expected(n) for n in names], f"{dep.name}: streamed chunks differ"
        with pytest.raises(AlreadyDoneError):
            dep.sidecar.recv_sync(id, 0, timeout=5.0)

    def test_close_stream_before_data(self, sidecar_deployment: Deployment) -> None:
        """close_stream may arrive before any chunk; an empty stream ends at once."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id("closed-first")
        dep.sidecar.close_stream(id, 2, 1).result(WAIT)
        for chunk_id, name in enumerate(["uint8-bytes", "list"]):
            dep.sidecar.send(payload(name), id, 1, chunk_id=chunk_id, stream=True).result(WAIT)
        assert peer.call(ops.collect_stream, id) == [expected("uint8-bytes"), expected("list")]
        empty = new_id("empty-stream")
        dep.sidecar.close_stream(empty, 0, 1).result(WAIT)
        assert peer.call(ops.recv, empty, 0, 5.0) == END

    # -- destinations and ordering -----------------------------------------------------------

    @needs_peer
    def test_broadcast_to_two_groups(self, sidecar_deployment: Deployment) -> None:
        """dst_sidecar_ranks=[[1], [2]] and [[1, 2]]: every rank of every group receives."""
        dep = sidecar_deployment
        peers = {rank: dep.peer(rank) for rank in (1, 2)}  # started before anything is sent to them
        for dst in ([[1], [2]], [[1, 2]]):
            id = new_id("broadcast")
            dep.sidecar.send(payload("bfloat16-matrix"), id, dst).result(WAIT)
            for rank in (1, 2):
                got = peers[rank].call(ops.recv, id)
                assert got == expected("bfloat16-matrix"), f"{dep.name}: rank {rank} of {dst} got other data"

    def test_recv_before_send(self, sidecar_deployment: Deployment) -> None:
        """A recv that starts waiting before the data is sent gets it (both directions)."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id("early-recv")
        waiting = peer.submit(ops.recv, id)
        time.sleep(SETTLE)
        dep.sidecar.send(payload("float8-e4m3"), id, 1).result(WAIT)
        assert waiting.result(WAIT) == expected("float8-e4m3")

        id = new_id("early-recv-local")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            local = pool.submit(dep.sidecar.recv_sync, id, 0, WAIT)
            time.sleep(SETTLE)
            peer.call(ops.send, "non-contiguous", id, 0)
            assert fingerprint(local.result(WAIT)) == expected("non-contiguous")
        dep.sidecar.mark_done_sync(id)

    def test_concurrent_sends(self, sidecar_deployment: Deployment) -> None:
        """Many sends in flight at once to two ranks all complete with their own data."""
        dep = sidecar_deployment
        peers = {rank: dep.peer(rank) for rank in (1, 2)}  # started before anything is sent to them
        names = ["float32-matrix", "large-4mib", "dict", "bytes", "tensor-list", "big-int"] * 3
        ids = [new_id(f"concurrent-{i}") for i in range(len(names))]
        futures = [dep.sidecar.send(payload(n), id, [[1], [2]]) for n, id in zip(names, ids, strict=True)]
        for future in futures:
            future.result(WAIT)
        for rank in (1, 2):
            got = [peers[rank].call(ops.recv, id) for id in ids]
            assert got == [expected(n) for n in names], f"{dep.name}: concurrent sends to rank {rank} mixed up"

    def test_parts_from_chunk_size(self, sidecar_deployment: Deployment) -> None:
        """A sender with SIDECAR_CHUNK_SIZE splits messages into parts; the receiver joins them."""
        dep = sidecar_deployment
        sender = dep.peer(PART_SENDER_RANK)
        assert sender.call(ops.chunk_size) == PART_SIZE
        for name in ("large-4mib", "tensor-list-large", "tensor-list", "bytes"):
            id = new_id(f"parts-{name}")
            sender.call(ops.send, name, id, 0)
            got = fingerprint(dep.sidecar.recv_sync(id, timeout=WAIT))
            dep.sidecar.mark_done_sync(id)
            assert got == expected(name), f"{dep.name}: {name!r} sent in {PART_SIZE}-byte parts arrived changed"

    @needs_peer
    def test_hooks_see_sends_and_receives(self, sidecar_deployment: Deployment) -> None:
        """sidecar_on_send and sidecar_on_recv fire with the id, chunk, peer rank and transport."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        out, back = new_id("hook-send"), new_id("hook-recv")
        dep.sidecar.send(payload("float32-matrix"), out, 1).result(WAIT)
        peer.call(ops.send, "float32-matrix", back, 0)
        dep.sidecar.recv_sync(back, timeout=WAIT)
        dep.sidecar.mark_done_sync(back)
        peer.call(ops.recv, out)
        events = {(e.hook, e.id, e.chunk_id, e.rank, e.transport): e for e in dep.probe.events}
        sent = events.get(("send", out, 0, 1, dep.name))
        received = events.get(("recv", back, 0, 1, dep.name))
        assert sent is not None, f"no sidecar_on_send for {out}: {dep.probe.events}"
        assert received is not None, f"no sidecar_on_recv for {back}: {dep.probe.events}"
        assert isinstance(sent, HookEvent)
        assert sent.nbytes >= 48
        assert received.nbytes >= 48

    # -- errors --------------------------------------------------------------------------------

    def test_recv_timeout_names_id_chunk_transport_rank(self, sidecar_deployment: Deployment) -> None:
        """A recv that times out raises RecvTimeoutError (a TimeoutError) naming what it waited for."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id("never-sent")
        with pytest.raises(RecvTimeoutError) as info:
            dep.sidecar.recv_sync(id, 4, timeout=0.3)
        message = str(info.value)
        assert isinstance(info.value, TimeoutError)
        for part in (id, "chunk=4", dep.name, "rank 0"):
            assert part in message, f"the timeout message lacks {part!r}: {message}"
        status, kind, message = peer.call(ops.outcome, id, 2, 0.3)
        assert (status, kind) == ("error", "RecvTimeoutError")
        assert "rank 1" in message
        assert "chunk=2" in message

    @needs_peer
    def test_duplicate_chunk_fails_the_sender(self, sidecar_deployment: Deployment) -> None:
        """A chunk sent twice fails the second send with RemoteError; the first copy is kept."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id("duplicate")
        dep.sidecar.send(payload("float32-matrix"), id, 1).result(WAIT)
        with pytest.raises(RemoteError) as info:
            dep.sidecar.send(payload("dict"), id, 1).result(WAIT)
        reason = f"{dep.name}: the sender's error must carry the receiver's reason: {info.value}"
        assert id in str(info.value), reason
        assert "already held" in str(info.value), reason
        assert peer.call(ops.recv, id) == expected("float32-matrix"), "the first copy was lost"
        with pytest.raises(RemoteError, match="marked done"):
            dep.sidecar.send(payload("dict"), id, 1).result(WAIT)

    @needs_peer
    def test_bad_frame_is_rejected_and_receiver_keeps_serving(self, sidecar_deployment: Deployment) -> None:
        """A frame the receiver cannot decode fails the sender; held and later data are unharmed."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        held, bad, later = new_id("held"), new_id("bad-frame"), new_id("after-bad")
        dep.sidecar.send(payload("float32-matrix"), held, 1).result(WAIT)
        with pytest.raises(RemoteError) as info:
            dep.sidecar.send(b"not for rank 1", bad, 1, serializer=PROBE_SERIALIZER).result(WAIT)
        message = str(info.value)
        reason = f"{dep.name}: the sender's error must carry the receiver's reason: {message}"
        for part in ("unknown serializer", PROBE_SERIALIZER, bad):
            assert part in message, reason
        dep.sidecar.send(payload("dict"), later, 1).result(WAIT)
        assert peer.call(ops.recv, held) == expected("float32-matrix")
        assert peer.call(ops.recv, later) == expected("dict")
        status, kind, _ = peer.call(ops.outcome, bad, 0, 0.3)
        assert (status, kind) == ("error", "RecvTimeoutError"), "the rejected frame must not be stored"

    @needs_peer
    @pytest.mark.parametrize("nbytes", [16, 2 << 20], ids=["small", "large"])
    def test_a_frame_naming_another_sender_is_refused(self, sidecar_deployment: Deployment, nbytes: int) -> None:
        """A frame whose header names another rank than its connection's fails the sender; later data is unharmed.

        The receiver files a frame under the rank in its header, whose loss fails receives of its ids
        and drops its parts: a peer may not speak for another rank (``sidecar_core.check_sender``).
        """
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        impostor, later = new_id("impostor"), new_id("after-impostor")
        (frame,) = dep.sidecar.codec.frames(
            bytes(nbytes), id=impostor, chunk_id=0, num_chunks=1, src=3, max_part_bytes=None
        )
        sidecar = dep.sidecar
        with pytest.raises(RemoteError, match="says it comes from rank 3, but it came over the connection from rank 0"):
            sidecar._loop_thread.call(sidecar._transport.send(1, frame))
        sidecar.send(payload("dict"), later, 1).result(WAIT)
        assert peer.call(ops.recv, later) == expected("dict")
        status, kind, _ = peer.call(ops.outcome, impostor, 0, 0.3)
        assert (status, kind) == ("error", "RecvTimeoutError"), "the refused frame must not be stored"

    @needs_peer
    def test_peer_lost_mid_stream(self, sidecar_deployment: Deployment) -> None:
        """A sender killed mid-stream fails the waiting recv with PeerLostError; others go on."""
        dep = sidecar_deployment
        peer = dep.peer(1)  # started before anything is sent to it
        id = new_id("lost")
        doomed = dep.spawn(3)
        try:
            doomed.call(ops.send, "float32-matrix", id, 0, 0, 1, True)
            assert fingerprint(dep.sidecar.recv_sync(id, 0, timeout=WAIT)) == expected("float32-matrix")
            doomed.kill()
            error = raised(lambda: dep.sidecar.recv_sync(id, 1, timeout=LOST_WAIT))
            if isinstance(error, RecvTimeoutError):
                pytest.fail(
                    f"{dep.name}: rank 3 was killed mid-stream but recv waited until it timed out; a "
                    "transport must call Inbox.peer_lost(rank, reason) when a peer's connection breaks"
                )
            assert isinstance(error, PeerLostError), f"{dep.name}: expected PeerLostError, got {error!r}"
            assert "rank 3" in str(error), f"unclear PeerLostError: {error}"
            assert id in str(error), f"unclear PeerLostError: {error}"
            assert fingerprint(dep.sidecar.recv_sync(id, 0, timeout=5.0)) == expected("float32-matrix"), (
                "a chunk received before the peer died was lost"
            )
            with pytest.raises((PeerLostError, PeerUnreachableError, SendTimeoutError)):
                dep.sidecar.send(payload("zero"), new_id("to-dead"), 3).result(dep.send_timeout + WAIT)
        finally:
            doomed.close()
        alive = new_id("after-lost")
        dep.sidecar.send(payload("text"), alive, 1).result(WAIT)
        assert peer.call(ops.recv, alive) == expected("text"), "rank 0 stopped serving after a peer died"

    @needs_peer
    def test_send_waits_for_a_peer_that_starts_later(self, sidecar_deployment: Deployment) -> None:
        """A send to a rank whose sidecar starts within SIDECAR_CONNECT_TIMEOUT is delivered.

        The processes of a deployment start in any order, so a first send must wait for its peer
        rather than fail while nothing listens yet.
        """
        dep = sidecar_deployment
        id = new_id("late-peer")
        future = dep.sidecar.send(payload("float32-matrix"), id, LATE_RANK)
        time.sleep(SETTLE)
        if future.done():
            pytest.fail(
                f"{dep.name}: a send to rank {LATE_RANK}, whose sidecar was not started yet, ended at once "
                f"instead of waiting up to SIDECAR_CONNECT_TIMEOUT: {raised(future.result)!r}"
            )
        with dep.local(LATE_RANK) as late:
            future.result(WAIT)
            got = fingerprint(late.recv_sync(id, timeout=WAIT))
            late.mark_done_sync(id)
        assert got == expected("float32-matrix"), f"{dep.name}: the payload changed on its way to the late rank"

    def test_a_rank_can_be_served_again_after_its_sidecar_shut_down(self, sidecar_deployment: Deployment) -> None:
        """A sidecar's shutdown releases what its transport held: the next sidecar of that rank starts and receives.

        A ``close()`` that leaves a listener, a socket file or a lock behind passes every other test.
        """
        dep = sidecar_deployment
        for turn in ("first", "second"):
            try:
                with dep.local(REUSED_RANK) as reused:
                    id = new_id(f"reused-{turn}")
                    dep.sidecar.send(payload("float32-matrix"), id, REUSED_RANK).result(WAIT)
                    got = fingerprint(reused.recv_sync(id, timeout=WAIT))
                    reused.mark_done_sync(id)
            except Exception as exc:
                if turn == "first":
                    raise
                pytest.fail(
                    f"{dep.name}: the {turn} sidecar of rank {REUSED_RANK} in this process failed after the first "
                    f"one shut down ({exc!r}); the transport's close() must release its listener and whatever "
                    "else serves the rank"
                )
            assert got == expected("float32-matrix"), f"{dep.name}: the payload changed on its way to the reused rank"

    @needs_peer
    def test_a_peer_holding_another_auth_token_is_refused(self, sidecar_deployment: Deployment) -> None:
        """With SIDECAR_AUTH_TOKEN set, a send to a peer holding another token fails with AuthenticationError.

        The same two ranks holding the same token then move data, so the refusal was the token's.
        """
        dep = sidecar_deployment
        ours = {"SIDECAR_AUTH_TOKEN": "conformance-token-ours-" + "0" * 32}
        for theirs, refused in ({"SIDECAR_AUTH_TOKEN": "conformance-token-theirs-" + "1" * 32}, True), (ours, False):
            id = new_id("token")
            peer = dep.spawn(TOKEN_RANK, theirs)
            try:
                with dep.local(TOKEN_SENDER_RANK, ours) as sender:
                    future = sender.send(payload("float32-matrix"), id, TOKEN_RANK)
                    error = raised(lambda: future.result(WAIT))  # noqa: B023 - called at once
                    if refused:
                        assert isinstance(error, AuthenticationError), (
                            f"{dep.name}: a peer holding another SIDECAR_AUTH_TOKEN was sent to: {error!r}"
                        )
                        assert "SIDECAR_AUTH_TOKEN" in str(error), f"the error must name the setting: {error}"
                    else:
                        assert error is None, f"{dep.name}: peers holding the same token could not talk: {error!r}"
                        assert peer.call(ops.recv, id) == expected("float32-matrix")
            finally:
                peer.close()

    @needs_peer
    def test_send_to_unserved_rank_fails(self, sidecar_deployment: Deployment) -> None:
        """A send to a rank nobody serves fails with PeerUnreachableError or SendTimeoutError."""
        dep = sidecar_deployment
        future = dep.sidecar.send(payload("float32-matrix"), new_id("nobody"), UNSERVED_RANK)
        error = raised(lambda: future.result(dep.send_timeout + WAIT))
        if isinstance(error, concurrent.futures.TimeoutError):
            pytest.fail(f"{dep.name}: a send to unserved rank {UNSERVED_RANK} outlived SIDECAR_SEND_TIMEOUT")
        assert error is not None, f"{dep.name}: a send to unserved rank {UNSERVED_RANK} succeeded"
        assert isinstance(error, PeerUnreachableError | SendTimeoutError), f"{dep.name}: unexpected {error!r}"
        assert f"rank {UNSERVED_RANK}" in str(error), f"the error must name the rank: {error}"
