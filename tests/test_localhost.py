"""Behaviour specific to the localhost transport, with real peer processes.

Generic round trips (every serializer, streams, broadcast, duplicate chunks, ...) are covered by the
conformance suite (``tests/test_conformance.py``); this module covers what only localhost does:
its socket directory and files, auth handshake, malformed control-socket input, shared memory
(zero-copy views, the bounded pool, cleanup after SIGKILL) and connection loss.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import gc
import hashlib
import mmap
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from _checkout import REPO, checkout_env
from _forking import forking_owner, owner_script
from _waiting import stop_process, wait_until

import transports.localhost._copy as copy_module
from sidecar_core import (
    AuthenticationError,
    CapacityError,
    PeerLostError,
    PeerUnreachableError,
    PluginError,
    RecvTimeoutError,
    RemoteError,
    SendTimeoutError,
    SettingsError,
    Sidecar,
    SidecarClosedError,
    SidecarConfig,
    build_registry,
    hookimpl,
    load_settings,
)
from sidecar_core._frame import MAX_HEADER_BYTES, PREFIX
from sidecar_core.testing import Deployment, PeerProcess, environment, ids_sent_on_the_loop, local_sidecar
from transports.localhost import LocalhostSettings, LocalhostTransport
from transports.localhost._channel import Channel
from transports.localhost._incoming import Incoming
from transports.localhost._link import Link
from transports.localhost._protocol import (
    ENVELOPE,
    MAX_BODY,
    SENDER_MESSAGES,
    SHM_PREFIX,
    U32,
    VERSION,
    Hello,
    Msg,
    Problem,
    Welcome,
    envelope,
)
from transports.localhost._readers import Readers
from transports.localhost._shm import PeerPool, Pool, host_bytes

pytestmark = [pytest.mark.multiprocess, pytest.mark.transport("localhost")]

TOKEN = "localhost-test-token"
WAIT = 20.0
MiB = 1 << 20

# -- helpers run in peer processes ---------------------------------------------------------------

#: Tensors a peer keeps referencing after recv (to show what a view sees after mark_done).
_KEPT: dict[str, torch.Tensor] = {}


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _memfd_ranges() -> list[tuple[int, int, int]]:
    """(start, end, inode) of this process's mappings of sidecar pools."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "memfd:sidecar-pool" in line:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end, int(fields[4])))
    return ranges


def peer_recv_digest(sidecar: Sidecar, id: str, keep: bool = False) -> dict[str, Any]:
    """Receive a tensor; its digest, whether it is a view of a peer's pool; keep or release it."""
    tensor = sidecar.recv_sync(id, timeout=WAIT)
    pointer = tensor.data_ptr()
    in_pool = any(start <= pointer < end for start, end, _ in _memfd_ranges())
    result = {"digest": _digest(tensor), "in_pool": in_pool, "device": str(tensor.device)}
    if keep:
        _KEPT[id] = tensor
    else:
        sidecar.mark_done_sync(id)
    return result


def peer_kept_digest(sidecar: Sidecar, id: str) -> str:
    return _digest(_KEPT[id])


def peer_mark_done(sidecar: Sidecar, *ids: str) -> None:
    for id in ids:
        sidecar.mark_done_sync(id)


def peer_recv_values(sidecar: Sidecar, ids: list[str]) -> list[Any]:
    values = []
    for id in ids:
        values.append(sidecar.recv_sync(id, timeout=WAIT))
        sidecar.mark_done_sync(id)
    return values


def peer_recv_digests(sidecar: Sidecar, id_lists: list[list[str]]) -> dict[str, str]:
    """One thread per list receives its ids in turn, releasing each at once; their digests."""

    def receive(ids: list[str]) -> dict[str, str]:
        digests = {}
        for id in ids:
            digests[id] = _digest(sidecar.recv_sync(id, timeout=WAIT))
            sidecar.mark_done_sync(id)
        return digests

    with concurrent.futures.ThreadPoolExecutor(len(id_lists)) as threads:
        return {id: digest for part in threads.map(receive, id_lists) for id, digest in part.items()}


def peer_holds(sidecar: Sidecar, id: str) -> bool:
    """Whether ``id`` arrives within a moment (it is released if it does)."""
    try:
        sidecar.recv_sync(id, timeout=0.5)
    except RecvTimeoutError:
        return False
    sidecar.mark_done_sync(id)
    return True


def peer_send(sidecar: Sidecar, obj: Any, id: str, dst: int, chunk_id: int = 0, stream: bool = False) -> None:
    sidecar.send(obj, id, dst, chunk_id=chunk_id, stream=stream).result(WAIT)


def peer_send_random(sidecar: Sidecar, nbytes: int, seed: int, id: str, dst: int) -> None:
    """Send random bytes made here (tensors passed through the harness pipe would use /dev/shm)."""
    sidecar.send(random_bytes(nbytes, seed), id, dst).result(WAIT)


def peer_echo(sidecar: Sidecar, count: int, dst: int) -> None:
    """Send ``in-<dst>-i`` straight back as ``out-<dst>-i``, for i below ``count``."""
    for i in range(count):
        value = sidecar.recv_sync(f"in-{dst}-{i}", timeout=WAIT)
        sidecar.mark_done_sync(f"in-{dst}-{i}")
        sidecar.send(value, f"out-{dst}-{i}", dst).result(WAIT)


