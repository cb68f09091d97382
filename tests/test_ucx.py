"""Behaviour specific to the ucx transport, with real peer processes.

Generic round trips (every serializer, streams, broadcast, duplicate chunks, ...) are covered by the
conformance suite (``tests/test_conformance.py``); this module covers what only ucx does: rank
addressing, its handshake and auth, refusals before allocation, malformed headers, concurrent frames
on one connection, lost peers and reconnection, progress modes, and large payloads byte for byte.
GPU paths are in ``tests/test_ucx_gpu.py``; two simulated hosts in ``tests/test_ucx_netns.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple, replace
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
import torch
from _forking import forking_owner, owner_script
from _waiting import stop_process, wait_until

import transports.ucx._inbound as inbound_module
import transports.ucx._transport as ucx_transport_module
from sidecar_core import (
    AuthenticationError,
    Frame,
    Header,
    PeerLostError,
    PeerUnreachableError,
    RecvTimeoutError,
    RemoteError,
    SendTimeoutError,
    SettingsError,
    Sidecar,
    SidecarConfig,
    SidecarSettings,
    load_settings,
)
from sidecar_core.testing import PeerProcess, environment, ids_sent_on_the_loop, local_sidecar
from transports.ucx import UcxTransport
from transports.ucx import _wire as wire
from transports.ucx._addressing import TEST_PORTS, Address, Addressing, free_base_port, ports_free
from transports.ucx._inbound import RECONNECT_GRACE, Absences, Inbound
from transports.ucx._link import Link

pytest.importorskip("ucxx", reason="ucxx is not installed: pip install 'sidecar[ucx]'")

pytestmark = [pytest.mark.multiprocess, pytest.mark.transport("ucx")]

TOKEN = "ucx-test-token"
WAIT = 20.0
MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]

# -- helpers run in peer processes ---------------------------------------------------------------


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def random_bytes(nbytes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def peer_recv_digests(sidecar: Sidecar, ids: list[str]) -> list[str]:
    digests = []
    for id in ids:
        digests.append(digest(sidecar.recv_sync(id, timeout=WAIT)))
        sidecar.mark_done_sync(id)
    return digests


def peer_recv_values(sidecar: Sidecar, ids: list[str]) -> list[Any]:
    values = []
    for id in ids:
        values.append(sidecar.recv_sync(id, timeout=WAIT))
        sidecar.mark_done_sync(id)
    return values


def peer_send_random(sidecar: Sidecar, nbytes: int, seed: int, id: str, dst: int) -> None:
    """Send random bytes made here (tensors passed through the harness pipe would go through /dev/shm)."""
    sidecar.send(random_bytes(nbytes, seed), id, dst).result(WAIT)


def peer_send(sidecar: Sidecar, obj: Any, id: str, dst: int, chunk_id: int = 0, stream: bool = False) -> None:
    sidecar.send(obj, id, dst, chunk_id=chunk_id, stream=stream).result(WAIT)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {
        **UcxTransport.test_environment(tmp_path_factory.mktemp("ucx")),
        "SIDECAR_TRANSPORT": "ucx",
        "SIDECAR_CONNECT_TIMEOUT": "3",
        "SIDECAR_SEND_TIMEOUT": "20",
        "SIDECAR_RECV_TIMEOUT": "20",
    }


@pytest.fixture(scope="module")
def base_port(env: dict[str, str]) -> int:
    return int(env["SIDECAR_BASE_PORT"])


@pytest.fixture(scope="module")
def peer(env: dict[str, str]) -> Iterator[PeerProcess]:
    with PeerProcess(1, env) as process:
        yield process


@pytest.fixture(scope="module")
def sender(env: dict[str, str]) -> Iterator[Sidecar]:
    with local_sidecar(env, 0) as sidecar:
        yield sidecar


def transport(sidecar: Sidecar) -> UcxTransport:
    return cast(UcxTransport, sidecar._transport)


# -- import, settings, addressing ----------------------------------------------------------------


def test_ucxx_is_imported_only_when_the_transport_starts() -> None:
    code = (
        "import sys, sidecar_core, transports, transports.ucx\n"
        "from sidecar_core import get_registry\n"
        "get_registry().load_transport('ucx')\n"
        "assert 'ucxx' not in sys.modules, 'ucxx was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def addressing(**settings: Any) -> Addressing:
    return Addressing(load_settings(SidecarSettings, **settings))


def test_ranks_resolve_by_template_peer_map_or_loopback() -> None:
    template = addressing(host_template="sidecar-{rank}.sidecar.default.svc", base_port=19000)
    assert template.resolve(3) == Address("sidecar-3.sidecar.default.svc", 19003)
    assert template.listen_port(3) == 19003
    peers = addressing(peers={0: "10.0.0.5:7000", 1: "[fd00::2]:7001"})
    assert peers.resolve(1) == Address("fd00::2", 7001)
    assert str(peers.resolve(1)) == "[fd00::2]:7001"
    assert peers.listen_port(0) == 7000
    local_ = addressing(is_local=True, peers={1: "10.0.0.6:7001"}, host_template="far-{rank}", base_port=20000)
    assert local_.resolve(1) == Address("127.0.0.1", 7001)
    assert local_.resolve(2) == Address("127.0.0.1", 20002)


def test_addressing_errors_name_the_setting() -> None:
    with pytest.raises(PeerUnreachableError, match=r"rank 4 is not in SIDECAR_PEERS \(ranks listed: 0\)"):
        addressing(peers={0: "10.0.0.5:7000"}).resolve(4)
    with pytest.raises(SettingsError, match=r'SIDECAR_PEERS maps rank 0 to \'10.0.0.5\'; expected "host:port"'):
        addressing(peers={0: "10.0.0.5"})
    with pytest.raises(SettingsError, match=r"SIDECAR_HOST_TEMPLATE='node-\{host\}' cannot be formatted"):
        addressing(host_template="node-{host}")
    for template in ("node-{rank.x}", "node-{rank[0]}"):  # an AttributeError and a TypeError inside
        with pytest.raises(SettingsError, match="cannot be formatted"):
            addressing(host_template=template)
    with pytest.raises(SettingsError, match="SIDECAR_PEERS maps rank 1 to 'h:\u00b2'"):  # a digit to isdigit()
        addressing(peers={1: "h:\u00b2"})
    with pytest.raises(PeerUnreachableError, match="exceeds 65535"):
        addressing(base_port=65530).resolve(9)


def test_bad_progress_mode_names_the_variable(env: dict[str, str]) -> None:
    with (
        environment({**env, "SIDECAR_UCX__PROGRESS_MODE": "sometimes"}),
        pytest.raises(SettingsError, match=r"SIDECAR_UCX__PROGRESS_MODE=\"sometimes\""),
    ):
        Sidecar(SidecarConfig(sidecar_rank=30))


def test_test_environment_gives_free_loopback_ports(tmp_path: Path) -> None:
    given = UcxTransport.test_environment(tmp_path)
    assert given["SIDECAR_IS_LOCAL"] == "1"
    base = int(given["SIDECAR_BASE_PORT"])
    assert ports_free(base, TEST_PORTS)
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        ephemeral = int(ports.read().split()[0])
    if ephemeral - 10000 >= 50 * TEST_PORTS:  # else the kernel leaves no room below its own ports
        assert base + TEST_PORTS <= ephemeral, "outgoing connections would compete for the test's ports"


def test_taken_port_is_reported(env: dict[str, str], peer: PeerProcess, base_port: int) -> None:
    with (
        pytest.raises(PeerUnreachableError, match=rf"rank 1 cannot listen on port {base_port + 1} over ucx"),
        local_sidecar(env, 1),
    ):
        pass


# -- data ----------------------------------------------------------------------------------------


def test_large_tensor_arrives_byte_for_byte_both_ways(sender: Sidecar, peer: PeerProcess) -> None:
    data = random_bytes(64 * MiB, seed=1)
    sender.send(data, "large-out", 1).result(WAIT)
    assert peer.call(peer_recv_digests, ["large-out"]) == [digest(data)]
    peer.call(peer_send_random, 64 * MiB, 2, "large-in", 0)
    received = sender.recv_sync("large-in", timeout=WAIT)
    assert received.dtype == torch.uint8
    assert received.shape == (64 * MiB,)
    assert digest(received) == digest(random_bytes(64 * MiB, seed=2))
    sender.mark_done_sync("large-in")


def test_concurrent_frames_on_one_connection_keep_their_bytes(sender: Sidecar, peer: PeerProcess) -> None:
    sizes = [1, 100, 8 * 1024, 70_000, 3 * MiB, 0, 512 * 1024, 5 * MiB, 17, 2 * MiB]
    tensors = [random_bytes(size, seed=100 + i) for i, size in enumerate(sizes)]
    futures = [sender.send(t, f"concurrent-{i}", 1) for i, t in enumerate(tensors)]
    multi = [random_bytes(300_000, 7), random_bytes(0, 8), random_bytes(1_000_000, 9)]
    futures.append(sender.send(multi, "concurrent-multi", 1))
    for future in futures:
        future.result(WAIT)
    ids = [f"concurrent-{i}" for i in range(len(sizes))]
    assert peer.call(peer_recv_digests, ids) == [digest(t) for t in tensors]
    assert [digest(t) for t in peer.call(peer_recv_values, ["concurrent-multi"])[0]] == [digest(t) for t in multi]


def test_frames_submitted_from_many_threads_at_once_keep_their_bytes(sender: Sidecar, peer: PeerProcess) -> None:
    # Each frame is a header message and a payload message; threads submit them at the same time.
    sender.send(0, "threads-warm", 1).result(WAIT)
    tensors = {f"threads-{i}": random_bytes(16_384 + 4_099 * i, seed=200 + i) for i in range(48)}
    start = threading.Barrier(8)

    def send_share(first: int) -> None:
        start.wait(WAIT)
        futures = [sender.send(tensors[f"threads-{i}"], f"threads-{i}", 1) for i in range(first, 48, 8)]
        for future in futures:
            future.result(WAIT)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(send_share, range(8)))
    assert peer.call(peer_recv_digests, list(tensors)) == [digest(t) for t in tensors.values()]


def test_sends_to_an_open_connection_skip_the_loops_send(
    env: dict[str, str], peer: PeerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_loop = ids_sent_on_the_loop(monkeypatch, UcxTransport)
    payload = random_bytes(3 * MiB, 30)
    with local_sidecar(env, 30) as sidecar:
        sidecar.send(0, "nowait-connect", 1).result(WAIT)  # no connection yet: the loop connects
        futures = [
            sidecar.send(7, "nowait-int", 1),
            sidecar.send(b"x" * 4096, "nowait-inline", 1),
            sidecar.send(payload, "nowait-payload", 1),
        ]
        for future in futures:
            future.result(WAIT)
        with pytest.raises(RemoteError, match=r"refused id='nowait-int' chunk=0: DuplicateChunkError"):
            sidecar.send(8, "nowait-int", 1).result(WAIT)
    assert on_loop == ["nowait-connect"]
    assert peer.call(peer_recv_values, ["nowait-connect", "nowait-int", "nowait-inline"]) == [0, 7, b"x" * 4096]
    assert peer.call(peer_recv_digests, ["nowait-payload"]) == [digest(payload)]


def test_a_send_onto_an_endpoint_closed_underneath_fails_and_the_next_connects_again(
    sender: Sidecar, peer: PeerProcess
) -> None:
    sender.send(0, "underneath-warm", 1).result(WAIT)
    link = transport(sender)._links[1]

    async def close_endpoint_only() -> None:  # as if it broke, before UCX reported it
        worker = link._endpoint.worker
        reap_soon = worker.reap_soon
        worker.reap_soon = lambda: None  # type: ignore[method-assign]  # the link's cancelled receive stays unreported
        try:
            link._endpoint.close()
        finally:
            worker.reap_soon = reap_soon  # type: ignore[method-assign]

    sender._loop_thread.call(close_endpoint_only())
    assert not link.closed
    start = time.monotonic()
    with pytest.raises(PeerLostError, match=r"rank 1 at .* broke before it acknowledged id='underneath-1'"):
        sender.send(1, "underneath-1", 1).result(WAIT)  # submitted on this thread: it finds the endpoint closed
    assert time.monotonic() - start < 5  # failed at once, not by the send timeout
    assert link.closed
    sender.send(2, "underneath-2", 1).result(WAIT)
    assert transport(sender)._links[1] is not link
    assert peer.call(peer_recv_values, ["underneath-warm", "underneath-2"]) == [0, 2]


def test_a_malformed_acknowledgement_fails_its_send_at_once(
    env: dict[str, str], sender: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    with local_sidecar(env, 6):
        sender.send(0, "before-bad-ack", 6).result(WAIT)

        def unknown_status(inbound: Inbound, seq: int, refusal: BaseException | None, *, closing: bool = False) -> None:
            inbound._require().post(wire.ACK.pack(seq, 9, 0), inbound._ack_tag)

        monkeypatch.setattr(Inbound, "_ack", unknown_status)
        start = time.monotonic()
        with pytest.raises(PeerLostError, match=r"malformed acknowledgement \(status 9"):
            sender.send(1, "badly-acknowledged", 6).result(WAIT)
        assert time.monotonic() - start < 5, "failed when the acknowledgement came, not by the send timeout"
        monkeypatch.undo()
        sender.send(2, "after-bad-ack", 6).result(WAIT)  # over a new connection


def alter_messages(monkeypatch: pytest.MonkeyPatch, change: Callable[[Any, list[Any]], list[Any]]) -> None:
    """Send every frame as the messages ``change(header, payloads)`` returns (``monkeypatch.undo()`` ends it)."""
    real_messages = Link._messages

    def altered(seq: int, frame: Frame, buffers: list[Any]) -> list[Any]:
        header, *payloads = real_messages(seq, frame, buffers)
        return change(header, payloads)

    monkeypatch.setattr(Link, "_messages", staticmethod(altered))


def test_a_header_message_shorter_than_its_prefix_says_never_reads_an_earlier_one(
    env: dict[str, str], sender: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receive buffer is reused: the bytes the message did not send must not be the last message's.
    with local_sidecar(env, 12) as receiver:
        sender.send(1, "same-length-1", 12).result(WAIT)
        alter_messages(monkeypatch, lambda header, payloads: [bytes(header)[: wire.HEADER_PREFIXES], *payloads])
        with pytest.raises(RemoteError, match="FrameError: malformed frame header"):
            sender.send(1, "same-length-2", 12).result(WAIT)  # read as the first one's header, it was a duplicate
        monkeypatch.undo()
        sender.send(2, "same-length-3", 12).result(WAIT)  # over a new connection
        assert receiver.recv_sync("same-length-3", timeout=WAIT) == 2


def test_a_payload_longer_than_its_header_says_closes_the_connection(
    env: dict[str, str], sender: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    with local_sidecar(env, 11) as receiver:
        sender.send(0, "before-long-payload", 11).result(WAIT)
        alter_messages(monkeypatch, lambda header, payloads: [header, *(bytes(p) * 2 for p in payloads)])
        start = time.monotonic()
        longer = r"FrameError: id='long-payload' chunk=0: a payload message is longer than the header says"
        with pytest.raises(RemoteError, match=longer):
            sender.send(random_bytes(MiB, 8), "long-payload", 11).result(WAIT)
        assert time.monotonic() - start < 5, "refused when the payload came, not by the send timeout"
        assert transport(receiver)._pool.idle_bytes >= MiB, "the frame's host block went back to the pool"
        monkeypatch.undo()
        data = random_bytes(MiB, 9)
        sender.send(data, "after-long-payload", 11).result(WAIT)  # over a new connection
        assert digest(receiver.recv_sync("after-long-payload", timeout=WAIT)) == digest(data)
        assert transport(receiver)._serve.arriving.bytes == 0, "nothing counts as still arriving"


def test_a_connection_that_breaks_right_after_the_handshake_is_not_kept(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_connect = ucx_transport_module.connect
    attempts: list[Link] = []

    async def breaking_once(*args: Any, **kwargs: Any) -> Link:
        link = await real_connect(*args, **kwargs)
        if not attempts:  # as if the peer closed between its handshake reply and the link's first receive
            link.close("the peer closed right after the handshake")
        attempts.append(link)
        return link

    monkeypatch.setattr(ucx_transport_module, "connect", breaking_once)
    with local_sidecar(env, 9) as receiver, local_sidecar(env, 10) as sending:
        with pytest.raises(PeerLostError, match="the peer closed right after the handshake"):
            sending.send(1, "on-the-broken-link", 9).result(WAIT)
        sending.send(2, "on-a-new-link", 9).result(WAIT)
        assert len(attempts) == 2
        assert transport(sending)._links[9] is attempts[1]
        assert receiver.recv_sync("on-a-new-link", timeout=WAIT) == 2


def test_inbox_refusal_comes_back_and_the_connection_stays(sender: Sidecar, peer: PeerProcess) -> None:
    sender.send(1, "dup", 1).result(WAIT)
    with pytest.raises(RemoteError, match=r"rank 1 at 127\.0\.0\.1:\d+ refused id='dup' chunk=0: DuplicateChunkError"):
        sender.send(2, "dup", 1).result(WAIT)
    link = transport(sender)._links[1]
    sender.send(3, "after-dup", 1).result(WAIT)
    assert transport(sender)._links[1] is link
    assert peer.call(peer_recv_values, ["dup", "after-dup"]) == [1, 3]


def test_oversized_frame_is_refused_before_allocation(env: dict[str, str], sender: Sidecar) -> None:
    with local_sidecar(env, 5, max_buffered_bytes=MiB) as small:
        with pytest.raises(RemoteError, match=r"CapacityError: id='too-big' chunk=0: 2097152 bytes exceed "):
            sender.send(random_bytes(2 * MiB, 3), "too-big", 5).result(WAIT)
        link = transport(sender)._links[5]
        data = random_bytes(100_000, 4)
        sender.send(data, "fits", 5).result(WAIT)  # the refused payload was drained: the link still works
        assert transport(sender)._links[5] is link
        assert digest(small.recv_sync("fits", timeout=WAIT)) == digest(data)
        # Several payload messages (one per tensor, none for the empty one) are each drained.
        parts = [random_bytes(MiB, 5), random_bytes(0, 6), random_bytes(MiB, 7)]
        with pytest.raises(RemoteError, match=r"CapacityError: id='too-big-list' chunk=0: 2097152 bytes exceed "):
            sender.send(parts, "too-big-list", 5).result(WAIT)
        sender.send(data, "fits-after-list", 5).result(WAIT)
        assert transport(sender)._links[5] is link
        assert digest(small.recv_sync("fits-after-list", timeout=WAIT)) == digest(data)


def test_frames_still_arriving_count_against_the_memory_bound(
    env: dict[str, str], sender: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    stalled: list[str] = []
    real_receive = Inbound._receive

    def stall_the_first(inbound: Inbound, seq: int, header: Header, landing: Any) -> None:
        if not stalled:  # its memory is allocated, its payload not yet received: as if still on its way
            stalled.append(header.id)
            return
        real_receive(inbound, seq, header, landing)

    with local_sidecar(env, 13, max_buffered_bytes=3 * MiB):
        sender.send(0, "before-arriving", 13).result(WAIT)  # held: 1 byte
        monkeypatch.setattr(Inbound, "_receive", stall_the_first)
        sender.send(random_bytes(2 * MiB, 10), "arriving-1", 13)  # never acknowledged: its payload is stalled
        wait_until(lambda: stalled, "the first frame's payload is stalled", WAIT)
        assert stalled == ["arriving-1"]
        bound = r"CapacityError: id='arriving-2' chunk=0: 2097152 more bytes would exceed .* \(2097153 held or arr"
        with pytest.raises(RemoteError, match=bound):
            sender.send(random_bytes(2 * MiB, 11), "arriving-2", 13).result(WAIT)


def test_a_message_in_parts_is_set_aside_whole_at_its_first_part(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts are received in place, into the memory the store sets aside for the whole message when
    # its first part's header comes: counted once, together with what frames still arriving hold.
    stalled: list[tuple[str, int]] = []
    refused: list[str] = []
    real_drain = Inbound._drain

    def stall(inbound: Inbound, seq: int, header: Header, landing: Any) -> None:
        stalled.append((header.id, header.part))  # memory given, payload never received: still on its way

    def drain(inbound: Inbound, seq: int, header: Header, refusal: Exception) -> None:
        refused.append(str(refusal))
        real_drain(inbound, seq, header, refusal)

    def wait_for(count: int) -> None:
        wait_until(lambda: len(stalled) + len(refused) >= count, f"{count} parts are stalled or refused", WAIT)

    with (
        local_sidecar(env, 16, max_buffered_bytes=4 * MiB) as receiver,
        local_sidecar(env, 17, chunk_size=MiB) as parts,
    ):
        parts.send(0, "before-parts", 16).result(WAIT)  # held: 1 byte
        monkeypatch.setattr(Inbound, "_receive", stall)
        monkeypatch.setattr(Inbound, "_drain", drain)
        pending = [parts.send(random_bytes(MiB, 11), "whole", 16)]  # one part: 1 MiB arriving
        wait_for(1)
        # A message's parts go one after another (each once the one before is acknowledged), so
        # only the first part of each of these comes; the store sets the whole 2 MiB aside for it.
        pending += [parts.send(random_bytes(2 * MiB, 12 + i), f"parts-{i}", 16) for i in (1, 2)]
        wait_for(3)
        assert stalled == [("whole", 0), ("parts-1", 0)]
        assert refused == [
            "id='parts-2' chunk=0: 2097152 bytes would exceed SIDECAR_MAX_BUFFERED_BYTES=4194304 on rank 16 "
            "(3145729 held or arriving); the receiver must mark_done chunks it has consumed, or raise the bound"
        ]
        assert receiver._store.buffered_bytes == 2 * MiB + 1, "the first message in parts is set aside whole"
        assert transport(receiver)._serve.arriving.bytes == MiB, "its part has no memory of its own"
    for future in pending:  # none was accepted: each fails, with its refusal or at shutdown
        assert isinstance(future.exception(WAIT), (PeerLostError, RemoteError))


def test_a_message_in_parts_that_fits_the_bound_is_taken_in_place(env: dict[str, str]) -> None:
    # The store sets aside the whole message at its first part; its parts must not count twice,
    # and they are received straight into it (no host block of their own, which the pool would keep).
    data = random_bytes(5 * MiB // 2, 12)
    with (
        local_sidecar(env, 14, max_buffered_bytes=3 * MiB) as receiver,
        local_sidecar(env, 15, chunk_size=MiB) as parts,
    ):
        parts.send(data, "in-parts", 14).result(WAIT)
        joined = receiver.recv_sync("in-parts", timeout=WAIT)
        assert digest(joined) == digest(data)
        assert transport(receiver)._pool.idle_bytes == 0, "no part took a block of the host pool"
        assert transport(receiver)._serve.arriving.bytes == 0
        receiver.mark_done_sync("in-parts")
        assert receiver._store.buffered_bytes == 0


def test_a_part_the_store_refuses_is_drained_and_the_connection_keeps_serving(env: dict[str, str]) -> None:
    with (
        local_sidecar(env, 18) as receiver,
        local_sidecar(env, 19, chunk_size=MiB) as parts,
    ):
        parts.send(1, "done-already", 18).result(WAIT)
        assert receiver.recv_sync("done-already", timeout=WAIT) == 1
        receiver.mark_done_sync("done-already")
        link = transport(parts)._links[18]
        refused = r"DuplicateChunkError: id='done-already' chunk=0 was already marked done"
        with pytest.raises(RemoteError, match=refused):
            parts.send(random_bytes(3 * MiB, 13), "done-already", 18).result(WAIT)  # refused at its first part
        data = random_bytes(3 * MiB, 14)
        parts.send(data, "after-refusal", 18).result(WAIT)
        assert transport(parts)._links[18] is link, "the refused part's payload was drained: the link still works"
        assert digest(receiver.recv_sync("after-refusal", timeout=WAIT)) == digest(data)
        assert receiver._store.buffered_bytes == 3 * MiB


def test_malformed_header_is_refused_and_the_listener_keeps_serving(sender: Sidecar, peer: PeerProcess) -> None:
    bad = Header(kind="data", id="bad", chunk_id=0, num_chunks=1, src=0, serializer="tensor", layout=[4], sizes=[4])
    msgspec.structs.force_setattr(bad, "chunk_id", 5)  # a header this sidecar would never build
    ucx = transport(sender)
    with pytest.raises(
        RemoteError, match=r"FrameError: malformed frame header: .*chunk_id 5 is not below num_chunks 1"
    ):
        sender._loop_thread.call(ucx.send(1, Frame(bad, [memoryview(b"abcd")])))
    sender.send(7, "after-bad", 1).result(WAIT)  # over a new connection
    assert peer.call(peer_recv_values, ["after-bad"]) == [7]


async def _close_link(link: Link) -> None:
    link.close("a send was cancelled mid-frame")  # what a timed-out send of another frame does


def test_a_message_in_parts_is_not_continued_over_a_new_connection(env: dict[str, str], sender: Sidecar) -> None:
    # Continued over a new connection, the message's later parts would be acknowledged while the
    # receiver drops the parts that came over the broken one: a send reported done for a message the
    # receiver never completes.
    ucx = transport(sender)
    data = random_bytes(64 << 10, 13)
    with local_sidecar(env, 8) as receiver:
        first, second = sender.codec.frames(data, id="split", chunk_id=0, num_chunks=1, src=0, max_part_bytes=32 << 10)
        sender._loop_thread.call(ucx.send(8, first))
        sender._loop_thread.call(_close_link(ucx._links[8]))
        with pytest.raises(
            PeerLostError, match=r"rank 8 broke between the parts of id='split' chunk=0 .*send the message"
        ):
            sender._loop_thread.call(ucx.send(8, second))
        for frame in sender.codec.frames(data, id="split", chunk_id=0, num_chunks=1, src=0, max_part_bytes=32 << 10):
            sender._loop_thread.call(ucx.send(8, frame))  # sent again in full, at once, over the new connection
        assert digest(receiver.recv_sync("split", timeout=WAIT)) == digest(data)
        receiver.mark_done_sync("split")
        assert transport(receiver).ctx.inbox.buffered_bytes == 0, "nothing of the first send stays counted"


def test_a_connection_found_broken_late_loses_only_what_came_over_it(
    env: dict[str, str], sender: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver may handle the break of an old connection only after the sender connected again
    # and sent parts of another message: those parts, and receives waiting on the sender, must survive.
    ucx = transport(sender)
    old_data, new_data = random_bytes(64 << 10, 14), random_bytes(64 << 10, 15)
    with local_sidecar(env, 4) as receiver, concurrent.futures.ThreadPoolExecutor(1) as pool:
        sender.send(0, "stream-4", 4, chunk_id=0, stream=True).result(WAIT)
        waiting = pool.submit(receiver.recv_sync, "stream-4", 1, WAIT)  # on a rank-0 id: lost if rank 0 were
        (first,) = transport(receiver)._inbound
        heard: list[str] = []
        close_now = Inbound._close

        def close_later(inbound: Inbound, reason: str, *, lost: bool = False) -> None:
            if inbound is first and lost:
                heard.append(reason)
            else:
                close_now(inbound, reason, lost=lost)

        monkeypatch.setattr(Inbound, "_close", close_later)
        old = sender.codec.frames(old_data, id="old-4", chunk_id=0, num_chunks=1, src=0, max_part_bytes=32 << 10)
        sender._loop_thread.call(ucx.send(4, old[0]))
        sender._loop_thread.call(_close_link(ucx._links[4]))
        wait_until(lambda: heard, "the receiver heard that the first connection broke", WAIT)
        new = sender.codec.frames(new_data, id="new-4", chunk_id=0, num_chunks=1, src=0, max_part_bytes=32 << 10)
        sender._loop_thread.call(ucx.send(4, new[0]))  # over a new connection
        assert len(transport(receiver)._inbound) == 2

        async def handle_the_break_now() -> None:
            close_now(first, heard[0], lost=True)

        receiver._loop_thread.call(handle_the_break_now())
        sender._loop_thread.call(ucx.send(4, new[1]))
        assert digest(receiver.recv_sync("new-4", timeout=WAIT)) == digest(new_data)
        assert not waiting.done(), "rank 0 is still connected: its receives go on"
        sender.send(1, "stream-4", 4, chunk_id=1, stream=True).result(WAIT)
        assert waiting.result(WAIT) == 1
        receiver.mark_done_sync("new-4")
        for chunk in (0, 1):
            receiver.mark_done_sync("stream-4", chunk)
        assert transport(receiver).ctx.inbox.buffered_bytes == 0, "the old message's part was let go"


# -- errors: unreachable, auth, lost peers -------------------------------------------------------


def test_unreachable_peer_names_rank_host_and_port(sender: Sidecar, base_port: int) -> None:
    start = time.monotonic()
    with pytest.raises(PeerUnreachableError) as info:
        sender.send(5, "nobody", 9).result(WAIT)
    elapsed = time.monotonic() - start
    assert f"cannot connect to rank 9 at 127.0.0.1:{base_port + 9} over ucx" in str(info.value)
    assert "(tried for 3s, SIDECAR_CONNECT_TIMEOUT)" in str(info.value)
    assert elapsed < 3.0 + 1.0, f"gave up after {elapsed:.2f}s, SIDECAR_CONNECT_TIMEOUT is 3s"


def test_silent_listener_times_out_within_connect_timeout(env: dict[str, str], base_port: int) -> None:
    # A plain TCP listener accepts the connection but never speaks UCX.
    with socket.create_server(("127.0.0.1", base_port + 12)), local_sidecar(env, 11, connect_timeout=1) as lonely:
        start = time.monotonic()
        with pytest.raises(PeerUnreachableError) as info:
            lonely.send(1, "silence", 12).result(WAIT)
        elapsed = time.monotonic() - start
    assert f"cannot connect to rank 12 at 127.0.0.1:{base_port + 12} over ucx" in str(info.value)
    assert "no answer within SIDECAR_CONNECT_TIMEOUT=1s" in str(info.value)
    assert elapsed < 1.0 + 1.0, f"gave up after {elapsed:.2f}s"


@pytest.mark.parametrize(("token", "presented"), [(None, "no auth token"), ("wrong-token", "a wrong auth token")])
def test_auth_token_refused_and_listener_keeps_serving(env: dict[str, str], token: str | None, presented: str) -> None:
    with local_sidecar(env, 20, auth_token=TOKEN) as guarded:
        settings = {"auth_token": token} if token else {}
        with local_sidecar(env, 21, **settings) as intruder, pytest.raises(AuthenticationError) as info:
            intruder.send(1, "intruder", 20).result(WAIT)
        assert "rank 20 at 127.0.0.1:" in str(info.value)
        assert f"refused this sidecar, saying 'it presented {presented}; set the same" in str(info.value)
        assert "SIDECAR_AUTH_TOKEN" in str(info.value)
        with local_sidecar(env, 22, auth_token=TOKEN) as friend:
            friend.send({"ok": True}, "friend", 20).result(WAIT)
        assert guarded.recv_sync("friend", timeout=WAIT) == {"ok": True}


def test_a_listener_without_a_token_refuses_a_peer_that_has_one(env: dict[str, str]) -> None:
    with local_sidecar(env, 26) as open_door, local_sidecar(env, 27, auth_token=TOKEN) as careful:
        with pytest.raises(AuthenticationError, match="it holds an auth token and this sidecar has none"):
            careful.send(1, "mismatch", 26).result(WAIT)
        with pytest.raises(RecvTimeoutError):
            open_door.recv_sync("mismatch", timeout=0.3)


@pytest.mark.parametrize(
    ("impostor_token", "has"), [(None, "has no auth token"), ("other", "holds another auth token")]
)
def test_a_listener_that_cannot_prove_the_token_gets_nothing(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, impostor_token: str | None, has: str
) -> None:
    # Whoever answers at a peer's address (a process that took the port first, a name that resolves
    # elsewhere) used to receive the token in the hello. Now the connector sends only a nonce and its
    # proof, and refuses a listener that accepts it without proving the token in turn. The impostor
    # here is a listener that accepts every proof.
    received: list[bytes] = []
    parse = wire.parse_model

    def recording(cls: Any, body: bytes | bytearray, what: str) -> Any:
        received.append(bytes(body))
        return parse(cls, body, what)

    monkeypatch.setattr(wire, "parse_model", recording)
    monkeypatch.setattr(inbound_module, "_refusal", lambda given, expected: "")
    settings = {"auth_token": impostor_token} if impostor_token else {}
    with local_sidecar(env, 23, **settings) as impostor, local_sidecar(env, 24, auth_token=TOKEN) as careful:
        with pytest.raises(AuthenticationError) as info:
            careful.send({"secret": 1}, "kept", 23).result(WAIT)
        assert f"rank 23 at 127.0.0.1:{transport(careful)._addressing.resolve(23).port} did not prove" in str(
            info.value
        )
        assert f"that it holds this sidecar's auth token: it {has}" in str(info.value)
        assert "No frame was sent to it" in str(info.value)
        with pytest.raises(RecvTimeoutError):
            impostor.recv_sync("kept", timeout=0.5)
    bodies = b"".join(received)
    assert b'"nonce"' in bodies, "the handshake went through the recorded parser"
    assert b'"proof"' in bodies
    assert TOKEN.encode() not in bodies, "the token must never travel"


def test_a_short_auth_token_is_warned_about(env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="transports.ucx"):
        with local_sidecar(env, 32, auth_token="x" * 15):
            pass
        with local_sidecar(env, 33, auth_token="x" * 16):
            pass
    warnings = [r.getMessage() for r in caplog.records if "SIDECAR_AUTH_TOKEN has" in r.getMessage()]
    assert warnings == [
        "SIDECAR_AUTH_TOKEN has 15 characters: a listener impostor could guess a short token offline from this "
        "sidecar's proof; use a long random one, such as secrets.token_hex(32) makes"
    ]
    assert "x" * 15 not in caplog.text, "the token itself is never logged"


def test_proofs_and_the_ack_tag_hold_for_one_connection_and_one_side_only() -> None:
    assert "ack_tag" not in wire.Hello.model_fields, "the acknowledgement tag is never sent"
    transcript = wire.Transcript(1, 2, wire.new_nonce(), wire.new_nonce())
    listener = transcript.proof(TOKEN, "listener", 40)
    assert wire.proof_matches(listener, wire.Transcript(*astuple(transcript)).proof(TOKEN, "listener", 40))
    others = [
        transcript.proof(TOKEN, "connector", 40),  # the other side's proof
        transcript.proof(TOKEN, "listener", 44),  # another tag base
        replace(transcript, listener_nonce=wire.new_nonce()).proof(TOKEN, "listener", 40),  # another connection
        replace(transcript, connector_nonce=wire.new_nonce()).proof(TOKEN, "listener", 40),
        replace(transcript, connector_rank=3).proof(TOKEN, "listener", 40),
        replace(transcript, listener_rank=3).proof(TOKEN, "listener", 40),
        transcript.proof("another-token", "listener", 40),
    ]
    assert not any(wire.proof_matches(listener, other) for other in others)
    assert not wire.proof_matches(None, listener)
    assert TOKEN not in listener
    ack = transcript.ack_tag(TOKEN)
    assert ack % wire.TAG_KINDS == wire.ACKNOWLEDGE
    assert 0 <= ack < 2**64
    assert ack == wire.Transcript(*astuple(transcript)).ack_tag(TOKEN), "both sides work out the same tag"
    assert ack not in {
        transcript.ack_tag("another-token"),
        replace(transcript, listener_nonce=wire.new_nonce()).ack_tag(TOKEN),
    }


def test_a_peer_of_another_protocol_version_is_refused_clearly(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, peer: PeerProcess
) -> None:
    # Versions differ in their handshake messages too, so the version is read before the rest.
    monkeypatch.setattr(wire, "VERSION", wire.VERSION + 1)
    with local_sidecar(env, 25) as newer, pytest.raises(PeerUnreachableError) as info:
        newer.send(0, "versions", 1).result(WAIT)
    assert f"speaks protocol version {wire.VERSION - 1}, this sidecar {wire.VERSION}: run the same" in str(info.value)
    said = f"saying 'a peer claiming rank 25 speaks protocol version {wire.VERSION}, this sidecar {wire.VERSION - 1}'"
    assert said in str(info.value), "the peer's own words are quoted"


async def _accept_as_an_older_version(self: Inbound) -> bool:
    endpoint = self._require()
    await endpoint.recv_stream_message()
    reply = wire.Reply(version=wire.VERSION - 1, rank=self._options.rank, accepted=True, tag_base=self._tag_base)
    await endpoint.stream_send(wire.stream_message(reply))
    return True


async def _close_at_the_hello(self: Inbound) -> bool:
    await self._require().recv_stream_message()
    self._close("an older listener cannot read this hello")
    return False


def test_an_acceptance_in_another_protocol_version_is_refused(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another version's answer may only refuse: accepting it would skip every proof.
    monkeypatch.setattr(Inbound, "_handshake", _accept_as_an_older_version)
    with local_sidecar(env, 28) as older, local_sidecar(env, 29, auth_token=TOKEN) as careful:
        older_version = rf"speaks protocol version {wire.VERSION - 1}, this sidecar {wire.VERSION}"
        with pytest.raises(PeerUnreachableError, match=older_version):
            careful.send({"secret": 1}, "downgraded", 28).result(WAIT)
        with pytest.raises(RecvTimeoutError):
            older.recv_sync("downgraded", timeout=0.3)


def test_a_listener_that_closes_at_the_hello_is_named_as_such(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sidecar of protocol version 2 cannot read a version 3 hello and closes the connection; the
    # connecting side tries once more (a peer restarting may do that) and then gives up, rather than
    # saying hello again for the whole connect timeout.
    monkeypatch.setattr(Inbound, "_handshake", _close_at_the_hello)
    with local_sidecar(env, 30), local_sidecar(env, 31, connect_timeout=20) as newer:
        start = time.monotonic()
        with pytest.raises(PeerUnreachableError) as info:
            newer.send(0, "unanswered", 30).result(WAIT)
        assert time.monotonic() - start < 5, "it gave up long before the connect timeout"
    assert "it closed the connection without answering the hello" in str(info.value)
    assert "run the same sidecar version on every rank (2 times)" in str(info.value)


def test_a_refusal_quotes_the_peers_words(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A refusal comes before any proof, so its text is the peer's, unchecked: quoted, never raw lines.
    monkeypatch.setattr(inbound_module, "_refusal", lambda given, expected: "token rotated!\nexport TOKEN=theirs")
    with (
        local_sidecar(env, 34, auth_token=TOKEN),
        local_sidecar(env, 35, auth_token=TOKEN) as careful,
        pytest.raises(AuthenticationError) as info,
    ):
        careful.send(0, "quoted", 34).result(WAIT)
    assert "refused this sidecar, saying 'token rotated!\\nexport TOKEN=theirs; set the same" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_listener_of_another_rank_is_told_nothing(
    env: dict[str, str], base_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connector checks the listener's rank before it proves anything: a sidecar at the wrong
    # address (or one relaying to another rank) gets no proof it could use there.
    parsed: list[str] = []
    parse = wire.parse_model

    def recording(cls: Any, body: bytes | bytearray, what: str) -> Any:
        parsed.append(what)
        return parse(cls, body, what)

    monkeypatch.setattr(wire, "parse_model", recording)
    peers = f'{{"3": "127.0.0.1:{base_port + 5}", "5": "127.0.0.1:{base_port + 5}"}}'
    mapped = {**env, "SIDECAR_IS_LOCAL": "0", "SIDECAR_PEERS": peers}
    with local_sidecar(mapped, 5, auth_token=TOKEN) as five, local_sidecar(mapped, 4, auth_token=TOKEN) as four:
        with pytest.raises(
            PeerUnreachableError, match=rf"127\.0\.0\.1:{base_port + 5} is served by rank 5, not rank 3"
        ):
            four.send(0, "misaddressed", 3).result(WAIT)
        assert "handshake response" not in parsed, "the connector proved the token to the wrong rank"
        four.send(1, "addressed", 5).result(WAIT)
        assert five.recv_sync("addressed", timeout=WAIT) == 1


def test_receiver_killed_mid_transfer_then_restarted(env: dict[str, str], sender: Sidecar) -> None:
    victim = PeerProcess(6, env)
    try:
        sender.send(1, "before-kill", 6).result(WAIT)
        assert victim.process.pid is not None
        stop_process(victim.process.pid)  # it stops reading mid-transfer
        pending = sender.send(random_bytes(32 * MiB, 6), "killed-mid-send", 6)
        time.sleep(0.3)
        assert not pending.done()
        killed = time.monotonic()
        victim.kill()
        with pytest.raises(
            PeerLostError, match=r"connection to rank 6 at 127\.0\.0\.1:\d+ broke before it acknowledged"
        ):
            pending.result(WAIT)
        assert time.monotonic() - killed < 5.0
        assert 6 not in transport(sender)._links
    finally:
        victim.close()
    with PeerProcess(6, env) as again:
        sender.send(2, "after-restart", 6).result(WAIT)  # over a new endpoint
        assert again.call(peer_recv_values, ["after-restart"]) == [2]


def peer_digest_if_any(sidecar: Sidecar, id: str, timeout: float) -> str | None:
    """The digest of ``id`` if it arrives within ``timeout`` (then released), else ``None``."""
    try:
        tensor = sidecar.recv_sync(id, timeout=timeout)
    except RecvTimeoutError:
        return None
    sidecar.mark_done_sync(id)
    return digest(tensor)


def test_a_send_that_timed_out_is_not_read_from_the_callers_memory_afterwards(env: dict[str, str]) -> None:
    # The fast path hands UCX the caller's tensor itself; once its send has timed out the caller may
    # reuse that memory, so the frame is given up (the link closes, cancelling what is in flight).
    with local_sidecar(env, 31, send_timeout=1.0) as sender, PeerProcess(32, env) as victim:
        sender.send(0, "reuse-hello", 32).result(WAIT)  # connected: the next send takes the fast path
        assert victim.call(peer_recv_values, ["reuse-hello"]) == [0]
        tensor = torch.full((4 * MiB,), 7, dtype=torch.uint8)
        sent = digest(tensor)
        assert victim.process.pid is not None
        stop_process(victim.process.pid)
        try:
            with pytest.raises(SendTimeoutError, match="SIDECAR_SEND_TIMEOUT=1s"):
                sender.send(torch.arange(4), "reuse-small", 32).result(WAIT)
            link = transport(sender)._links[32]
            assert not link.closed, "a payload that rode in its header message is not read again: the link stays"
            with pytest.raises(SendTimeoutError, match="SIDECAR_SEND_TIMEOUT=1s"):
                sender.send(tensor, "reuse", 32).result(WAIT)
            tensor.fill_(0xEE)  # the caller reuses its memory
            assert link.closed, "the payload was still submitted from the tensor: its link is closed"
        finally:
            os.kill(victim.process.pid, signal.SIGCONT)
        assert victim.call(peer_digest_if_any, "reuse", 3.0) in (None, sent)
        sender.send(1, "reuse-after", 32).result(WAIT)  # a new connection
        assert victim.call(peer_recv_values, ["reuse-after"]) == [1]


def test_a_sender_that_gives_a_connection_up_is_not_reported_lost(env: dict[str, str]) -> None:
    # A send that times out with its payload in flight closes the link, but the sender lives: the
    # receiver must not fail the receives that wait for that rank's next chunks.
    with local_sidecar(env, 36, send_timeout=1.0) as sender, local_sidecar(env, 37) as receiver:
        sender.send(torch.arange(3), "bye-stream", 37, chunk_id=0, stream=True).result(WAIT)
        assert receiver.recv_sync("bye-stream", 0, timeout=WAIT).tolist() == [0, 1, 2]
        outcome: dict[str, Any] = {}

        def wait_next() -> None:
            try:
                outcome["value"] = receiver.recv_sync("bye-stream", 1, timeout=WAIT)
            except BaseException as exc:
                outcome["error"] = exc

        waiter = threading.Thread(target=wait_next)
        waiter.start()
        stalled = threading.Event()

        def stall() -> None:  # nothing progresses the receiver's worker meanwhile: the payload stays in flight
            time.sleep(3.0)
            stalled.set()

        receiver._loop_thread.call_soon(stall)
        with pytest.raises(SendTimeoutError, match="SIDECAR_SEND_TIMEOUT=1s"):
            sender.send(torch.zeros(4 * MiB, dtype=torch.uint8), "bye-large", 37).result(WAIT)
        given_up = [inbound for inbound in transport(receiver)._inbound if inbound.rank == 36]
        assert stalled.wait(WAIT)
        # The receiver reads the large frame's header and the closed connection, and the sender
        # connects again at once; the verdict on rank 36 comes at the end of the grace.
        wait_until(lambda: all(inbound.closed for inbound in given_up), "the given-up connection closed", WAIT)
        time.sleep(RECONNECT_GRACE + 0.5)
        assert "error" not in outcome, f"the waiting receive failed: {outcome.get('error')!r}"
        sender.send(torch.arange(5), "bye-stream", 37, chunk_id=1, stream=True).result(WAIT)  # connects again
        waiter.join(WAIT)
    assert "error" not in outcome, f"the waiting receive failed: {outcome.get('error')!r}"
    assert outcome["value"].tolist() == [0, 1, 2, 3, 4]


def test_a_restarted_sender_does_not_rescue_the_receives_of_the_one_before(env: dict[str, str]) -> None:
    # The same rank connecting again within the grace keeps a receiver waiting only if it is the same
    # process: a restarted one does not know what the one before was sending.
    with local_sidecar(env, 39) as receiver:
        with local_sidecar(env, 38) as first:
            first.send(torch.arange(3), "restart-stream", 39, chunk_id=0, stream=True).result(WAIT)
        assert receiver.recv_sync("restart-stream", 0, timeout=WAIT).tolist() == [0, 1, 2]
        start = time.monotonic()
        with local_sidecar(env, 38) as second:  # rank 38 again, another incarnation, within the grace
            second.send(0, "fresh-stream", 39, chunk_id=0, stream=True).result(WAIT)
            with pytest.raises(PeerLostError, match="rank 38 was lost"):
                receiver.recv_sync("restart-stream", 1, timeout=WAIT)
            assert time.monotonic() - start < RECONNECT_GRACE + 3.0
            # The new process's own stream goes on, past the end of the old one's grace.
            assert receiver.recv_sync("fresh-stream", 0, timeout=WAIT) == 0
            later = concurrent.futures.ThreadPoolExecutor(1).submit(receiver.recv_sync, "fresh-stream", 1, WAIT)
            time.sleep(RECONNECT_GRACE + 0.5)
            second.send(1, "fresh-stream", 39, chunk_id=1, stream=True).result(WAIT)
            assert later.result(WAIT) == 1


def test_a_rank_away_for_less_than_the_grace_each_time_is_never_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    # One absence per rank, ended by the same process connecting again: breaks one after another
    # used to leave the first break's verdict running, which then reported the live rank lost.
    monkeypatch.setattr(inbound_module, "RECONNECT_GRACE", 0.2)
    said: list[tuple[str, int, object]] = []

    class Told:
        def parts_lost(self, rank: int, messages: set[int]) -> None:
            said.append(("parts_lost", rank, set(messages)))

        def peer_lost(self, rank: int, reason: str) -> None:
            said.append(("peer_lost", rank, reason))

    async def story() -> None:
        absences = Absences(cast(Any, Told()))
        absences.arrived(5, "one")
        absences.broke(5, "one", "reset", {1}, set())
        await asyncio.sleep(0.15)
        absences.arrived(5, "one")  # back in time: only its parts are lost
        absences.broke(5, "one", "reset again", {2}, set())
        await asyncio.sleep(0.1)  # 0.25 s after the first break
        absences.arrived(5, "one")
        await asyncio.sleep(0.3)
        absences.broke(5, "one", "gone", {3}, set())
        await asyncio.sleep(0.3)  # not back: lost
        absences.arrived(6, "old")
        absences.broke(6, "old", "reset", set(), set())
        absences.arrived(6, "new")  # restarted while away: lost as it comes
        absences.arrived(7, "old")
        absences.arrived(7, "new")  # restarted before its old connection broke: lost at once, once
        absences.arrived(7, "new")  # the new process connecting again (the old connection still open)
        absences.broke(7, "old", "stale", {4}, {"new"})  # the old process's connection ends
        absences.broke(7, "new", "reset", {5}, {"old"})  # a stale connection of the old one does not count
        await asyncio.sleep(0.3)
        absences.arrived(8, "one")
        absences.broke(8, "one", "reset", set(), set())
        absences.close()
        await asyncio.sleep(0.3)  # shutting down: no verdict

    asyncio.run(story())
    assert said == [
        ("parts_lost", 5, {1}),
        ("parts_lost", 5, {2}),
        ("peer_lost", 5, "gone"),
        ("peer_lost", 6, "reset; it came back as another process (restarted)"),
        ("peer_lost", 7, "it connected again as another process (restarted)"),
        ("parts_lost", 7, {4}),
        ("peer_lost", 7, "reset"),
    ]


def test_giving_up_one_send_leaves_another_sends_payload_alone(env: dict[str, str]) -> None:
    # A small send times out while a large one's payload is still on its way: only a frame whose own
    # payload UCX still reads from its caller's memory closes the link.
    with local_sidecar(env, 33, send_timeout=3.0) as sender, PeerProcess(34, env) as victim:
        sender.send(0, "alone-hello", 34).result(WAIT)
        assert victim.call(peer_recv_values, ["alone-hello"]) == [0]
        large = random_bytes(4 * MiB, 34)
        assert victim.process.pid is not None
        stop_process(victim.process.pid)
        try:
            small = sender.send(torch.arange(4), "alone-small", 34)
            time.sleep(1.0)
            pending = sender.send(large, "alone-large", 34)
            with pytest.raises(SendTimeoutError):
                small.result(WAIT)
            link = transport(sender)._links.get(34)
            assert link is not None, "the small frame's timeout closed the large one's link"
            assert not link.closed
        finally:
            os.kill(victim.process.pid, signal.SIGCONT)
        pending.result(WAIT)
        assert victim.call(peer_recv_digests, ["alone-large"]) == [digest(large)]


def test_sender_killed_mid_stream_fails_the_waiting_recv(env: dict[str, str], sender: Sidecar) -> None:
    with PeerProcess(7, env) as victim:
        victim.call(peer_send, random_bytes(1000, 1), "stream", 0, 0, True)
        assert digest(sender.recv_sync("stream", 0, timeout=WAIT)) == digest(random_bytes(1000, 1))
        outcome: dict[str, BaseException | float] = {}

        def wait_next() -> None:
            try:
                sender.recv_sync("stream", 1, timeout=WAIT)
            except BaseException as exc:
                outcome["error"], outcome["at"] = exc, time.monotonic()

        waiter = threading.Thread(target=wait_next)
        waiter.start()
        time.sleep(0.2)
        killed = time.monotonic()
        victim.kill()
        waiter.join(WAIT)
    error = outcome["error"]
    assert isinstance(error, PeerLostError), repr(error)
    assert "rank 7 was lost" in str(error)
    assert cast(float, outcome["at"]) - killed < 5.0


# -- progress modes, several sidecars in one process ---------------------------------------------


@pytest.mark.parametrize("mode", ["thread", "thread-polling", "blocking", "polling"])
def test_every_progress_mode_moves_data(env: dict[str, str], mode: str) -> None:
    mode_env = {**env, "SIDECAR_UCX__PROGRESS_MODE": mode}
    with local_sidecar(mode_env, 40) as a, local_sidecar(mode_env, 41) as b:
        assert transport(a).options.progress_mode == mode
        data = random_bytes(3 * MiB, 40)
        a.send(data, "mode", 41).result(WAIT)
        b.send({"mode": mode}, "mode-back", 40).result(WAIT)
        assert digest(b.recv_sync("mode", timeout=WAIT)) == digest(data)
        assert a.recv_sync("mode-back", timeout=WAIT) == {"mode": mode}


@pytest.mark.parametrize(("given", "expected"), [(None, "y"), ("n", "n")])
def test_the_worker_lock_is_a_mutex_unless_the_environment_says_otherwise(
    env: dict[str, str], given: str | None, expected: str
) -> None:
    # Callers' threads submit while the loop progresses: a spinning waiter can burn a time slice.
    lock_env = {**env, "UCX_USE_MT_MUTEX": given} if given else env
    with local_sidecar(lock_env, 42, remove=() if given else ("UCX_USE_MT_MUTEX",)) as a:
        assert transport(a)._worker._context.config["USE_MT_MUTEX"] == expected


_LATE_PEER = """
import os, time
from sidecar_core import Sidecar, SidecarConfig
given = os.environ.get("UCXX_LOG_LEVEL")
early = Sidecar(SidecarConfig(sidecar_rank=0))
assert os.environ.get("UCXX_LOG_LEVEL") == given, "the transport left UCXX_LOG_LEVEL changed"
sent = early.send(7, "late", 1)
time.sleep(0.5)  # nothing listens for rank 1 yet: the first connection attempts are refused
late = Sidecar(SidecarConfig(sidecar_rank=1))
sent.result(20)
assert late.recv_sync("late", timeout=20) == 7
early.shutdown_sync()
late.shutdown_sync()
"""


@pytest.mark.parametrize("given", [None, "ERROR"])
def test_refused_attempts_while_a_peer_starts_print_nothing_unless_asked(
    env: dict[str, str], given: str | None
) -> None:
    # ucxx logs an ERROR line per failed endpoint; the transport retries and reports failures itself.
    run_env = {k: v for k, v in os.environ.items() if k != "UCXX_LOG_LEVEL"}
    run_env.update(env, SIDECAR_BASE_PORT=str(free_base_port()))
    if given:
        run_env["UCXX_LOG_LEVEL"] = given
    done = subprocess.run(
        [sys.executable, "-c", _LATE_PEER], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr  # UCX's logs go to stdout
    refusals = [line for line in output.splitlines() if "UCXX ERROR" in line]
    if given:
        assert refusals, f"UCXX_LOG_LEVEL={given} printed no refused attempt; output: {output}"
    else:
        assert not refusals, f"ucxx printed errors for refused attempts: {refusals}"


def test_a_forked_child_does_not_keep_its_dead_parents_port(env: dict[str, str]) -> None:
    # The child inherits copies of UCX's sockets; the transport blanks out the ones on the rank's
    # port at the fork, so that once the parent dies a new sidecar of its rank can listen there.
    run_env = {**os.environ, **env, "SIDECAR_BASE_PORT": str(free_base_port())}
    with (
        local_sidecar(run_env, 3) as other,
        forking_owner([sys.executable, "-c", owner_script(2, 3)], run_env, REPO, WAIT) as kill_owner,
    ):
        assert other.recv_sync("owner-hello", timeout=WAIT) == "hi"
        kill_owner()
        with local_sidecar(run_env, 2) as again:  # the dead owner's port is free again
            other.send("new", "to-new-owner", 2).result(WAIT)
            assert again.recv_sync("to-new-owner", timeout=WAIT) == "new"


def test_explicit_peer_map(env: dict[str, str], base_port: int) -> None:
    peers = f'{{"50": "127.0.0.1:{base_port + 30}", "51": "localhost:{base_port + 31}"}}'
    mapped = {**env, "SIDECAR_IS_LOCAL": "0", "SIDECAR_PEERS": peers}
    with local_sidecar(mapped, 50) as a, local_sidecar(mapped, 51) as b:
        assert transport(a).describe_peer(51) == f"rank 51 at localhost:{base_port + 31}"
        a.send([1, 2, 3], "mapped", 51).result(WAIT)
        assert b.recv_sync("mapped", timeout=WAIT) == [1, 2, 3]


def test_connection_tags_are_random(sender: Sidecar, peer: PeerProcess) -> None:
    # UCX matches tags across all of a worker's connections, those not yet authenticated included:
    # tags that count up from 4 could be aimed at by a connection that never presented the token.
    bases = [UcxTransport._tag_base() for _ in range(1000)]
    assert len(set(bases)) == len(bases)
    assert all(base % wire.TAG_KINDS == 0 and 0 <= base < 2**64 for base in bases)
    assert sum(base >= 2**40 for base in bases) > 990, "spread over the whole range"
    sender.send(0, "tagged", 1).result(WAIT)
    link = transport(sender)._links[1]
    assert link._header_tag >= 2**20, "a live connection's tags are drawn the same way"
    assert peer.call(peer_recv_values, ["tagged"]) == [0]


def test_host_pool_reuses_released_blocks_up_to_its_limit() -> None:
    from transports.ucx._pool import HostPool, size_class

    assert size_class(64 * MiB) == 64 * MiB
    assert size_class(64 * MiB + 1) == 72 * MiB  # 1/8 steps: at most 12.5% slack
    pool = HostPool(100 * MiB)
    _, block = pool.take(1000)
    assert block is None  # small frames come from the ordinary allocator
    first, block = pool.take(64 * MiB)
    assert block is not None
    assert first.numel() == 64 * MiB
    pool.give(block)
    again, reused = pool.take(60 * MiB + 5)  # same size class: the released block comes back
    assert reused is block
    assert again.data_ptr() == first.data_ptr()
    pool.give(reused)
    _, other = pool.take(64 * MiB)
    _, extra = pool.take(64 * MiB)
    assert other is not None
    assert extra is not None
    pool.give(other)
    pool.give(extra)  # over the 100 MiB limit: freed, not kept
    assert pool.idle_bytes == 64 * MiB


@pytest.mark.parametrize("text", ["é" * wire.MAX_PROBLEM, "\x01" * wire.MAX_PROBLEM, "plain"])
def test_a_refusal_always_fits_the_senders_ack_buffer(text: str) -> None:
    # The text is cut by characters, but escapes and multi-byte characters make its JSON longer: a
    # refusal quoting a peer's long non-ASCII string came truncated and broke the link.
    problem = wire.problem_of(ValueError(text))
    message = wire.ack_message(7, problem)
    assert len(message) <= wire.ACK_MESSAGE_BYTES
    seq, parsed, closing = wire.parse_ack(memoryview(message))
    assert (seq, closing) == (7, False)
    assert parsed is not None
    assert parsed.error == "ValueError"
    assert text.startswith(parsed.message)


def _run_script(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    """Run a benchmark script from the checkout; past ``timeout``, kill it and every process it started."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: its workers are killed with it
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{args[0]} ran past {timeout:g}s; its stderr ends: {err[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_the_step_timer_stamps_every_step_of_a_transfer() -> None:
    # benchmarks/ucx_steps.py wraps the transport's send and receive paths: it must still find
    # every step, over raw ucxx and over the transport.
    done = _run_script("benchmarks/ucx_steps.py", "cpu", str(64 << 10), "10")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    raw, ucx, ratio = lines[:6], lines[6:-1], lines[-1]
    assert raw[0] == "raw ucxx on cpu, 65536 bytes, p50 of 8 transfers:"
    assert [line.split(" us  ", 1)[1] for line in raw[1:-1]] == [
        "the tensor arrived: recv() returned",
        "first and last byte checked",
        "send() of the int returned",
        "rank 0's recv() of the int returned",
    ]
    assert ucx[0] == "ucx on cpu, 65536 bytes, p50 of 8 transfers:"
    assert [line.split(" us  ", 1)[1] for line in ucx[1:-1]] == [
        "the header and the payload are submitted",
        "send() returned",
        "rank 1's loop takes the header",
        "the payload's receive is posted",
        "the payload arrived: the store takes it",
        "recv_sync() returned",
        "first and last byte checked",
        "mark_done() returned",
        "send() of the int returned",
        "rank 0's loop takes the int's header",
        "the store takes the int",
        "recv_sync() returned",
        "mark_done() and the tensor's result() returned",
    ]
    totals = []
    for table in (raw, ucx):
        total, what = table[-1].split(" us  ", 1)
        assert what.startswith("in all (")
        totals.append(float(total))
    assert min(totals) > 0
    assert ratio.startswith("ucx/raw ucxx: ")
    assert ratio.endswith("x")
    # Printed from the unrounded totals: agrees with the printed ones to within their rounding.
    assert abs(float(ratio[len("ucx/raw ucxx: ") : -1]) - totals[0] / totals[1]) <= 0.01


def test_window_benchmark_checks_every_transfer_of_both_sides() -> None:
    # benchmarks/ucx_window.py checks the first and last byte of every transfer on the receiving side,
    # and the sender checks that the receiver saw them all: a clean exit means both moved the data.
    done = _run_script("benchmarks/ucx_window.py", "cpu", str(64 << 10), "6", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "65536 bytes on cpu, 6 transfers timed, up to 3 in flight"
    assert [line.split()[0] for line in lines[1:]] == ["raw", "ucx"] * 2
    for raw, ucx in zip(lines[1::2], lines[2::2], strict=True):
        raw_us, ucx_us = float(raw.split()[4]), float(ucx.split()[3])
        # The ratio comes from the unrounded times: it agrees with the printed ones to within rounding.
        assert abs(float(ucx.rsplit(" ", 1)[1].rstrip("x")) - raw_us / ucx_us) <= 0.02


def test_ucxx_receive_paths_benchmark_moves_and_checks_every_way() -> None:
    # benchmarks/ucxx_receive_paths.py checks the first and last byte of every transfer, and the size
    # and header of what ucxx allocated: a clean exit means all four ways moved the data.
    done = _run_script("benchmarks/ucxx_receive_paths.py", str(64 << 10), "5", "cpu")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "65536 bytes on cpu, p50 of 4 round trips per turn"
    assert [line.split()[0] for line in lines[1:]] == ["tag", "header", "multi", "am"] * 2
