"""Small-message latency through one transport, between this process (rank 0) and a spawned peer.

Prints the p50 of ``send(...).result()`` for an int (send to acknowledgement), the p50/p99 of an
echo round trip (rank 0 sends, rank 1 receives and sends it back, rank 0 receives), and the CPU
time each process spent per echo round trip (user and system, from ``getrusage``). Where the
CPU time of the two processes adds up to more than the cores can give during a round trip, the
round trip is bound by that work rather than by waiting::

    python benchmarks/latency.py localhost [ROUND_TRIPS]
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from sidecar_core import Sidecar, SidecarConfig, get_registry
from sidecar_core.testing import PeerProcess


def cpu_seconds() -> tuple[float, float]:
    """User and system CPU seconds this process has used so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def echo(sidecar: Sidecar, count: int) -> tuple[float, float]:
    """Send every ping back; returns the user and system CPU seconds spent doing it."""
    sent = []
    user, system = cpu_seconds()
    for i in range(count):
        value = sidecar.recv_sync("ping", i)
        sent.append(sidecar.send(value, "pong", [[0]], chunk_id=i, num_chunks=count))
    for future in sent:  # every reply acknowledged before rank 0 may shut down
        future.result()
    after = cpu_seconds()
    return after[0] - user, after[1] - system


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "localhost"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    transport = get_registry().load_transport(name)
    env = {**transport.test_environment(Path(tempfile.mkdtemp())), "SIDECAR_TRANSPORT": name}
    os.environ.update(env)
    with PeerProcess(1, env) as peer, Sidecar(SidecarConfig(sidecar_rank=0)) as sidecar:
        acks = []
        for i in range(count):
            start = time.perf_counter()
            sidecar.send(i, "ack", [[1]], chunk_id=i, num_chunks=count).result()
            acks.append(time.perf_counter() - start)
        call = peer.submit(echo, count)
        trips = []
        user, system = cpu_seconds()
        for i in range(count):
            start = time.perf_counter()
            sidecar.send(i, "ping", [[1]], chunk_id=i, num_chunks=count)
            assert sidecar.recv_sync("pong", i) == i
            trips.append(time.perf_counter() - start)
        after = cpu_seconds()
        peer_user, peer_system = call.result()
    print(f"{name}: send+ack p50 {percentile(acks, 0.5):.0f} us")
    print(f"{name}: echo p50 {percentile(trips, 0.5):.0f} us, p99 {percentile(trips, 0.99):.0f} us")
    per_trip = 1e6 / count
    print(
        f"{name}: CPU per echo round trip: rank 0 {(after[0] - user) * per_trip:.0f} us user + "
        f"{(after[1] - system) * per_trip:.0f} us system, rank 1 {peer_user * per_trip:.0f} us user + "
        f"{peer_system * per_trip:.0f} us system"
    )


if __name__ == "__main__":
    main()
