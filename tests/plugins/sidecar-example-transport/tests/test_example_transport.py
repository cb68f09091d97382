"""``example-tcp``: the transport conformance suite, plus what only this transport has.

Run with ``pytest -p sidecar_core.testing`` (this package's pytest settings pass it already).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from sidecar_example_transport.transport import ACK, HELLO, HELLO_MAGIC, OK, REJECTED, ExampleTcpTransport

from sidecar_core import AuthenticationError, RecvTimeoutError, Sidecar, SidecarConfig
from sidecar_core.testing import TransportConformance


class TestExampleTcp(TransportConformance):
    sidecar_transports = ("example-tcp",)


# -- what the suite cannot see: the hello, the auth token, strangers on the port -----------------


@pytest.fixture
def settings(tmp_path: Path) -> dict[str, Any]:
    env = ExampleTcpTransport.test_environment(tmp_path)
    return {"base_port": int(env["SIDECAR_BASE_PORT"]), "is_local": True, "connect_timeout": 2, "send_timeout": 10}


def make(rank: int, settings: dict[str, Any], **extra: Any) -> Sidecar:
    return Sidecar(SidecarConfig(sidecar_rank=rank, transport="example-tcp", settings={**settings, **extra}))


def test_auth_token(settings: dict[str, Any]) -> None:
    with make(1, settings, auth_token="right") as receiver:
        with make(0, settings, auth_token="wrong") as intruder, pytest.raises(AuthenticationError) as info:
            intruder.send(b"x", "denied", 1).result(30)
        assert "rank 1 refused rank 0: wrong or missing auth token" in str(info.value)
        with make(2, settings) as anonymous, pytest.raises(AuthenticationError):
            anonymous.send(b"x", "denied", 1).result(30)
        with make(3, settings, auth_token="right") as friend:
            friend.send(b"welcome", "allowed", 1).result(30)
        assert receiver.recv_sync("allowed", timeout=10) == b"welcome"
        with pytest.raises(RecvTimeoutError):  # nothing from the refused ranks was stored
            receiver.recv_sync("denied", timeout=0.2)


def test_strangers_are_hung_up_on_and_the_rank_keeps_serving(settings: dict[str, Any]) -> None:
    with make(1, settings) as receiver, make(0, settings) as sender:
        port = settings["base_port"] + 1
        with socket.create_connection(("127.0.0.1", port), timeout=5) as stranger:
            stranger.sendall(b"GET / HTTP/1.1\r\n\r\n")
            stranger.settimeout(5)
            assert stranger.recv(100) == b""  # closed without an answer
        with socket.create_connection(("127.0.0.1", port), timeout=5) as liar:
            liar.sendall(HELLO.pack(HELLO_MAGIC, 7, 0))
            liar.settimeout(5)
            assert liar.recv(ACK.size) == ACK.pack(OK, 0)
            liar.sendall(b"NOPE" + bytes(4))  # not a frame: rejected, then hung up on
            status, length = ACK.unpack(liar.recv(ACK.size))
            reason = liar.recv(length).decode()
            assert status == REJECTED
            assert "bad frame magic" in reason
            assert liar.recv(10) == b""
        sender.send(b"still here", "after", 1).result(30)
        assert receiver.recv_sync("after", timeout=10) == b"still here"
