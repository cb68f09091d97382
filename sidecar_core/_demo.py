"""``sidecar demo``: two real processes exchange a tensor, a dict and a stream, then measure.

This process is rank 0; it spawns rank 1, which echoes everything it receives back. Rank 0 checks
that what came back equals what it sent, then times a large tensor and a small-message round trip.
The demo runs in a private deployment of the transport (its own directory and ports, from
``Transport.test_environment``), so it never meets a sidecar already running on this host.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from sidecar_core._client import Sidecar, SidecarConfig
from sidecar_core._errors import RecvTimeoutError, SidecarError
from sidecar_core._plugins import get_registry
from sidecar_core._settings import SidecarSettings, enter_private_environment, load_settings

PARENT, CHILD = 0, 1
STREAM_CHUNKS = 4
TIMED_SENDS = 5
ROUND_TRIPS = 50
#: How long rank 0 waits for rank 1 to start (spawning imports torch) and for each echo.
START_TIMEOUT = 60.0
STEP_TIMEOUT = 30.0
_POLL = 0.5


class DemoError(SidecarError, RuntimeError):
    """Something did not arrive intact, or rank 1 died."""


def main(transport: str | None = None, size_mib: int = 64) -> int:
    """Run the demo and print what arrived and how fast; return 0 only if everything arrived intact."""
    if size_mib <= 0:
        print("sidecar demo: --size-mib must be a positive number of MiB", file=sys.stderr)
        return 2
    name = transport or load_settings(SidecarSettings).transport_name
    transport_cls = get_registry().load_transport(name)
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as workdir:
        # Both ranks see these variables: rank 1 is spawned with this process's environment.
        enter_private_environment({"SIDECAR_TRANSPORT": name, **transport_cls.test_environment(Path(workdir))})
        with Sidecar(SidecarConfig(sidecar_rank=PARENT, transport=name)) as sidecar:
            print(f"sidecar demo over the {sidecar.transport_name} transport: rank {PARENT} (pid {os.getpid()})")
            child = multiprocessing.get_context("spawn").Process(target=_child_main, args=(name,), name="demo-rank1")
            child.start()
            try:
                _parent(sidecar, child, size_mib << 20)
            except Exception as exc:
                child.kill()
                print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            finally:
                child.join(STEP_TIMEOUT)
                if child.is_alive():
                    child.kill()
                    child.join()
    if child.exitcode != 0:
        print(f"FAILED: rank {CHILD} exited with code {child.exitcode}", file=sys.stderr)
        return 1
    print("OK: everything arrived intact")
    return 0


# -- rank 0 ------------------------------------------------------------------------------------


def _parent(sidecar: Sidecar, child: BaseProcess, size: int) -> None:
    def recv(id: str, chunk_id: int = 0, timeout: float = STEP_TIMEOUT) -> Any:
        return _recv_while_alive(sidecar, child, id, chunk_id, timeout)

    hello = recv("demo-hello", timeout=START_TIMEOUT)
    print(f"  rank {CHILD} started in a new process (pid {hello['pid']}) and said hello")

    tensor = torch.randn(4, 1024).to(torch.bfloat16)
    sidecar.send(tensor, "demo-tensor", [[CHILD]]).result()
    _check("tensor", tensor, recv("demo-tensor-echo"), _describe_tensor(tensor))
    sidecar.mark_done_sync("demo-tensor-echo")

    message = {"request": "req-42", "tokens": [101, 2009, 102], "params": {"temperature": 0.7, "stop": None}}
    sidecar.send(message, "demo-dict", [[CHILD]]).result()
    _check("dict", message, recv("demo-dict-echo"), f"{len(message)} keys: {', '.join(message)}")
    sidecar.mark_done_sync("demo-dict-echo")

    chunks = [torch.arange(i * 8, (i + 1) * 8) for i in range(STREAM_CHUNKS)]
    for i, chunk in enumerate(chunks):
        sidecar.send(chunk, "demo-stream", [[CHILD]], chunk_id=i, stream=True).result()
    sidecar.close_stream("demo-stream", STREAM_CHUNKS, [[CHILD]]).result()
    echoed: list[Any] = []
    while (chunk := recv("demo-stream-echo", len(echoed))) is not None:
        echoed.append(chunk)
    _check("stream", chunks, echoed, f"{STREAM_CHUNKS} chunks of {_describe_tensor(chunks[0])}, in order")
    for i in range(len(echoed)):
        sidecar.mark_done_sync("demo-stream-echo", i)

    big = torch.randint(0, 256, (size,), dtype=torch.uint8)
    sidecar.send(big, "demo-big-0", [[CHILD]]).result()  # the first send also warms the transport up
    _check("large tensor", big, recv("demo-big-echo"), _describe_tensor(big))
    sidecar.mark_done_sync("demo-big-echo")
    seconds = []
    for i in range(1, TIMED_SENDS + 1):
        start = time.perf_counter()
        sidecar.send(big, f"demo-big-{i}", [[CHILD]]).result()
        seconds.append(time.perf_counter() - start)
    rates = sorted(size / s / 1e9 for s in seconds)
    print(
        f"  throughput: {size >> 20} MiB tensor sent and acknowledged at {statistics.median(rates):.2f} GB/s "
        f"(median of {TIMED_SENDS}; best {rates[-1]:.2f} GB/s)"
    )

    round_trips = []
    for i in range(ROUND_TRIPS):
        start = time.perf_counter()
        sidecar.send(i, f"demo-ping-{i}", [[CHILD]])
        pong = recv(f"demo-pong-{i}")
        round_trips.append(time.perf_counter() - start)
        sidecar.mark_done_sync(f"demo-pong-{i}")
        if pong != i:
            raise DemoError(f"round trip {i}: sent {i}, rank {CHILD} answered {pong!r}")
    print(
        f"  round trip: small message there and back in {statistics.median(round_trips) * 1e6:.0f} µs "
        f"(median of {ROUND_TRIPS})"
    )


def _recv_while_alive(sidecar: Sidecar, child: BaseProcess, id: str, chunk_id: int, timeout: float) -> Any:
    """``recv_sync`` that gives up early when rank 1 has died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return sidecar.recv_sync(id, chunk_id, timeout=_POLL)
        except RecvTimeoutError:
            if not child.is_alive():
                raise DemoError(f"rank {CHILD} exited (code {child.exitcode}) before sending {id!r}") from None
            if time.monotonic() > deadline:
                raise


