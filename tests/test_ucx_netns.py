"""Two sidecars on two simulated hosts: network namespaces joined by a veth pair, ucx over TCP.

The test makes two namespaces and a veth pair between them (addresses in ``10.254.0.0/16``, which
exist only inside those namespaces), starts one sidecar in each with ``ip netns exec``, addressed by
``SIDECAR_PEERS`` as a multi-host deployment would be, and always removes the namespaces (which
removes the veth pair). The namespaces have no route anywhere else, so no traffic leaves them.
UCX is limited to TCP on the veth (``UCX_TLS=tcp``, ``UCX_NET_DEVICES``): shared memory would
otherwise join two "hosts" that share one kernel. Needs root and iproute2; skipped (with the reason)
where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("ucxx", reason="ucxx is not installed: pip install 'sidecar[ucx]'")

pytestmark = [pytest.mark.multiprocess, pytest.mark.transport("ucx")]

PEER = Path(__file__).with_name("_ucx_netns_peer.py")
REPO = PEER.parents[1]
NBYTES = 8 << 20
WAIT = 60


@dataclass(frozen=True)
class Host:
    netns: str
    veth: str
    address: str


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def tx_bytes(host: Host) -> int:
    out = ip("-n", host.netns, "-s", "-j", "link", "show", host.veth)
    return int(json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"])


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed: cannot make network namespaces")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    tag = secrets.token_hex(3)
    subnet = f"10.254.{secrets.randbelow(250) + 1}"
    a = Host(f"sidecar-test-{tag}-a", f"scx{tag}a", f"{subnet}.1")
    b = Host(f"sidecar-test-{tag}-b", f"scx{tag}b", f"{subnet}.2")
    made: list[str] = []
    try:
        for host in (a, b):
            result = ip("netns", "add", host.netns)
            if result.returncode != 0:
                pytest.skip(f"cannot make a network namespace here: {result.stderr.strip()}")
            made.append(host.netns)
        steps = [
            ("link", "add", a.veth, "netns", a.netns, "type", "veth", "peer", "name", b.veth, "netns", b.netns),
            *(
                step
                for host in (a, b)
                for step in (
                    ("-n", host.netns, "addr", "add", f"{host.address}/30", "dev", host.veth),
                    ("-n", host.netns, "link", "set", host.veth, "up"),
                    ("-n", host.netns, "link", "set", "lo", "up"),
                )
            ),
        ]
        for step in steps:
            result = ip(*step)
            assert result.returncode == 0, f"ip {' '.join(step)} failed: {result.stderr.strip()}"
        yield a, b
    finally:
        for netns in made:
            ip("netns", "del", netns)  # also removes the veth pair


def peer_env(rank: int, host: Host, peers: dict[int, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SIDECAR_", "UCX_"))}
    env.update(
        {
            "SIDECAR_TRANSPORT": "ucx",
            "SIDECAR_RANK": str(rank),
            "SIDECAR_PEERS": json.dumps({str(r): address for r, address in peers.items()}),
            "SIDECAR_CONNECT_TIMEOUT": "10",
            "SIDECAR_SEND_TIMEOUT": "30",
            "UCX_TLS": "tcp",
            "UCX_NET_DEVICES": host.veth,
            "UCX_WARN_UNUSED_ENV_VARS": "n",
        }
    )
    return env


def in_netns(host: Host, *args: str) -> list[str]:
    return ["ip", "netns", "exec", host.netns, sys.executable, str(PEER), *args]


@pytest.mark.host_capability
def test_two_hosts_over_a_veth_pair(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    peers = {0: f"{a.address}:19100", 1: f"{b.address}:19101"}
    before = tx_bytes(a)
    receiver = subprocess.Popen(
        in_netns(b, "recv", "across"),
        env=peer_env(1, b, peers),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdin is not None
        ready = receiver.stdout.readline().strip()
        assert ready == "ready", (
            f"receiver did not start: {ready!r} {receiver.stderr.read() if receiver.stderr else ''}"
        )
        sender = subprocess.run(
            in_netns(a, "send", "across", str(NBYTES), "5", "1"),
            env=peer_env(0, a, peers),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert sender.returncode == 0, sender.stderr
        received = json.loads(receiver.stdout.readline())
        receiver.stdin.write("stop\n")
        receiver.stdin.flush()
        assert receiver.wait(WAIT) == 0, receiver.stderr.read() if receiver.stderr else ""
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(10)
    outcome = json.loads(sender.stdout)
    assert received == {"digest": outcome["sent"], "nbytes": NBYTES, "rank": 1}
    assert outcome["answer"] == received  # and back, over rank 1's own connection to rank 0
    assert tx_bytes(a) - before >= NBYTES, "the payload did not cross the veth pair"