def peer_pool_inode(sidecar: Sidecar) -> int:
    """The inode of this process's own pool (the one its fd points to)."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:sidecar-pool"):
                return os.stat(f"/proc/self/fd/{fd}").st_ino
    raise AssertionError("no pool descriptor")


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def socket_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lh") / "localhost"


@pytest.fixture(scope="module")
def env(socket_dir: Path) -> dict[str, str]:
    return {
        **LocalhostTransport.test_environment(socket_dir.parent),
        "SIDECAR_TRANSPORT": "localhost",
        "SIDECAR_AUTH_TOKEN": TOKEN,
        "SIDECAR_CONNECT_TIMEOUT": "1",
        "SIDECAR_SEND_TIMEOUT": "10",
        "SIDECAR_RECV_TIMEOUT": "10",
        "SIDECAR_LOCALHOST__SHM_THRESHOLD": "4096",
    }


@pytest.fixture(scope="module")
def peer(env: dict[str, str]) -> Iterator[PeerProcess]:
    with PeerProcess(1, env) as process:
        yield process


@pytest.fixture(scope="module")
def peer2(env: dict[str, str]) -> Iterator[PeerProcess]:
    with PeerProcess(2, env) as process:
        yield process


@pytest.fixture(scope="module")
def sender(env: dict[str, str]) -> Iterator[Sidecar]:
    with local_sidecar(env, 0) as sidecar:
        yield sidecar


def transport(sidecar: Sidecar) -> LocalhostTransport:
    return cast(LocalhostTransport, sidecar._transport)


def random_bytes(nbytes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# -- files, settings, ranks ----------------------------------------------------------------------


def test_shutting_down_while_a_connection_is_being_made_closes_it(env: dict[str, str], socket_dir: Path) -> None:
    # A listener that accepts but never answers the handshake keeps the connection attempt waiting.
    with local_sidecar({**env, "SIDECAR_CONNECT_TIMEOUT": "30"}, 40) as sidecar:
        path = socket_dir / "rank-41.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.fspath(path))
        listener.listen()
        listener.settimeout(WAIT)
        future = sidecar.send("x", "never-answered", [[41]])
        attempt, _ = listener.accept()
    try:
        attempt.settimeout(WAIT)
        while attempt.recv(65536):  # the HELLO, then the end of the connection
            pass
        with pytest.raises(SidecarClosedError, match="sidecar rank 40 was shut down before it finished"):
            future.result(WAIT)  # a send still connecting when its sidecar shuts down fails, and says why
    finally:
        attempt.close()
        listener.close()
        path.unlink()


def test_a_send_that_races_the_shutdown_makes_no_connection(env: dict[str, str]) -> None:
    # A send that passed the sidecar's checks as it started shutting down reaches the transport's
    # loop after its close: it must not connect (nothing would ever close that connection).
    with local_sidecar(env, 64) as late, local_sidecar(env, 65) as other:
        own = transport(late)
        late._loop_thread.call(own.close())
        with pytest.raises(SidecarClosedError, match="rank 64 is shutting down: no new connection to rank 65"):
            late._loop_thread.call(own._link(65))
        time.sleep(0.2)
        assert not [i for i in transport(other)._incoming if i.rank == 64], "a connection was made after close"


def test_a_test_deployment_keeps_the_peer_map_its_transport_gives_and_drops_the_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user's SIDECAR_PEERS would send a private deployment's ranks to real addresses; a peer map
    # that the transport's own test environment sets is the deployment's, in every sidecar it makes.
    peers = '{"5": "127.0.0.1:1"}'
    monkeypatch.setenv("SIDECAR_PEERS", '{"5": "10.0.0.6:19000"}')
    own = LocalhostTransport.test_environment

    def with_peers(cls: type[LocalhostTransport], workdir: Path) -> dict[str, str]:
        return {**own(workdir), "SIDECAR_PEERS": peers}

    monkeypatch.setattr(LocalhostTransport, "test_environment", classmethod(with_peers))
    deployment = Deployment("localhost", tmp_path)
    try:
        assert deployment.sidecar.settings.peers == {5: "127.0.0.1:1"}
        with deployment.local(5) as local:
            assert local.settings.peers == {5: "127.0.0.1:1"}
    finally:
        deployment.close()
    monkeypatch.setattr(LocalhostTransport, "test_environment", own)
    deployment = Deployment("localhost", tmp_path / "second")
    try:
        assert deployment.sidecar.settings.peers is None, "the user's peer map reached a private deployment"
    finally:
        deployment.close()


def test_a_pool_that_cannot_be_mapped_names_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    pool = Pool(1 << 20)
    with pytest.raises(CapacityError, match=r"Cannot allocate memory.*lower SIDECAR_LOCALHOST__POOL_BYTES"):
        pool.region  # noqa: B018 - mapped on first use


def test_empty_localhost_settings_are_unset_and_a_huge_pool_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_LOCALHOST__SOCKET_DIR", "")  # not the working directory
    assert load_settings(LocalhostSettings).socket_dir is None
    monkeypatch.setenv("SIDECAR_LOCALHOST__POOL_BYTES", "9" * 20)
    with pytest.raises(SettingsError, match=r"SIDECAR_LOCALHOST__POOL_BYTES=.*less than or equal to 1099511627776"):
        load_settings(LocalhostSettings)


def test_a_peers_pool_is_read_in_only_where_its_slots_are() -> None:
    # Reading in a hole of a sparse memfd allocates it: a peer announcing a huge pool and using a
    # slot near its end must not make this process read in the whole pool.
    size, span = 64 * MiB, 2 * MiB
    fd = os.memfd_create("sparse-pool", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    watch = os.dup(fd)
    try:
        peer_pool = PeerPool(fd, size)
        view = peer_pool.slot(size - span, span)
        assert len(view) == span
        assert (view[0], view[-1]) == (0, 0)
        allocated = os.fstat(watch).st_blocks * 512
        assert allocated <= 2 * span, f"{allocated} bytes of the pool were allocated for a {span}-byte slot"
        view.release()
        peer_pool.close()
    finally:
        os.close(watch)


def test_socket_dir_and_files_are_private(sender: Sidecar, peer: PeerProcess, socket_dir: Path) -> None:
    sender.send(random_bytes(MiB, 1), "modes", 1).result(WAIT)
    assert peer.call(peer_recv_digest, "modes")["in_pool"]
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    sock = socket_dir / "rank-1.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE((socket_dir / "rank-1.lock").stat().st_mode) == 0o600
    pools = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:sidecar-pool"):
                pools.append(stat.S_IMODE(os.stat(f"/proc/self/fd/{fd}").st_mode))
    # The pool's descriptor and the one its mapping keeps: both private.
    assert pools, "no pool descriptor is open"
    assert set(pools) == {0o600}, f"the pool must be a memfd of mode 0600, found modes {pools}"


def test_open_socket_dir_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    refused = pytest.raises(SettingsError, match=r"SIDECAR_LOCALHOST__SOCKET_DIR=.*open to other users.*chmod 700")
    with refused, local_sidecar({**env, "SIDECAR_LOCALHOST__SOCKET_DIR": str(open_dir)}, 30):
        pass


OTHER_UID = 65534  # nobody


def _as_another_user() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root, to act as another user (uid 65534)")


@pytest.mark.host_capability
def test_another_users_symlink_as_socket_dir_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    # Its owner could point it at their own directory between two connects.
    _as_another_user()
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    planted = tmp_path / "planted"
    planted.symlink_to(mine)
    os.lchown(planted, OTHER_UID, OTHER_UID)
    refused = pytest.raises(SettingsError, match=rf"is a symbolic link of uid {OTHER_UID}, not of this user")
    with refused, local_sidecar({**env, "SIDECAR_LOCALHOST__SOCKET_DIR": str(planted)}, 32):
        pass
    own = tmp_path / "own-link"
    own.symlink_to(mine)
    with local_sidecar({**env, "SIDECAR_LOCALHOST__SOCKET_DIR": str(own)}, 32) as sidecar:
        assert sidecar.transport_name == "localhost"


@pytest.mark.host_capability
def test_a_socket_served_by_another_user_is_told_nothing(env: dict[str, str], tmp_path: Path) -> None:
    # A socket that another user's process serves (moved into a private directory here) gets no
    # HELLO: it would carry the auth token, and the pool after it.
    _as_another_user()
    shared = Path(tempfile.mkdtemp(prefix="sidecar-test-shared-"))  # the test's own folder is closed to others
    shared.chmod(0o777)
    listener = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, socket, sys; os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2])); "
            "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); print('ready', flush=True); "
            "c, _ = s.accept(); print(repr(c.recv(65536)), flush=True)",
            str(shared / "rank-5.sock"),
            str(OTHER_UID),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        (shared / "rank-5.sock").rename(private / "rank-5.sock")
        with (
            local_sidecar({**env, "SIDECAR_LOCALHOST__SOCKET_DIR": str(private)}, 33) as sidecar,
            pytest.raises(AuthenticationError, match=rf"served by a process of uid {OTHER_UID}, not of this user"),
        ):
            sidecar.send(1, "secret", 5).result(WAIT)
        heard, _ = listener.communicate(timeout=WAIT)
        assert heard.strip() == "b''", "it accepted the connection and heard nothing"
    finally:
        listener.kill()
        listener.wait()
        shutil.rmtree(shared, ignore_errors=True)


def test_bad_setting_names_the_variable(env: dict[str, str]) -> None:
    with (
        pytest.raises(SettingsError, match="SIDECAR_LOCALHOST__POOL_BYTES"),
        local_sidecar({**env, "SIDECAR_LOCALHOST__POOL_BYTES": "12"}, 31),
    ):
        pass


def test_second_live_sidecar_on_a_rank_is_refused(env: dict[str, str], peer: PeerProcess, socket_dir: Path) -> None:
    with pytest.raises(PeerUnreachableError) as info, local_sidecar(env, 1):
        pass
    message = str(info.value)
    assert "rank 1 is already served" in message
    assert str(socket_dir / "rank-1.sock") in message
    assert peer.call(peer_recv_values, []) == []  # the first one is unharmed


def test_unreachable_rank_names_rank_and_path(sender: Sidecar, socket_dir: Path) -> None:
    start = time.monotonic()
    with pytest.raises(PeerUnreachableError) as info:
        sender.send(5, "nobody", 9).result(WAIT)
    elapsed = time.monotonic() - start
    assert "rank 9" in str(info.value)
    assert str(socket_dir / "rank-9.sock") in str(info.value)
    assert "SIDECAR_CONNECT_TIMEOUT" in str(info.value)
    assert elapsed < 1.0 + 4.0, f"gave up after {elapsed:.2f}s, SIDECAR_CONNECT_TIMEOUT is 1s"


# -- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("token", "presented"), [(None, "no auth token"), ("wrong-token", "a wrong auth token")])
def test_auth_token_refused(env: dict[str, str], peer: PeerProcess, token: str | None, presented: str) -> None:
    settings = {"auth_token": token} if token else {}
    with (
        local_sidecar(env, 20, remove=("SIDECAR_AUTH_TOKEN",), **settings) as intruder,
        pytest.raises(AuthenticationError) as info,
    ):
        intruder.send(1, "intruder", 1).result(WAIT)
    assert "rank 1" in str(info.value)
    assert presented in str(info.value)
    assert "SIDECAR_AUTH_TOKEN" in str(info.value)
    with local_sidecar(env, 21) as friend:  # the listener keeps serving
        friend.send({"ok": True}, f"friend-{token}", 1).result(WAIT)
    assert peer.call(peer_recv_values, [f"friend-{token}"]) == [{"ok": True}]


# -- malformed input on the control socket -------------------------------------------------------


def _hello() -> bytes:
    body = Hello(version=VERSION, rank=40, pid=os.getpid(), token=TOKEN).model_dump_json().encode()
    return envelope(Msg.HELLO, len(body)) + body


def _frame_message(frame: bytes, declared: int | None = None) -> bytes:
    return envelope(Msg.FRAME, len(frame) if declared is None else declared, 1) + frame


def _header(**fields: Any) -> bytes:
    import json

    body = json.dumps({"kind": "data", "id": "raw", "src": 40, **fields}).encode()
    return PREFIX.pack(b"SCF1", len(body)) + body


MALFORMED = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: sidecar\r\n\r\n", "bad message magic"),
    "oversized-message": (envelope(Msg.HELLO, MAX_BODY + 1), "exceeds the"),
    "frame-before-hello": (_frame_message(_header(layout=[1], sizes=[1]) + b"x"), "expected HELLO"),
    "bad-frame-magic": (_hello() + _frame_message(PREFIX.pack(b"XXXX", 2) + b"{}"), "bad frame magic"),
    "oversized-header": (
        _hello() + _frame_message(PREFIX.pack(b"SCF1", MAX_HEADER_BYTES + 1)),
        f"exceeds the {MAX_HEADER_BYTES}-byte limit",
    ),
    "header-not-json": (_hello() + _frame_message(PREFIX.pack(b"SCF1", 9) + b"{not json"), "malformed frame header"),
    "buffer-count-mismatch": (
        _hello() + _frame_message(_header(layout=[16], sizes=[16]) + b"12345678"),
        "lists 1 buffers of 16 bytes in all, but 8 bytes follow",
    ),
    "shm-frame-without-pool": (
        _hello()
        + envelope(Msg.SHM_FRAME, 16 + len(_header(layout=[8], sizes=[8])), 1)
        + bytes(16)
        + _header(layout=[8], sizes=[8]),
        "before the peer shared its pool",
    ),
    "truncated": (
        _hello() + _frame_message(_header(layout=[64], sizes=[64]) + b"only-part", declared=200),
        "truncated message",
    ),
    # The peer's WELCOME offered no CUDA IPC (it receives on the CPU): before, torch's CUDA check
    # failed deep inside, logged as an internal error.
    "ipc-frame-not-offered": (
        _hello()
        + envelope(Msg.IPC_FRAME, U32.size + 14 + len(_header(layout=[], sizes=[])), 1)
        + U32.pack(14)
        + b'{"buffers":[]}'
        + _header(layout=[], sizes=[]),
        "did not offer CUDA IPC",
    ),
}


@pytest.fixture(scope="module")
def held_before_malformed(sender: Sidecar, peer: PeerProcess) -> str:
    sender.send(random_bytes(2 * MiB, 7), "held-before-malformed", 1).result(WAIT)
    return "held-before-malformed"


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_is_rejected_and_the_peer_keeps_serving(
    case: str, socket_dir: Path, sender: Sidecar, peer: PeerProcess, held_before_malformed: str
) -> None:
    data, expected = MALFORMED[case]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(WAIT)
        raw.connect(str(socket_dir / "rank-1.sock"))
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)  # a truncated message ends here
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := raw.recv(65536):
                reply += chunk
    messages = []
    while len(reply) >= ENVELOPE.size:
        _, kind, length, _ = ENVELOPE.unpack_from(reply)
        messages.append((Msg(kind), reply[ENVELOPE.size : ENVELOPE.size + length]))
        reply = reply[ENVELOPE.size + length :]
    errors = [Problem.model_validate_json(body) for kind, body in messages if kind is Msg.ERROR]
    assert errors, f"{case}: no ERROR came back, got {[kind.name for kind, _ in messages]}"
    assert expected in errors[0].message, f"{case}: unclear error {errors[0].message!r}"
    # Everything received before is kept; the listener serves the next peer.
    assert peer.call(peer_recv_digest, held_before_malformed, True)["digest"] == _digest(random_bytes(2 * MiB, 7))
    sender.send(case, f"after-{case}", 1).result(WAIT)
    assert peer.call(peer_recv_values, [f"after-{case}"]) == [case]


def test_a_malformed_pool_message_does_not_leak_its_descriptor(env: dict[str, str], socket_dir: Path) -> None:
    # The descriptor was taken from the connection before the body was checked, and then kept by
    # nobody: each such message leaked a descriptor and the memory behind it.
    def passed_open() -> bool:
        return any(
            os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:malformed-pool")
            for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")
        )

    with local_sidecar(env, 41):
        pool = os.memfd_create("malformed-pool", os.MFD_ALLOW_SEALING)
        os.ftruncate(pool, MiB)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(WAIT)
            raw.connect(str(socket_dir / "rank-41.sock"))
            raw.sendall(_hello())
            fds = array.array("i", [pool])
            raw.sendmsg([envelope(Msg.POOL, 4) + bytes(4)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            reply = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := raw.recv(65536):
                    reply += chunk
        os.close(pool)
        assert b"POOL message body must be 8 bytes, got 4" in reply
        wait_until(lambda: not passed_open(), "the passed descriptor is closed")


def test_a_shared_memory_frame_over_the_bound_is_refused_without_reading_its_slot(
    env: dict[str, str], socket_dir: Path
) -> None:
    # Reading a slot commits its pages, and a peer's pool may be sparse: a 200-byte message made the
    # receiver commit the whole slot before the store refused it.
    with local_sidecar(env, 42, max_buffered_bytes=MiB):
        pool = os.memfd_create("sparse-pool", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(pool, 64 * MiB)
            fcntl.fcntl(pool, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            header = _header(layout=[32 * MiB], sizes=[32 * MiB])
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.settimeout(WAIT)
                raw.connect(str(socket_dir / "rank-42.sock"))
                raw.sendall(_hello())
                raw.sendmsg(
                    [envelope(Msg.POOL, 8) + (64 * MiB).to_bytes(8, "little")],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pool]))],
                )
                body = SHM_PREFIX.pack(0, 32 * MiB) + header
                raw.sendall(envelope(Msg.SHM_FRAME, len(body), 1) + body)
                messages: list[tuple[Msg, int, bytes]] = []
                reply = b""
                while not any(kind is Msg.RELEASE for kind, _, _ in messages):
                    chunk = raw.recv(65536)
                    assert chunk, f"the connection closed; got {[kind.name for kind, _, _ in messages]}"
                    reply += chunk
                    while len(reply) >= ENVELOPE.size:
                        _, kind, length, arg = ENVELOPE.unpack_from(reply)
                        if len(reply) < ENVELOPE.size + length:
                            break
                        messages.append((Msg(kind), arg, reply[ENVELOPE.size : ENVELOPE.size + length]))
                        reply = reply[ENVELOPE.size + length :]
            assert os.fstat(pool).st_blocks == 0, "the slot's pages were read in"
        finally:
            os.close(pool)
    [refusal] = [Problem.model_validate_json(body) for kind, seq, body in messages if kind is Msg.NACK and seq == 1]
    assert refusal.error == "CapacityError"
    assert f"{32 * MiB} bytes exceed SIDECAR_MAX_BUFFERED_BYTES={MiB}" in refusal.message


def test_a_shared_memory_frame_within_the_bound_is_taken_whatever_its_slot_padding(env: dict[str, str]) -> None:
    # The early refusal compares the payload with the bound, as the store does, not the slot (which
    # pads every buffer): three buffers of 100,001 bytes fit a bound of 300,023.
    shm_env = {**env, "SIDECAR_LOCALHOST__SHM_THRESHOLD": "4096"}
    buffers = [torch.full((100_001,), i, dtype=torch.uint8) for i in range(3)]
    with local_sidecar(shm_env, 43, max_buffered_bytes=300_023) as receiver, local_sidecar(shm_env, 44) as sender:
        sender.send(buffers, "padded", 43).result(WAIT)
        got = receiver.recv_sync("padded", timeout=WAIT)
        assert [bytes(t.numpy()) for t in got] == [bytes(t.numpy()) for t in buffers]


# -- shared memory -------------------------------------------------------------------------------


def test_large_tensor_arrives_exactly_as_a_zero_copy_view(sender: Sidecar, peer: PeerProcess) -> None:
    tensor = random_bytes(64 * MiB, 2).view(torch.float32).reshape(4096, -1)
    call = peer.submit(peer_recv_digest, "large")
    sender.send(tensor, "large", 1).result(WAIT)
    got = call.result(WAIT)
    assert got["digest"] == _digest(tensor)
    assert got["in_pool"], "the received tensor must be a view of the sender's shared-memory pool"


async def _break_link(link: Link) -> None:
    link.channel.close("the connection broke")


def test_a_message_in_parts_is_not_continued_over_a_new_connection(env: dict[str, str], sender: Sidecar) -> None:
    # Continued over a new connection, the message's later parts would be acknowledged while the
    # receiver drops the parts that came over the broken one: a send reported done for a message the
    # receiver never completes.
    lh = transport(sender)
    data = random_bytes(4 * MiB, 16)
    with local_sidecar(env, 13) as receiver:
        first, second = sender.codec.frames(data, id="split", chunk_id=0, num_chunks=1, src=0, max_part_bytes=2 * MiB)
        sender._loop_thread.call(lh.send(13, first))
        sender._loop_thread.call(_break_link(lh._links[13]))
        with pytest.raises(
            PeerLostError, match=r"rank 13 broke between the parts of id='split' chunk=0 .*send the message"
        ):
            sender._loop_thread.call(lh.send(13, second))
        for frame in sender.codec.frames(data, id="split", chunk_id=0, num_chunks=1, src=0, max_part_bytes=2 * MiB):
            sender._loop_thread.call(lh.send(13, frame))  # sent again in full, at once, over the new connection
        assert _digest(receiver.recv_sync("split", timeout=WAIT)) == _digest(data)
        receiver.mark_done_sync("split")
        wait_until(lambda: receiver._store.buffered_bytes == 0, "nothing of the first send stays counted")


def test_a_connection_found_broken_late_loses_only_what_came_over_it(
    env: dict[str, str], sender: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver may handle the break of an old connection only after the sender connected again
    # and sent parts of another message: those parts, and receives waiting on the sender, must survive.
    heard: list[tuple[Incoming, str]] = []
    close_now = Incoming._on_close

    def close_later(incoming: Incoming, reason: str) -> None:
        if not heard and incoming.rank == 0:
            heard.append((incoming, reason))
        else:
            close_now(incoming, reason)

    monkeypatch.setattr(Incoming, "_on_close", close_later)  # before the connection: its channel keeps the method
    lh = transport(sender)
    old_data, new_data = random_bytes(4 * MiB, 17), random_bytes(4 * MiB, 18)
    with local_sidecar(env, 14) as receiver, concurrent.futures.ThreadPoolExecutor(1) as pool:
        sender.send(0, "stream-14", 14, chunk_id=0, stream=True).result(WAIT)
        waiting = pool.submit(receiver.recv_sync, "stream-14", 1, WAIT)  # on a rank-0 id: lost if rank 0 were
        old = sender.codec.frames(old_data, id="old-14", chunk_id=0, num_chunks=1, src=0, max_part_bytes=2 * MiB)
        sender._loop_thread.call(lh.send(14, old[0]))
        sender._loop_thread.call(_break_link(lh._links[14]))
        wait_until(lambda: heard, "the receiver heard that the first connection broke")
        new = sender.codec.frames(new_data, id="new-14", chunk_id=0, num_chunks=1, src=0, max_part_bytes=2 * MiB)
        sender._loop_thread.call(lh.send(14, new[0]))  # over a new connection
        assert len(transport(receiver)._incoming) == 2

        async def handle_the_break_now() -> None:
            close_now(*heard[0])

        receiver._loop_thread.call(handle_the_break_now())
        sender._loop_thread.call(lh.send(14, new[1]))
        assert _digest(receiver.recv_sync("new-14", timeout=WAIT)) == _digest(new_data)
        assert not waiting.done(), "rank 0 is still connected: its receives go on"
        sender.send(1, "stream-14", 14, chunk_id=1, stream=True).result(WAIT)
        assert waiting.result(WAIT) == 1
        receiver.mark_done_sync("new-14")
        for chunk in (0, 1):
            receiver.mark_done_sync("stream-14", chunk)
        wait_until(lambda: receiver._store.buffered_bytes == 0, "the old message's part was let go")


def test_many_small_messages(sender: Sidecar, peer: PeerProcess) -> None:
    objects: list[Any] = [i if i % 2 else {"i": i, "pad": "x" * 80} for i in range(400)]
    ids = [f"small-{i}" for i in range(len(objects))]
    call = peer.submit(peer_recv_values, ids)
    futures = [sender.send(obj, id, 1) for obj, id in zip(objects, ids, strict=True)]
    for future in futures:
        future.result(WAIT)
    assert call.result(WAIT) == objects
    link = transport(sender)._links[1]
    sender.send(0, "small-last", 1).result(WAIT)
    assert transport(sender)._links[1] is link, "sends to one peer must reuse one connection"
    assert peer.call(peer_recv_values, ["small-last"]) == [0]


def test_a_waiting_thread_gives_up_a_socket_the_loop_holds_within_its_budget(env: dict[str, str]) -> None:
    # The loop thread may be stuck holding a socket (in a user's callback, say): a thread waiting in
    # recv_sync reads the sockets for its polling budget at most, then sleeps as usual.
    with local_sidecar(env, 62) as sender, local_sidecar(env, 63) as receiver:
        sender.send(0, "budget-hello", 63).result(WAIT)
        assert receiver.recv_sync("budget-hello") == 0
        readers = transport(receiver)._readers
        assert readers is not None
        channels = [channel for channel in readers._channels.values() if channel.direct]
        assert channels, "no connection a waiting thread may read"
        taken, release = threading.Event(), threading.Event()

        def hold() -> None:
            with channels[0].read_lock:  # as the loop does while it reads
                taken.set()
                release.wait(WAIT)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert taken.wait(WAIT)
            start = time.monotonic()
            readers.poll_here(lambda: False, 0.05)
            elapsed = time.monotonic() - start
        finally:
            release.set()
            holder.join(WAIT)
        assert elapsed < 2.0, f"polling waited {elapsed:.2f}s for a socket the loop held; its budget is 0.05s"


def test_small_sends_to_a_stalled_peer_time_out_then_arrive_whole(env: dict[str, str], peer: PeerProcess) -> None:
    """Small sends written from the caller's thread: a full socket, the send timeout, no torn messages."""
    with local_sidecar(env, 6, send_timeout=1.0) as sender:
        sender.send(0, "stall-hello", 1).result(WAIT)  # connected: later small sends take the fast path
        objects = [{"i": i, "pad": "x" * 3900} for i in range(300)]  # ~1.2 MB: more than the socket holds
        assert peer.process.pid is not None
        stop_process(peer.process.pid)
        try:
            start = time.monotonic()
            futures = [sender.send(obj, f"stall-{i}", 1) for i, obj in enumerate(objects)]
            with pytest.raises(SendTimeoutError, match="SIDECAR_SEND_TIMEOUT=1s"):
                futures[0].result(WAIT)
            elapsed = time.monotonic() - start
            assert 0.9 < elapsed < 1.0 + 2.0, f"timed out after {elapsed:.2f}s, SIDECAR_SEND_TIMEOUT is 1s"
        finally:
            os.kill(peer.process.pid, signal.SIGCONT)
        # The later sends' deadlines may not have passed yet: their acknowledgements still count.
        outcomes = {type(future.exception(WAIT)).__name__ for future in futures}
        assert outcomes <= {"SendTimeoutError", "NoneType"}, outcomes
        # Everything was still written whole and in order, and the connection stays usable.
        assert peer.call(peer_recv_values, ["stall-hello", *(f"stall-{i}" for i in range(len(objects)))]) == [
            0,
            *objects,
        ]
        sender.send(1, "stall-after", 1).result(WAIT)
        assert peer.call(peer_recv_values, ["stall-after"]) == [1]