def _check(what: str, sent: Any, echoed: Any, summary: str) -> None:
    if not _equal(sent, echoed):
        raise DemoError(f"the {what} that came back differs from the one sent ({summary})")
    print(f"  {what:<13} {summary}: arrived at rank {CHILD} and came back intact")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b.to(a.device))
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b)


def _describe_tensor(t: torch.Tensor) -> str:
    shape = ", ".join(map(str, t.shape))
    return f"{str(t.dtype).removeprefix('torch.')}[{shape}] on {t.device.type}"


# -- rank 1 ------------------------------------------------------------------------------------


def _child_main(transport: str) -> None:
    """Rank 1: receive everything, send it back. Runs in a spawned process."""
    try:
        with Sidecar(SidecarConfig(sidecar_rank=CHILD, transport=transport)) as sidecar:
            _child(sidecar)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)


def _child(sidecar: Sidecar) -> None:
    def echo(id: str, back: str, chunk_id: int = 0, stream: bool = False) -> bool:
        value = sidecar.recv_sync(id, chunk_id, timeout=STEP_TIMEOUT)
        if value is None:  # past the end of a stream
            return False
        sidecar.send(value, back, [[PARENT]], chunk_id=chunk_id, stream=stream).result()
        sidecar.mark_done_sync(id, chunk_id)  # the value may be a view of transport memory: release it last
        return True

    sidecar.send({"pid": os.getpid()}, "demo-hello", [[PARENT]]).result()
    echo("demo-tensor", "demo-tensor-echo")
    echo("demo-dict", "demo-dict-echo")
    chunk_id = 0
    while echo("demo-stream", "demo-stream-echo", chunk_id, stream=True):
        chunk_id += 1
    sidecar.close_stream("demo-stream-echo", chunk_id, [[PARENT]]).result()
    echo("demo-big-0", "demo-big-echo")
    for i in range(1, TIMED_SENDS + 1):
        sidecar.recv_sync(f"demo-big-{i}", timeout=STEP_TIMEOUT)
        sidecar.mark_done_sync(f"demo-big-{i}")
    for i in range(ROUND_TRIPS):
        echo(f"demo-ping-{i}", f"demo-pong-{i}")