def test_a_send_that_timed_out_is_not_read_from_the_callers_memory_afterwards(
    env: dict[str, str], peer: PeerProcess
) -> None:
    # What the socket of a stalled peer does not take waits in a queue; once a send has timed out its
    # caller may reuse the tensor, so what is still queued is copied first (and still written whole).
    with local_sidecar(env, 8, send_timeout=1.0) as sender:
        sender.send(0, "reuse-hello", 1).result(WAIT)  # connected: later small sends take the fast path
        tensors = [torch.full((4000,), 7, dtype=torch.uint8) for _ in range(300)]  # more than the socket holds
        sent = _digest(tensors[0])
        assert peer.process.pid is not None
        stop_process(peer.process.pid)
        try:
            futures = [sender.send(tensor, f"reuse-{i}", 1) for i, tensor in enumerate(tensors)]
            outcomes = [type(future.exception(WAIT)).__name__ for future in futures]
            for tensor, outcome in zip(tensors, outcomes, strict=True):
                if outcome == "SendTimeoutError":
                    tensor.fill_(0xEE)  # the caller reuses its memory
        finally:
            os.kill(peer.process.pid, signal.SIGCONT)
        assert "SendTimeoutError" in outcomes
        digests = peer.call(peer_recv_digests, [[f"reuse-{i}" for i in range(len(tensors))]])
        assert set(digests.values()) == {sent}, "a tensor was read after its send had timed out"


def test_a_send_on_its_way_cannot_be_called_back(env: dict[str, str], peer: PeerProcess) -> None:
    # Cancelling would give the caller its memory back while the frame is still read from it.
    with local_sidecar(env, 9) as sender:
        sender.send(0, "uncalled-hello", 1).result(WAIT)
        assert peer.process.pid is not None
        stop_process(peer.process.pid)
        try:
            future = sender.send(torch.full((4000,), 3, dtype=torch.uint8), "uncalled", 1)
            assert not future.cancel()
            assert not future.cancelled()
        finally:
            os.kill(peer.process.pid, signal.SIGCONT)
        future.result(WAIT)
        assert peer.call(peer_recv_values, ["uncalled"])[0].tolist() == [3] * 4000


def test_view_is_valid_until_mark_done_then_the_slot_is_reused(env: dict[str, str], peer: PeerProcess) -> None:
    with local_sidecar(env, 22) as own:
        pool = transport(own)._pool
        first, second, third = (torch.full((MiB,), value, dtype=torch.uint8) for value in (1, 2, 3))
        own.send(first, "view-1", 1).result(WAIT)
        assert peer.call(peer_recv_digest, "view-1", True)["in_pool"]
        own.send(second, "view-2", 1).result(WAIT)
        assert peer.call(peer_recv_digest, "view-2", True)["digest"] == _digest(second)
        assert peer.call(peer_kept_digest, "view-1") == _digest(first), "a held view changed before mark_done"
        assert pool.used == 2 * MiB
        peer.call(peer_mark_done, "view-1", "view-2")
        wait_until(lambda: pool.used == 0, "the receiver's mark_done released both slots")
        own.send(third, "view-3", 1).result(WAIT)
        # The first slot was handed to the third tensor: the stale view of the first now shows it.
        assert peer.call(peer_kept_digest, "view-1") == _digest(third)
        peer.call(peer_mark_done, "view-3")


def test_a_failed_copy_fails_its_send_and_the_peer_drops_the_frame(
    env: dict[str, str], peer: PeerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy into shared memory that fails: the send raises its error, nothing reaches the peer, the slot is freed."""
    with local_sidecar(env, 24) as own:
        own.send(0, "copy-hello", 1).result(WAIT)
        pool = transport(own)._pool

        def broken(target: Any, source: Any, **options: Any) -> None:
            raise OSError("the copy failed on purpose")

        monkeypatch.setattr(copy_module, "copy_piece", broken)
        with pytest.raises(PluginError, match="failed in send: OSError: the copy failed on purpose") as info:
            own.send(random_bytes(4 * MiB, 5), "copy-broken", 1).result(WAIT)
        assert isinstance(info.value.__cause__, OSError)
        monkeypatch.undo()
        wait_until(lambda: pool.used == 0, "the peer released the abandoned frame's slot")
        assert not peer.call(peer_holds, "copy-broken"), "the peer must drop a frame whose copy failed"
        tensor = random_bytes(4 * MiB, 6)
        own.send(tensor, "copy-after", 1).result(WAIT)
        assert peer.call(peer_recv_digest, "copy-after")["digest"] == _digest(tensor)


def test_shared_memory_frames_skip_the_loop_once_the_peer_has_the_pool(
    env: dict[str, str], peer: PeerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to 4 MiB the sending thread copies and announces a frame itself, beyond that a copy thread does."""
    with local_sidecar(env, 26) as own:
        pool = transport(own)._pool
        own.send(random_bytes(MiB, 30), "medium-0", 1).result(WAIT)  # shares the pool, on the loop
        peer.call(peer_mark_done, "medium-0")
        on_loop = ids_sent_on_the_loop(monkeypatch, LocalhostTransport)
        copied_by: list[tuple[int, str]] = []  # (piece size, thread) of every piece copied
        copy_piece = copy_module.copy_piece

        def recorded(target: Any, source: Any, **options: Any) -> None:
            copied_by.append((source.size, threading.current_thread().name))
            copy_piece(target, source, **options)

        monkeypatch.setattr(copy_module, "copy_piece", recorded)
        sizes = {"medium-1": 256 << 10, "medium-2": 4 * MiB, "large-1": 4 * MiB + 4096, "large-2": 24 * MiB}
        tensors = {id: random_bytes(nbytes, 31 + i) for i, (id, nbytes) in enumerate(sizes.items())}
        for id, tensor in tensors.items():
            own.send(tensor, id, 1).result(WAIT)
            received = peer.call(peer_recv_digest, id, True)
            assert (received["digest"], received["in_pool"]) == (_digest(tensor), True)
        assert on_loop == []
        this_thread = threading.current_thread().name
        by_size = sorted(copied_by)
        assert [size for size, _ in by_size] == [256 << 10, 4 * MiB, 4 * MiB + 4096, 24 * MiB]
        assert [thread == this_thread for _, thread in by_size] == [True, True, False, False]
        assert all(thread.startswith("sidecar-copy") for _, thread in by_size[2:])
        assert pool.used >= sum(sizes.values())
        peer.call(peer_mark_done, *sizes)
        wait_until(lambda: pool.used == 0, "mark_done released every slot, whichever thread sent it")


def test_every_kind_of_host_buffer_lands_whole_in_its_slot() -> None:
    """Large writable buffers (copied by torch's threads), read-only bytes and small buffers, side by side."""
    copier = copy_module.Copier(2)
    large = random_bytes(copy_module.PARALLEL_BYTES + 4097, 70)
    read_only = bytes(random_bytes(copy_module.PARALLEL_BYTES * 2, 71).numpy())
    small = random_bytes(3000, 72)
    buffers: list[Any] = [large, read_only, host_bytes(small)]
    offsets = [0, large.numel(), large.numel() + len(read_only)]
    span = offsets[-1] + small.numel()
    slot = memoryview(bytearray(span + 64))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns when it wraps read-only memory
            copier.submit(slot, buffers, offsets).result(WAIT)
    finally:
        copier.close()
    assert bytes(slot[:span]) == bytes(large.numpy()) + read_only + bytes(small.numpy())
    assert bytes(slot[span:]) == bytes(64), "nothing was written past the last buffer"


def test_copies_of_different_frames_run_at_the_same_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """With two copy threads a second frame's copy does not wait for the first's."""
    copier = copy_module.Copier(2)
    copy_piece = copy_module.copy_piece
    both_started = threading.Barrier(2, timeout=WAIT)

    def meet(target: Any, source: Any, **options: Any) -> None:
        both_started.wait()  # breaks (and fails the copy) if the other copy never starts meanwhile
        copy_piece(target, source, **options)

    monkeypatch.setattr(copy_module, "copy_piece", meet)
    tensors = [random_bytes(2 * MiB, 80 + i) for i in range(2)]
    slots = [memoryview(bytearray(2 * MiB)) for _ in tensors]
    try:
        futures = [copier.submit(slot, [tensor], [0]) for slot, tensor in zip(slots, tensors, strict=True)]
        for future in futures:
            future.result(WAIT)
    finally:
        copier.close()
    assert [bytes(slot) for slot in slots] == [bytes(tensor.numpy()) for tensor in tensors]


def test_a_copy_that_fails_or_cannot_start_fails_its_future(monkeypatch: pytest.MonkeyPatch) -> None:
    # A copier shut down under a submit once raised from it, and the caller then never released the
    # slot: submit never raises, its future says what went wrong.
    copier = copy_module.Copier(2)
    copy_piece = copy_module.copy_piece
    copied: list[int] = []

    def second_fails(target: Any, source: Any, **options: Any) -> None:
        copied.append(source.size)
        if len(copied) == 2:
            raise OSError("the second buffer failed on purpose")
        copy_piece(target, source, **options)

    monkeypatch.setattr(copy_module, "copy_piece", second_fails)
    buffers = [random_bytes(MiB, 1 + i).numpy().data for i in range(3)]
    slot = memoryview(bytearray(3 * MiB))
    future = copier.submit(slot, buffers, [0, MiB, 2 * MiB])
    with pytest.raises(OSError, match="second buffer failed"):
        future.result(WAIT)
    assert copied == [MiB, MiB], "the copy stopped at the buffer that failed"
    assert not future.cancel(), "a copy under way cannot be cancelled"
    with pytest.raises(ValueError, match="overruns a slot"):
        copier.copy(slot, buffers[:1], [2 * MiB + 1])
    copier.close()
    after = copier.submit(slot, buffers, [0, MiB, 2 * MiB])  # never raises: the future says why
    with pytest.raises(RuntimeError, match="shutdown"):
        after.result(WAIT)


def test_a_copy_whose_thread_cannot_start_never_writes_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    # ThreadPoolExecutor.submit queues the work before it starts a thread: when the thread cannot
    # start, submit raises with the copy queued all the same. The sender then frees the slot, so
    # the copy must not run later, over whatever the slot holds by then.
    copier = copy_module.Copier(1)
    copy_piece = copy_module.copy_piece
    gate = threading.Event()

    def held(target: Any, source: Any, **options: Any) -> None:
        gate.wait(WAIT)  # keeps the one copy thread busy until the slot has been reused
        copy_piece(target, source, **options)

    monkeypatch.setattr(copy_module, "copy_piece", held)
    first = copier.submit(memoryview(bytearray(MiB)), [random_bytes(MiB, 90)], [0])
    real_submit = copier._pool.submit

    def queued_then_failed(*args: Any, **kwargs: Any) -> Any:
        real_submit(*args, **kwargs)
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(copier._pool, "submit", queued_then_failed)
    slot = memoryview(bytearray(MiB))
    abandoned = copier.submit(slot, [random_bytes(MiB, 91)], [0])
    with pytest.raises(RuntimeError, match="can't start"):
        abandoned.result(WAIT)
    slot[:] = bytes(MiB)  # the slot's next frame
    monkeypatch.setattr(copier._pool, "submit", real_submit)
    gate.set()
    first.result(WAIT)
    copier.submit(memoryview(bytearray(16)), [b"x" * 16], [0]).result(WAIT)  # the queue has run dry
    copier.close()
    assert bytes(slot) == bytes(MiB), "the abandoned copy wrote into a slot already reused"


def test_a_forked_child_copies_after_its_parent_did(tmp_path: Path) -> None:
    # GNU OpenMP (torch's CPU threads) hangs a forked child in the first parallel region of a thread
    # that ran one in the parent: copies on callers' threads must not start OpenMP there.
    script = tmp_path / "fork_copy.py"
    script.write_text(
        textwrap.dedent(
            """
            import mmap, os, signal, sys
            import torch
            from transports.localhost._copy import Copier

            torch.ones(1 << 22).mul_(2)  # the main thread runs a parallel region, as users' code does
            sources = [torch.full((2 << 20,), value, dtype=torch.uint8) for value in (7, 8, 9)]
            slot = memoryview(mmap.mmap(-1, 4 << 20))
            parent = Copier(2)
            parent.copy(slot, [sources[0]], [0])  # a frame of 1 to 4 MiB, copied on the sending thread
            parent.submit(slot, [sources[0]], [2 << 20]).result(30)
            pid = os.fork()
            if pid == 0:  # no torch op here: the main thread's own parallel regions would hang
                signal.alarm(30)  # a hung child ends itself, not only the parent the test waits for
                child = Copier(2)
                child.copy(slot, [sources[1]], [0])
                child.submit(slot, [sources[2]], [2 << 20]).result(30)
                os._exit(0 if (slot[0], slot[-1]) == (8, 9) else 3)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            print("the child hung (its alarm ended it)" if code == -signal.SIGALRM else f"the child exited {code}")
            sys.exit(code != 0)
            """
        )
    )
    try:  # the code under test first on the path, not an installed copy
        result = subprocess.run(
            [sys.executable, str(script)],
            env=checkout_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the forked child hung in its copy")
    assert result.returncode == 0, f"{result.stdout.strip()}; {result.stderr}"


def test_a_sidecar_left_open_at_exit_removes_its_socket(env: dict[str, str], socket_dir: Path) -> None:
    # Sweeping the files of a dead rank waits for the next sidecar of that rank; a process that just
    # returns from main without shutdown_sync must take its socket and lock file with it.
    script = "from sidecar_core import Sidecar, SidecarConfig; Sidecar(SidecarConfig(sidecar_rank=66)); print('made')"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=checkout_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "made"), result.stderr
    assert not list(socket_dir.glob("rank-66*")), "its socket or lock file outlived the process"


def test_a_forked_child_is_refused_its_parents_sidecar_and_leaves_it_working(
    env: dict[str, str], tmp_path: Path
) -> None:
    # A forked child has the parent's sidecar without its threads, sharing its connections: using it
    # hung (or wrote into the parent's connection); shutting it down could close the parent's socket.
    script = tmp_path / "fork_sidecar.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, sys
            from sidecar_core import PeerUnreachableError, Sidecar, SidecarClosedError, SidecarConfig

            a, b = Sidecar(SidecarConfig(sidecar_rank=40)), Sidecar(SidecarConfig(sidecar_rank=41))
            done = a.send(1, "before", 41)
            done.result(10)
            assert b.recv_sync("before") == 1
            pending = a.send(5, "to-nobody", 43)  # still connecting at the fork (SIDECAR_CONNECT_TIMEOUT=1)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # only the sidecar's calls, os.write and os._exit here
                signal.alarm(20)  # a hung child ends itself
                said = [] if done.result(0) is None else ["a send done at the fork has lost its outcome"]
                for call in (lambda: a.send(2, "from-child", 41), lambda: b.recv_sync("before"),
                             lambda: b.mark_done_sync("before"), lambda: pending.result(5)):
                    try:
                        call()
                        said.append("no error")
                    except SidecarClosedError as exc:
                        said.append(str(exc))
                a.shutdown_sync()  # must leave the parent's connections and socket alone
                b.shutdown_sync()
                os.write(write, "\\n".join(said).encode())
                os._exit(0)
            os.close(write)
            _, status = os.waitpid(pid, 0)
            with os.fdopen(read) as pipe:
                print(pipe.read())
            code = os.waitstatus_to_exitcode(status)
            assert code == 0, "the child hung (its alarm ended it)" if code == -signal.SIGALRM else f"exit {code}"
            assert isinstance(pending.exception(10), PeerUnreachableError)  # the parent's own outcome
            a.send(3, "after", 41).result(10)  # the parent's sidecars still work, both ways
            b.send(4, "back", 40).result(10)
            assert (b.recv_sync("after"), a.recv_sync("back")) == (3, 4)
            a.shutdown_sync()
            b.shutdown_sync()
            """
        )
    )
    try:
        result = subprocess.run(
            [sys.executable, str(script)],
            env=checkout_env(env),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the forked child or its parent hung")
    assert result.returncode == 0, result.stderr
    said = result.stdout.strip().splitlines()
    assert len(said) == 4
    for line in said[:3]:
        assert re.fullmatch(
            r"sidecar rank 4[01] belongs to process \d+; this forked child \(pid \d+\) shares that process's "
            r"connections and has none of its threads\. Create a new Sidecar in the child, .*",
            line,
        ), line
    # Waiting would read the parent's connections, taking its acknowledgements and frames.
    assert re.fullmatch(
        r"send id='to-nobody' chunk=0 was started by the process that forked this one; this child \(pid \d+\) "
        r"cannot wait for it, only that process can",
        said[3],
    ), said[3]


def test_a_forked_child_does_not_keep_its_dead_parents_rank(env: dict[str, str]) -> None:
    # A child keeps copies of its parent's descriptors; the sidecar closes the child's copies of the
    # rank's lock, listener and connections, so that once the parent dies its rank can be served again
    # and its peers see it gone, while the child lives on.
    run_env = checkout_env(env)
    with (
        local_sidecar(env, 51) as other,
        forking_owner([sys.executable, "-c", owner_script(50, 51)], run_env, REPO, WAIT) as kill_owner,
    ):
        assert other.recv_sync("owner-hello", timeout=WAIT) == "hi"
        other.send("back", "to-owner", 50).result(WAIT)  # connected to the owner both ways
        kill_owner()
        with local_sidecar(env, 50) as again:  # the dead owner's rank can be served again
            other.send("new", "to-new-owner", 50).result(WAIT)
            assert again.recv_sync("to-new-owner", timeout=WAIT) == "new"


def test_a_failed_copy_on_a_copy_thread_fails_its_send(
    env: dict[str, str], peer: PeerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large fast-path frame whose copy fails: its send raises the error, its slot is freed, nothing is announced."""
    with local_sidecar(env, 28) as own:
        pool = transport(own)._pool
        own.send(random_bytes(MiB, 50), "copy-thread-hello", 1).result(WAIT)  # shares the pool
        peer.call(peer_mark_done, "copy-thread-hello")
        wait_until(lambda: pool.used == 0, "the first frame's slot came back")
        on_loop = ids_sent_on_the_loop(monkeypatch, LocalhostTransport)
        copy_piece = copy_module.copy_piece
        copied: list[int] = []

        def broken(target: Any, source: Any, **options: Any) -> None:
            copied.append(source.size)
            raise OSError("the copy failed on purpose")

        monkeypatch.setattr(copy_module, "copy_piece", broken)
        with pytest.raises(PluginError, match="failed in send_nowait: OSError: the copy failed on purpose"):
            own.send(random_bytes(8 * MiB, 51), "copy-thread-broken", 1).result(WAIT)
        monkeypatch.setattr(copy_module, "copy_piece", copy_piece)
        assert copied == [8 * MiB]
        wait_until(lambda: pool.used == 0, "the failed copy's slot came back")
        assert on_loop == []
        assert not peer.call(peer_holds, "copy-thread-broken"), "nothing may reach the peer when the copy failed"
        tensor = random_bytes(8 * MiB, 52)
        own.send(tensor, "copy-thread-after", 1).result(WAIT)
        assert peer.call(peer_recv_digest, "copy-thread-after")["digest"] == _digest(tensor)


def test_pool_gives_room_to_waiting_sends_in_order() -> None:
    """A frame that waits for room holds back later ones, fast path included, until it fits or gives up."""

    async def scenario() -> None:
        pool = Pool(8 * MiB)
        try:
            first = await pool.acquire(6 * MiB, WAIT, str)
            big = asyncio.create_task(pool.acquire(4 * MiB, WAIT, str))
            await asyncio.sleep(0.01)
            assert pool.try_acquire(MiB) is None, "a later frame took the room an earlier one waits for"
            small = asyncio.create_task(pool.acquire(MiB, WAIT, str))
            await asyncio.sleep(0.01)
            assert not big.done()
            assert not small.done(), "a later frame was given room before the earlier one that waits"
            first.release()
            big_lease, small_lease = await big, await small
            assert (big_lease.size, small_lease.size, pool.used) == (4 * MiB, MiB, 5 * MiB)

            # A waiter that gives up lets the next one have the room it could not use.
            hopeless = asyncio.create_task(pool.acquire(6 * MiB, 0.2, str))
            await asyncio.sleep(0.01)
            modest = asyncio.create_task(pool.acquire(2 * MiB, WAIT, str))
            with pytest.raises(CapacityError, match=r"no room for 6291456 bytes after waiting 0\.2s"):
                await hopeless
            assert (await modest).size == 2 * MiB
            assert pool.used == 7 * MiB
        finally:
            pool.close()

    asyncio.run(scenario())


def test_threads_sending_medium_frames_into_a_small_pool(
    env: dict[str, str], peer: PeerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads race for slots on the fast path while the pool fills: every byte arrives, every slot comes back."""
    small_pool = {**env, "SIDECAR_LOCALHOST__POOL_BYTES": str(8 * MiB)}
    with local_sidecar(small_pool, 27) as own:
        pool = transport(own)._pool
        own.send(random_bytes(MiB, 40), "race-first", 1).result(WAIT)  # shares the pool
        on_loop = ids_sent_on_the_loop(monkeypatch, LocalhostTransport)
        plan = {f"race-{t}-{i}": ((256 << 10) * (1 + (t + i) % 8), 41 + 10 * t + i) for t in range(4) for i in range(8)}
        own_order = [[f"race-{t}-{i}" for i in range(8)] for t in range(4)]
        receiving = peer.submit(peer_recv_digests, [["race-first"], *own_order])

        def send_share(t: int) -> dict[str, str]:
            tensors = {id: random_bytes(*plan[id]) for id in own_order[t]}
            futures = [own.send(tensor, id, 1) for id, tensor in tensors.items()]  # all in flight at once
            for future in futures:
                future.result(WAIT)
            return {id: _digest(tensor) for id, tensor in tensors.items()}

        with concurrent.futures.ThreadPoolExecutor(4) as threads:
            shares = list(threads.map(send_share, range(4)))
        received = receiving.result(WAIT)
        assert {id: digest for share in shares for id, digest in share.items()} == {id: received[id] for id in plan}
        wait_until(lambda: pool.used == 0, "every slot was released")
        # Both paths ran: the fast path while there was room, the loop's waiting send while there was none.
        assert 0 < len(on_loop) < len(plan), on_loop


def test_broadcast_copies_once(sender: Sidecar, peer: PeerProcess, peer2: PeerProcess) -> None:
    tensor = random_bytes(8 * MiB, 3)
    pool = transport(sender)._pool
    before = pool.used  # slots other tests' receivers still hold
    sender.send(tensor, "broadcast", [[1, 2]]).result(WAIT)
    assert pool.used - before == 8 * MiB, "both destinations must share one slot"
    assert peer.call(peer_recv_digest, "broadcast")["digest"] == _digest(tensor)
    assert peer2.call(peer_recv_digest, "broadcast")["digest"] == _digest(tensor)
    wait_until(lambda: pool.used == before, "both releases freed the shared slot")


def _pool_resident(pool: Pool) -> int:
    """Bytes of memory the pool's memfd holds now."""
    return int(os.fstat(pool.fd).st_blocks) * 512


def test_idle_pool_gives_its_pages_back_except_under_held_slots(env: dict[str, str], peer: PeerProcess) -> None:
    with local_sidecar({**env, "SIDECAR_LOCALHOST__POOL_TRIM_SECONDS": "0.2"}, 25) as own:
        pool = transport(own)._pool
        held, burst, after = random_bytes(4 * MiB, 30), random_bytes(32 * MiB, 31), random_bytes(32 * MiB, 32)
        own.send(held, "trim-held", 1).result(WAIT)
        assert peer.call(peer_recv_digest, "trim-held", True)["digest"] == _digest(held)  # kept: its slot stays
        own.send(burst, "trim-burst", 1).result(WAIT)
        assert peer.call(peer_recv_digest, "trim-burst", True)["digest"] == _digest(burst)
        time.sleep(0.5)  # idle for more than two periods, but both slots are held
        assert _pool_resident(pool) >= 36 * MiB, "slots in use must never be trimmed"
        peer.call(peer_mark_done, "trim-burst")
        wait_until(lambda: pool.used == 4 * MiB, "the burst's slot was released")
        wait_until(lambda: _pool_resident(pool) < 8 * MiB, "the idle pool gave the burst's pages back")
        assert peer.call(peer_kept_digest, "trim-held") == _digest(held), "a held slot must never be trimmed"
        own.send(after, "trim-after", 1).result(WAIT)  # the pages come back for the next send
        assert peer.call(peer_recv_digest, "trim-after")["digest"] == _digest(after)
        peer.call(peer_mark_done, "trim-held")


def test_a_pool_a_connected_receiver_page_locks_is_trimmed_only_once_it_left(
    env: dict[str, str], peer: PeerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A receiver landing tensors on a GPU page-locks its mapping of the pool (which faults the whole
    # pool in), so the sender must not trim while it is connected. The pool stayed untrimmed for
    # good after such a receiver left, and trimming would only have freed the pages the sender's own
    # slots populated. This peer lands on the CPU: its welcome is made to say it pins the pool, and
    # the page-locking is played by a mapping of this test's that touches every page (the GPU test
    # of the same checks the bytes that arrive).
    connect = Link.connect

    async def pinning(*args: Any, **kwargs: Any) -> Link:
        link = await connect(*args, **kwargs)
        assert link.welcome is not None
        link.welcome = link.welcome.model_copy(update={"pins_pool": True})
        return link

    monkeypatch.setattr(Link, "connect", pinning)
    with local_sidecar(
        {**env, "SIDECAR_LOCALHOST__POOL_BYTES": str(64 * MiB), "SIDECAR_LOCALHOST__POOL_TRIM_SECONDS": "0.2"}, 27
    ) as own:
        pool = transport(own)._pool
        burst = random_bytes(8 * MiB, 33)
        own.send(burst, "pinned-burst", 1).result(WAIT)
        assert peer.call(peer_recv_digest, "pinned-burst")["digest"] == _digest(burst)
        with mmap.mmap(pool.fd, 64 * MiB) as locked:  # as page-locking does: every page faults in
            for offset in range(0, 64 * MiB, 4096):
                locked[offset] = locked[offset]
        wait_until(lambda: pool.used == 0, "the burst's slot was released")
        time.sleep(0.6)  # idle for more than two periods
        assert _pool_resident(pool) >= 64 * MiB, "a pool a connected receiver page-locks must not be trimmed"
        own._loop_thread.call(transport(own)._links[1].close())
        wait_until(lambda: _pool_resident(pool) < 4 * MiB, "the whole idle pool is trimmed once that receiver left")


def test_a_connection_that_ends_with_its_welcome_is_not_kept(env: dict[str, str], socket_dir: Path) -> None:
    # When the WELCOME and the end of the connection came in one read, the link closed before the
    # transport filed it and stayed filed, closed (and, welcome saying it pins the pool, kept the
    # pool from ever being trimmed again).
    def welcome_then_leave(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            _, _, length, _ = ENVELOPE.unpack(conn.recv(ENVELOPE.size, socket.MSG_WAITALL))
            conn.recv(length, socket.MSG_WAITALL)  # the HELLO
            body = Welcome(version=VERSION, rank=39, pid=os.getpid(), pins_pool=True).model_dump_json().encode()
            conn.sendall(envelope(Msg.WELCOME, len(body)) + body)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, local_sidecar(env, 38) as own:
        listener.bind(str(socket_dir / "rank-39.sock"))
        listener.listen()
        fake = threading.Thread(target=welcome_then_leave, args=(listener,))
        fake.start()
        try:
            with pytest.raises((PeerLostError, PeerUnreachableError)):
                own.send(0, "to-a-leaver", 39).result(WAIT)
        finally:
            fake.join(WAIT)
            os.unlink(socket_dir / "rank-39.sock")
        assert 39 not in transport(own)._links, "a closed connection must not be kept"
        assert not own._loop_thread.call(_pinned(transport(own)))


async def _pinned(transport: LocalhostTransport) -> bool:
    return transport._pinned_by_peer()


def test_full_pool_waits_for_mark_done_then_gives_up(env: dict[str, str], peer: PeerProcess) -> None:
    small_pool = {**env, "SIDECAR_LOCALHOST__POOL_BYTES": str(4 * MiB), "SIDECAR_SEND_TIMEOUT": "2"}
    with local_sidecar(small_pool, 23) as own:
        tensors = [random_bytes(MiB, 10 + i) for i in range(6)]
        for i in range(4):
            own.send(tensors[i], f"full-{i}", 1).result(WAIT)
        waiting = own.send(tensors[4], "full-4", 1)
        time.sleep(0.3)
        assert not waiting.done(), "the send must wait while the pool is full"
        peer.call(peer_mark_done, "full-0")
        waiting.result(WAIT)
        start = time.monotonic()
        with pytest.raises(CapacityError) as info:
            own.send(tensors[5], "full-5", 1).result(WAIT)
        # It waited (most of SIDECAR_SEND_TIMEOUT=2) and then said why, instead of a generic send timeout.
        assert time.monotonic() - start > 1.5
        message = str(info.value)
        assert "pool is full" in message
        assert "mark_done" in message
        assert "SIDECAR_LOCALHOST__POOL_BYTES" in message
        assert "rank 1: 4 frames" in message
        peer.call(peer_mark_done, *(f"full-{i}" for i in range(1, 5)))
        own.send(tensors[5], "full-5", 1).result(WAIT)
        assert peer.call(peer_recv_digest, "full-5")["digest"] == _digest(tensors[5])


def test_inbox_error_comes_back_and_frees_the_slot(sender: Sidecar, peer: PeerProcess) -> None:
    pool = transport(sender)._pool
    sender.send(random_bytes(MiB, 4), "dup", 1).result(WAIT)
    used = pool.used
    with pytest.raises(RemoteError, match=r"DuplicateChunkError.*already held"):
        sender.send(random_bytes(MiB, 5), "dup", 1).result(WAIT)
    wait_until(lambda: pool.used == used, "the refused frame's slot was released")
    assert peer.call(peer_recv_digest, "dup")["digest"] == _digest(random_bytes(MiB, 4))


# -- dead peers ----------------------------------------------------------------------------------


def test_receiver_killed_mid_send_then_restarted(env: dict[str, str], sender: Sidecar) -> None:
    victim = PeerProcess(6, env)
    try:
        sender.send(1, "before-kill", 6).result(WAIT)
        pool = transport(sender)._pool
        before = pool.used  # slots other tests' receivers still hold
        assert victim.process.pid is not None
        stop_process(victim.process.pid)  # it holds the frame but never acknowledges it
        pending = sender.send(random_bytes(4 * MiB, 6), "killed-mid-send", 6)
        time.sleep(0.2)
        assert not pending.done()
        assert pool.used == before + 4 * MiB  # the unacknowledged frame's slot
        victim.kill()
        with pytest.raises(PeerLostError, match=r"rank 6 at .*rank-6\.sock was lost before it acknowledged"):
            pending.result(WAIT)
        wait_until(lambda: pool.used == before, "the dead peer's slot returned to the pool")
    finally:
        victim.close()
    with PeerProcess(6, env) as again:  # the stale socket does not stop a new sidecar on rank 6
        sender.send(2, "after-restart", 6).result(WAIT)  # over a new connection
        assert again.call(peer_recv_values, ["after-restart"]) == [2]


def test_sigkill_leaves_nothing_behind(env: dict[str, str], socket_dir: Path) -> None:
    with local_sidecar(env, 24) as receiver:
        victim = PeerProcess(7, env)
        try:
            tensor = random_bytes(4 * MiB, 8)
            victim.call(peer_send_random, 4 * MiB, 8, "from-victim", 24)
            victim.call(peer_send, 1, "stream", 24, 0, True)
            inode = victim.call(peer_pool_inode)
            view = receiver.recv_sync("from-victim", timeout=WAIT)
            assert any(node == inode for _, _, node in _memfd_ranges()), "the receiver maps the victim's pool"
            assert victim.process.pid is not None
            pid = victim.process.pid
            names = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert not [n for n in names if n.startswith("/dev/shm")], f"files in /dev/shm: {names}"
            victim.kill()
            with pytest.raises(PeerLostError, match="rank 7"):
                receiver.recv_sync("stream", 1, timeout=WAIT)
            # A view received before the owner died stays valid until mark_done.
            assert _digest(view) == _digest(tensor)
            receiver.mark_done_sync("from-victim")
            del view
            gc.collect()
            wait_until(
                lambda: all(node != inode for _, _, node in _memfd_ranges()),
                "the dead peer's pool memory was unmapped",
            )
            assert not Path(f"/proc/{pid}").exists()
        finally:
            victim.close()
    assert (socket_dir / "rank-7.sock").exists(), "a killed sidecar cannot remove its own socket"
    with local_sidecar(env, 25):  # any sidecar that starts removes stale sockets and locks
        assert not (socket_dir / "rank-7.sock").exists()
        assert not (socket_dir / "rank-7.lock").exists()
    with local_sidecar(env, 7) as again:
        assert again.sidecar_rank == 7


# -- reading on the thread that waits in recv_sync -----------------------------------------------


class _Owner:
    """Takes what a channel hands its owner, noting the thread each message was handled on."""

    def __init__(self) -> None:
        self.messages: list[tuple[Msg, int, bytes, int]] = []
        self.closed: list[tuple[str, int]] = []

    def on_message(self, kind: Msg, arg: int, body: bytearray) -> None:
        self.messages.append((kind, arg, bytes(body), threading.get_ident()))

    def on_close(self, reason: str) -> None:
        self.closed.append((reason, threading.get_ident()))


@dataclass
class _Polled:
    """A channel over a socket pair, read through Readers by a loop on its own thread."""

    loop: asyncio.AbstractEventLoop
    loop_thread: int | None  # the loop thread's ident
    readers: Readers
    channel: Channel
    owner: _Owner
    theirs: socket.socket  # the other end, to write to


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Any) -> Any:
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()
    loop.call_soon_threadsafe(lambda: done.set_result(fn()))
    return done.result(5)


@pytest.fixture
def polled() -> Iterator[_Polled]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    owner = _Owner()
    readers: Readers = _on_loop(loop, lambda: Readers(loop))
    channel: Channel = _on_loop(
        loop,
        lambda: Channel(
            ours,
            loop,
            readers,
            allowed=SENDER_MESSAGES,
            on_message=owner.on_message,
            on_close=owner.on_close,
            reply_errors=True,
            name="test channel",
        ),
    )
    channel.direct = frozenset({Msg.FRAME})
    yield _Polled(loop, thread.ident, readers, channel, owner, theirs)
    _on_loop(loop, lambda: channel.close("test over"))
    _on_loop(loop, readers.close)
    theirs.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _another_channel(polled: _Polled, sock: socket.socket, owner: _Owner, name: str) -> Channel:
    """A second channel over ``sock``, read through ``polled``'s loop and readers."""
    return cast(
        Channel,
        _on_loop(
            polled.loop,
            lambda: Channel(
                sock,
                polled.loop,
                polled.readers,
                allowed=SENDER_MESSAGES,
                on_message=owner.on_message,
                on_close=owner.on_close,
                reply_errors=True,
                name=name,
            ),
        ),
    )


def _poll_while_sending(polled: _Polled, data: bytes, count: int) -> int:
    """Send ``data`` while a thread polls (so that the loop cannot read it first); that thread's ident."""
    owner = polled.owner
    polling = threading.Thread(target=polled.readers.poll_here, args=(lambda: len(owner.messages) == count, 5.0))
    polling.start()
    wait_until(lambda: _held_by_another_thread(polled.channel), "it polls")
    polled.theirs.sendall(data)
    polling.join(5)
    assert polling.ident is not None
    return polling.ident


def test_a_polling_thread_handles_direct_messages_and_leaves_the_rest_to_the_loop(polled: _Polled) -> None:
    owner, theirs = polled.owner, polled.theirs
    poller = _poll_while_sending(
        polled,
        envelope(Msg.FRAME, 3, 1) + b"abc" + envelope(Msg.READY, 8, 2) + bytes(8) + envelope(Msg.FRAME, 1, 3) + b"z",
        3,
    )
    wait_until(lambda: len(owner.messages) == 3, "the loop handled the rest")
    handled = [(kind, arg, body) for kind, arg, body, _ in owner.messages]
    assert handled == [(Msg.FRAME, 1, b"abc"), (Msg.READY, 2, bytes(8)), (Msg.FRAME, 3, b"z")]
    # The first frame on the polling thread; from READY on (not a direct kind) the loop took over, in order.
    loop = polled.loop_thread
    assert [who for *_, who in owner.messages] == [poller, loop, loop]
    # Given back: later input wakes the loop again.
    theirs.sendall(envelope(Msg.FRAME, 1, 4) + b"y")
    wait_until(lambda: len(owner.messages) == 4, "the loop read the channel again")
    assert owner.messages[3][1:] == (4, b"y", loop)
    # And the next wait takes it again (the poll object is built anew after a channel went back early).
    poller = _poll_while_sending(polled, envelope(Msg.FRAME, 1, 5) + b"x", 5)
    wait_until(lambda: len(owner.messages) == 5, "the frame was handled")
    assert owner.messages[4][1:] == (5, b"x", poller)


def test_the_end_of_the_connection_seen_while_polling_closes_it_on_the_loop(polled: _Polled) -> None:
    owner = polled.owner
    polled.theirs.sendall(envelope(Msg.FRAME, 2, 9) + b"ok")
    polled.theirs.shutdown(socket.SHUT_WR)
    polled.readers.poll_here(lambda: bool(owner.closed), 5.0)
    wait_until(lambda: bool(owner.closed), "the loop closed the channel")
    assert [(kind, arg, body) for kind, arg, body, _ in owner.messages] == [(Msg.FRAME, 9, b"ok")]
    assert owner.closed == [("the peer closed the connection", polled.loop_thread)]
    assert polled.channel.closed == "the peer closed the connection"


def test_malformed_input_seen_while_polling_is_answered_and_closed_on_the_loop(polled: _Polled) -> None:
    owner, theirs = polled.owner, polled.theirs
    theirs.sendall(envelope(Msg.FRAME, 1, 5) + b"a" + b"not an envelope at all")
    polled.readers.poll_here(lambda: bool(owner.closed), 5.0)
    wait_until(lambda: bool(owner.closed), "the loop closed the channel")
    assert [(kind, arg) for kind, arg, *_ in owner.messages] == [(Msg.FRAME, 5)]
    reason, who = owner.closed[0]
    assert reason.startswith("malformed input: ")
    assert who == polled.loop_thread
    theirs.settimeout(WAIT)
    reply = b""
    while chunk := theirs.recv(65536):
        reply += chunk
    _, kind, _, _ = ENVELOPE.unpack_from(reply)
    assert Msg(kind) is Msg.ERROR, "the sender must be told why it was cut off"


def _held_by_another_thread(channel: Channel) -> bool:
    if channel.read_lock.acquire(blocking=False):
        channel.read_lock.release()
        return False
    return True


def test_descriptors_beyond_the_one_pool_close_the_connection_and_are_not_kept(polled: _Polled) -> None:
    # Only POOL carries a descriptor, once; a peer passing more could fill this process's table.
    owner, theirs = polled.owner, polled.theirs
    with tempfile.TemporaryFile() as passed:
        before = set(os.listdir("/proc/self/fd"))
        fds = array.array("i", [passed.fileno()] * 3)
        theirs.sendmsg([envelope(Msg.FRAME, 3, 1) + b"abc"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        wait_until(lambda: bool(owner.closed), "the loop closed the channel")
    reason, _ = owner.closed[0]
    assert reason == (
        "malformed input: the peer passed 3 file descriptor(s); this connection takes 1 more (only POOL carries one, "
        "once)"
    )
    assert owner.messages == [], "the message that came with them is not handled"
    wait_until(lambda: not set(os.listdir("/proc/self/fd")) - before, "every descriptor that arrived is closed")


def test_drain_wakes_when_a_polling_thread_sent_what_it_waited_for(polled: _Polled) -> None:
    # drain() saw acknowledgements that a polling thread had queued while it parsed; that thread then
    # sent them itself. Once, nobody told drain(), which waited out its caller's timeout (closing a
    # connection took 2 s more).
    channel = polled.channel
    channel._corked = True  # as while a polling thread parses: its replies are queued, then flushed
    channel.write(b"d" * 100)
    channel._corked = False
    drained = asyncio.run_coroutine_threadsafe(channel.drain(), polled.loop)
    wait_until(lambda: bool(channel._drain_waiters), "drain() waits for the queued bytes")
    flusher = threading.Thread(target=channel._flush_here)
    flusher.start()
    flusher.join(WAIT)
    drained.result(1)  # before the fix: TimeoutError
    polled.theirs.settimeout(WAIT)
    assert polled.theirs.recv(4096) == b"d" * 100


def _hold_loop(loop: asyncio.AbstractEventLoop) -> threading.Event:
    """Keep ``loop`` busy until the returned event is set (it then flushes nothing meanwhile)."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(WAIT)

    loop.call_soon_threadsafe(hold)
    assert holding.wait(WAIT)
    return release


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    sock.settimeout(WAIT)
    got = bytearray()
    while len(got) < nbytes:
        chunk = sock.recv(min(MiB, nbytes - len(got)))
        assert chunk, "the channel closed the connection"
        got += chunk
    return bytes(got)


def test_a_message_the_socket_takes_only_in_part_is_finished_before_the_next_one(polled: _Polled) -> None:
    # A caller's thread sends straight to the socket; what a full socket does not take is queued
    # and finished by the loop. A message written meanwhile goes behind it, even when the socket
    # has room again by then.
    channel, theirs = polled.channel, polled.theirs
    big = random_bytes(4 * MiB, 41).numpy().tobytes()
    release = _hold_loop(polled.loop)
    try:
        channel.write_threadsafe(big[:1000], memoryview(big)[1000:])
        assert channel._out, "a 4 MiB message should not fit the socket at once"
        head = _recv_exactly(theirs, 128 << 10)  # room in the socket, while the loop cannot flush
        channel.write_threadsafe(b"after")
    finally:
        release.set()
    rest = _recv_exactly(theirs, len(big) + len(b"after") - len(head))
    assert head + rest == big + b"after"
    wait_until(lambda: not channel._out, "the loop sent everything queued")


def test_a_message_the_loop_writes_is_finished_when_the_socket_has_room(polled: _Polled) -> None:
    channel = polled.channel
    big = random_bytes(4 * MiB, 42).numpy().tobytes()
    polled.loop.call_soon_threadsafe(lambda: channel.write(b"x" * 10, big))
    assert _recv_exactly(polled.theirs, 10 + len(big)) == b"x" * 10 + big


def test_an_empty_part_after_a_partial_send_does_not_stall_the_connection(polled: _Polled) -> None:
    # An empty part that is not a flat byte view (shape (0, 3)) cannot be cast to bytes; queueing
    # the rest of a partly sent message once raised on it, left the rest queued with nobody told to
    # flush it, and every later write waited behind it.
    channel = polled.channel
    big = random_bytes(4 * MiB, 43).numpy().tobytes()
    empty = memoryview(torch.zeros((0, 3), dtype=torch.uint8).numpy())
    writer = threading.Thread(target=channel.write_threadsafe, args=(big, empty, b"tail"))
    writer.start()
    writer.join(WAIT)
    assert _recv_exactly(polled.theirs, len(big) + 4) == big + b"tail"


def test_a_part_that_is_not_one_block_of_bytes_queues_nothing(polled: _Polled) -> None:
    channel = polled.channel
    strided = memoryview(torch.arange(16, dtype=torch.uint8).numpy())[::2]
    with pytest.raises((TypeError, BufferError)):  # nothing queued: straight to the socket, refused whole
        channel.write_threadsafe(b"head", strided)
    release = _hold_loop(polled.loop)
    try:
        channel.write_threadsafe(b"x" * (4 * MiB))  # fills the socket: the next write queues
        assert channel._out
        queued = len(channel._out)
        for write in (channel.write_threadsafe, channel.write):  # the second as on a polling thread
            with pytest.raises((TypeError, BufferError)):
                write(b"head", strided)
            assert len(channel._out) == queued, "no part of the refused message may be queued"
    finally:
        release.set()
    assert _recv_exactly(polled.theirs, 4 * MiB) == b"x" * (4 * MiB)
    channel.write_threadsafe(b"after")  # the connection goes on
    assert _recv_exactly(polled.theirs, 5) == b"after"


def test_descriptors_go_with_the_first_byte_even_after_an_empty_part(polled: _Polled) -> None:
    with tempfile.TemporaryFile() as passed:
        _on_loop(polled.loop, lambda: polled.channel.write(b"", b"abc", fds=[passed.fileno()]))
        polled.theirs.settimeout(WAIT)
        data, ancdata, _, _ = polled.theirs.recvmsg(16, socket.CMSG_SPACE(array.array("i").itemsize))
    assert data == b"abc"
    assert [(level, kind) for level, kind, _ in ancdata] == [(socket.SOL_SOCKET, socket.SCM_RIGHTS)]
    os.close(array.array("i", ancdata[0][2]).tolist()[0])


def test_a_passed_descriptor_arrives_close_on_exec(polled: _Polled) -> None:
    # Until its owner took it, a received pool descriptor was inheritable: a child process started by
    # another thread meanwhile kept the peer's pool open.
    with tempfile.TemporaryFile() as passed:
        fds = array.array("i", [passed.fileno()])
        polled.theirs.sendmsg([envelope(Msg.POOL, 8) + bytes(8)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        wait_until(lambda: bool(polled.owner.messages), "the loop read the POOL message")
        assert polled.owner.messages[0][0] is Msg.POOL
        fd = _on_loop(polled.loop, polled.channel.take_fd)
        try:
            assert os.path.samestat(os.fstat(fd), os.fstat(passed.fileno())), "the passed file arrived"
            assert not os.get_inheritable(fd), "a passed descriptor must arrive close-on-exec"
        finally:
            os.close(fd)


def test_a_hang_up_while_a_thread_polls_closes_the_channel_on_the_loop(polled: _Polled) -> None:
    # A hang-up is reported even for a socket the loop is told to ignore; the polling thread sees it
    # too and hands the channel back, and the loop closes it.
    owner = polled.owner
    polling = threading.Thread(target=polled.readers.poll_here, args=(lambda: bool(owner.closed), 5.0))
    polling.start()
    wait_until(lambda: _held_by_another_thread(polled.channel), "it polls")
    start = time.monotonic()
    polled.theirs.close()
    polling.join(5)
    assert time.monotonic() - start < 2, "the polling thread lets go at the hang-up, not at the end of its budget"
    wait_until(lambda: bool(owner.closed), "the loop closed the channel")
    assert owner.closed == [("the peer closed the connection", polled.loop_thread)]


def test_a_channel_closed_while_a_thread_polls_it_waits_for_the_thread(polled: _Polled) -> None:
    channel = polled.channel
    polling = threading.Thread(target=polled.readers.poll_here, args=(lambda: False, 0.3))
    polling.start()
    wait_until(lambda: _held_by_another_thread(channel), "it polls")
    _on_loop(polled.loop, lambda: channel.close("closing under the poll"))
    polling.join(5)
    assert not polling.is_alive()
    assert polled.owner.closed == [("closing under the poll", polled.loop_thread)]
    assert channel.sock.fileno() == -1, "the socket is closed once the polling thread let it go"
    assert polled.theirs.recv(1) == b"", "the peer sees the connection end"


def test_a_closed_channels_number_reused_by_a_new_connection_is_not_silenced(polled: _Polled) -> None:
    # A polling thread works from a snapshot of the channels: it may try to take one the loop has
    # closed meanwhile, whose descriptor number a new connection already has.
    old = polled.channel
    number = old.fileno
    _on_loop(polled.loop, lambda: old.close("closed before the poll reached it"))
    reused, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if reused.fileno() != number:  # the kernel hands out the lowest free number; make sure of it
        os.dup2(reused.fileno(), number)
        reused.close()
        reused = socket.socket(fileno=number)
    owner = _Owner()
    new = _another_channel(polled, reused, owner, "new channel")
    try:
        assert new.fileno == number
        assert not polled.readers._take(old, WAIT), "a closed channel is never taken"
        theirs.sendall(envelope(Msg.FRAME, 2, 1) + b"hi")
        wait_until(lambda: len(owner.messages) == 1, "the loop still reads the new connection")
        assert owner.messages[0][:3] == (Msg.FRAME, 1, b"hi")
    finally:
        _on_loop(polled.loop, lambda: new.close("test over"))
        theirs.close()


def test_a_socket_the_polling_thread_does_not_hold_is_read_by_the_loop_at_once(polled: _Polled) -> None:
    # A polling thread silences every socket for the loop at once; one it did not take (here, a
    # connection with no kinds it may handle) must not wait for the end of the thread's budget.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    owner = _Owner()
    other = _another_channel(polled, ours, owner, "other channel")
    polling = threading.Thread(target=polled.readers.poll_here, args=(lambda: False, 5.0))
    try:
        polling.start()
        wait_until(lambda: _held_by_another_thread(polled.channel), "it polls")
        start = time.monotonic()
        theirs.sendall(envelope(Msg.FRAME, 2, 1) + b"hi")
        wait_until(lambda: len(owner.messages) == 1, "the loop read the other connection")
        assert time.monotonic() - start < 2, "the other connection waited for the polling thread's budget"
        assert owner.messages[0] == (Msg.FRAME, 1, b"hi", polled.loop_thread)
        polled.theirs.sendall(envelope(Msg.FRAME, 2, 2) + b"ok")
        wait_until(lambda: len(polled.owner.messages) == 1, "the polled connection is read again")
    finally:
        polling.join(6)
        _on_loop(polled.loop, lambda: other.close("test over"))
        theirs.close()


def test_a_second_polling_thread_returns_at_once(polled: _Polled) -> None:
    first = threading.Thread(target=polled.readers.poll_here, args=(lambda: False, 0.5))
    first.start()
    wait_until(lambda: _held_by_another_thread(polled.channel), "it polls")
    start = time.monotonic()
    polled.readers.poll_here(lambda: False, 5.0)
    assert time.monotonic() - start < 0.2, "a second thread must not wait for the first one's budget"
    first.join(5)


@pytest.mark.parametrize(("poll_us", "here"), [(10_000, True), (0, False)])
def test_replies_are_read_by_the_thread_waiting_for_them(
    env: dict[str, str], peer: PeerProcess, monkeypatch: pytest.MonkeyPatch, poll_us: int, here: bool
) -> None:
    rank = 7 if here else 8
    with local_sidecar({**env, "SIDECAR_LOCALHOST__RECV_POLL_US": str(poll_us)}, rank) as sidecar:
        peer.call(peer_send, "hello", f"hello-{rank}", rank)  # both connections exist before the first wait
        assert sidecar.recv_sync(f"hello-{rank}", timeout=WAIT) == "hello"
        me = threading.get_ident()
        handled_here: dict[str, bool] = {}
        store = sidecar._store
        deliver = store.deliver

        def noting(frame: Any, release: Any = None) -> None:
            handled_here[frame.header.id] = threading.get_ident() == me
            deliver(frame, release)

        monkeypatch.setattr(store, "deliver", noting)
        count = 40
        # The guide promises that callbacks run on the sidecar's thread, never inside recv_sync (one
        # attached to a future that is already done runs at once, in the thread attaching it).
        callbacks: list[tuple[str, bool]] = []
        in_recv = threading.Event()
        call = peer.submit(peer_echo, count, rank)
        for i in range(count):
            sent = sidecar.send({"i": i}, f"in-{rank}-{i}", 1)
            sent.add_done_callback(lambda _: callbacks.append((threading.current_thread().name, in_recv.is_set())))
            in_recv.set()
            assert sidecar.recv_sync(f"out-{rank}-{i}", timeout=WAIT) == {"i": i}
            in_recv.clear()
            sidecar.mark_done_sync(f"out-{rank}-{i}")
            sent.result(WAIT)
        call.result(WAIT)
        wait_until(lambda: len(callbacks) == count, "every callback ran")
    inside = [name for name, during_recv in callbacks if during_recv and name == threading.current_thread().name]
    assert not inside, f"{len(inside)} callbacks ran inside recv_sync"
    assert any(name == f"sidecar-{rank}" for name, _ in callbacks)
    replies_here = sum(handled_here[f"out-{rank}-{i}"] for i in range(count))
    if here:
        # A reply that comes after the 10 ms budget (a busy machine) goes through the loop.
        assert replies_here > count // 2, f"only {replies_here} of {count} replies were read by the waiting thread"
    else:
        assert replies_here == 0, "with SIDECAR_LOCALHOST__RECV_POLL_US=0 the loop reads every reply"


@pytest.mark.parametrize(("poll_us", "here"), [(10_000, True), (0, False)])
def test_acknowledgements_are_read_by_the_thread_waiting_in_result(
    env: dict[str, str], peer: PeerProcess, monkeypatch: pytest.MonkeyPatch, poll_us: int, here: bool
) -> None:
    rank = 11 if here else 12
    count = 30
    with local_sidecar({**env, "SIDECAR_LOCALHOST__RECV_POLL_US": str(poll_us)}, rank) as sidecar:
        sidecar.send(0, f"acks-{rank}-hello", 1).result(WAIT)  # connected: the sends below take the fast path
        link = transport(sidecar)._links[1]
        me = threading.get_ident()
        read_here: list[bool] = []
        report = link._report

        def noting(entry: Any, outcome: Exception | None) -> None:
            read_here.append(threading.get_ident() == me)
            report(entry, outcome)

        monkeypatch.setattr(link, "_report", noting)
        for i in range(count):
            sidecar.send(i, f"acks-{rank}-{i}", 1).result(WAIT)
    ids = [f"acks-{rank}-hello", *(f"acks-{rank}-{i}" for i in range(count))]
    assert peer.call(peer_recv_values, ids) == [0, *range(count)]
    assert len(read_here) == count
    if here:
        # The loop reads an acknowledgement that comes before result() starts polling (the peer can
        # answer while this thread is between send() and result()), or after the 10 ms budget.
        assert sum(read_here) > count // 2, f"only {sum(read_here)} of {count} were read by the waiting thread"
    else:
        assert not any(read_here), "with SIDECAR_LOCALHOST__RECV_POLL_US=0 the loop reads every acknowledgement"


def test_shared_memory_frames_and_loop_sends_are_served_while_a_thread_polls(
    env: dict[str, str], peer: PeerProcess, peer2: PeerProcess
) -> None:
    with local_sidecar({**env, "SIDECAR_LOCALHOST__RECV_POLL_US": "10000"}, 9) as sidecar:
        peer.call(peer_send, "hello", "mixed-hello", 9)
        assert sidecar.recv_sync("mixed-hello", timeout=WAIT) == "hello"
        # A broadcast goes through the loop's send: its acknowledgements, read by the polling
        # thread below, must settle it on the loop.
        broadcast = sidecar.send({"to": "both"}, "mixed-broadcast", [[1], [2]])
        big = peer.submit(peer_send_random, 2 * MiB, 11, "mixed-big", 9)  # a shared-memory frame
        small = peer.submit(peer_send, 5, "mixed-small", 9)
        got = sidecar.recv_sync("mixed-big", timeout=WAIT)
        assert _digest(got) == _digest(random_bytes(2 * MiB, 11))
        del got
        sidecar.mark_done_sync("mixed-big")
        assert sidecar.recv_sync("mixed-small", timeout=WAIT) == 5
        big.result(WAIT)
        small.result(WAIT)
        broadcast.result(WAIT)
    assert peer.call(peer_recv_values, ["mixed-broadcast"]) == [{"to": "both"}]
    assert peer2.call(peer_recv_values, ["mixed-broadcast"]) == [{"to": "both"}]


class _HookThreads:
    """A plugin noting the thread each observability hook ran on."""

    def __init__(self) -> None:
        self.threads: list[tuple[str, str]] = []

    @hookimpl
    def sidecar_on_send(
        self, id: str, chunk_id: int, dst_rank: int, nbytes: int, seconds: float, transport: str
    ) -> None:
        self.threads.append(("send", threading.current_thread().name))

    @hookimpl
    def sidecar_on_recv(self, id: str, chunk_id: int, src_rank: int, nbytes: int, transport: str) -> None:
        self.threads.append(("recv", threading.current_thread().name))


class _FailingHooks:
    """A plugin whose observability hooks raise."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def sidecar_on_send(
        self, id: str, chunk_id: int, dst_rank: int, nbytes: int, seconds: float, transport: str
    ) -> None:
        self.calls.append(f"send {id}")
        raise RuntimeError("a broken send hook")

    @hookimpl
    def sidecar_on_recv(self, id: str, chunk_id: int, src_rank: int, nbytes: int, transport: str) -> None:
        self.calls.append(f"recv {id}")
        raise RuntimeError("a broken recv hook")


def test_hooks_that_raise_neither_fail_nor_hang_a_transfer(env: dict[str, str], peer: PeerProcess) -> None:
    hooks = _FailingHooks()
    with environment(env):
        sidecar = Sidecar(SidecarConfig(sidecar_rank=12), registry=build_registry(extra_plugins=(hooks,)))
    try:
        sidecar.send(1, "failing-hook-out", 1).result(WAIT)  # the caller's thread, then the acknowledgement
        data = random_bytes(64 * 1024, 11)  # through the shared-memory pool
        peer.call(peer_send, data, "failing-hook-in", 12)
        got = sidecar.recv_sync("failing-hook-in", timeout=WAIT)
        assert torch.equal(got, data)
        sidecar.mark_done_sync("failing-hook-in")
        assert peer.call(peer_recv_values, ["failing-hook-out"]) == [1]
        assert "send failing-hook-out" in hooks.calls
        wait_until(lambda: "recv failing-hook-in" in hooks.calls, "the receive hook ran")
    finally:
        sidecar.shutdown_sync()


def test_hooks_run_on_the_sidecars_thread_while_a_thread_polls(env: dict[str, str], peer: PeerProcess) -> None:
    hooks = _HookThreads()
    registry = build_registry(extra_plugins=(hooks,))
    with environment({**env, "SIDECAR_LOCALHOST__RECV_POLL_US": "10000"}):
        sidecar = Sidecar(SidecarConfig(sidecar_rank=10), registry=registry)
    try:
        peer.call(peer_send, "hello", "hooks-hello", 10)
        assert sidecar.recv_sync("hooks-hello", timeout=WAIT) == "hello"
        count = 20
        call = peer.submit(peer_echo, count, 10)
        for i in range(count):
            sent = sidecar.send(i, f"in-10-{i}", 1)
            assert sidecar.recv_sync(f"out-10-{i}", timeout=WAIT) == i
            sent.result(WAIT)
        call.result(WAIT)
        wait_until(lambda: len(hooks.threads) >= 2 * count + 1, "every hook ran")
    finally:
        sidecar.shutdown_sync()
    assert {kind for kind, _ in hooks.threads} == {"send", "recv"}
    assert {name for _, name in hooks.threads} == {"sidecar-10"}, "hooks must run on the sidecar's thread"
