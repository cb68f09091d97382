"""Where one transfer's time goes over the ucx transport: p50 of each step, stamped in both processes.

Rank 0 sends a tensor, rank 1 receives it, checks its first and last byte, marks it done and sends
back an int; rank 0 receives that (the loop of ``sidecar bench``). Both processes stamp each step
with ``time.perf_counter`` (one clock on one host), the transport's internal steps through
wrappers around its receive path, so a step between the processes is the time from one stamp to
the next::

    python benchmarks/ucx_steps.py [DEVICE] [BYTES] [TRANSFERS]    # e.g. cuda:0 1073741824 40

``DEVICE`` (default ``cpu``) holds both sides' tensors; the receiver receives on it. ``BYTES``
(default 1 MiB) must be over 8 KiB, so that the payload travels apart from its header. The first
fifth of the transfers warm up and are not counted. Settings come from the environment as usual
(``SIDECAR_UCX__PROGRESS_MODE``, ``SIDECAR_UCX__RECV_POLL_US``, ``UCX_*``).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The steps in the order they happen: (process, stamp, what ends there).
STEPS = [
    ("send", "send", "rank 0 calls send()"),
    ("send", "sent", "send() returned"),
    ("recv", "header", "rank 1's loop takes the header"),
    ("recv", "posted", "the payload's receive is posted"),
    ("recv", "deliver", "the payload arrived: the store takes it"),
    ("recv", "received", "recv_sync() returned"),
    ("recv", "checked", "first and last byte checked"),
    ("recv", "done", "mark_done() returned"),
    ("recv", "acked", "send() of the int returned"),
    ("send", "header", "rank 0's loop takes the int's header"),
    ("send", "deliver", "the store takes the int"),
    ("send", "received", "recv_sync() returned"),
    ("send", "end", "mark_done() and the tensor's result() returned"),
]


def _stamping() -> dict[str, list[float]]:
    """Stamp the transport's receive steps (the wrapped methods' names are the stamps)."""
    from transports.ucx._inbound import Inbound

    stamps: dict[str, list[float]] = {}

    def wrap(name: str, stamp: str, *, after: bool = False) -> None:
        method: Callable[..., Any] = getattr(Inbound, name)

        def stamped(*args: Any, **kwargs: Any) -> Any:
            if not after:
                stamps.setdefault(stamp, []).append(time.perf_counter())
            result = method(*args, **kwargs)
            if after:
                stamps.setdefault(stamp, []).append(time.perf_counter())
            return result

        setattr(Inbound, name, stamped)

    wrap("_take_header", "header")
    wrap("_receive", "posted", after=True)
    wrap("_deliver", "deliver")
    return stamps


def _side(rank: int, env: dict[str, str], device: str, nbytes: int, count: int, out: Any) -> None:
    os.environ.update(env)
    import torch

    from sidecar_core import Sidecar, SidecarConfig

    if device != "cpu":
        torch.cuda.set_device(torch.device(device))
    stamps = _stamping()

    def stamp(name: str) -> None:
        stamps.setdefault(name, []).append(time.perf_counter())

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    settings = {"recv_device": device} if rank == 1 and device != "cpu" else {}
    with Sidecar(SidecarConfig(sidecar_rank=rank, settings=settings)) as sidecar:
        peer = 1 - rank
        # Both connections exist, and rank 1 stamps nothing more of them, before rank 0 starts.
        if rank == 0:
            sidecar.send("hello", "hello", peer).result()
            sidecar.recv_sync("go")
            sidecar.mark_done_sync("go")
            stamps.clear()
        else:
            sidecar.recv_sync("hello")
            sidecar.mark_done_sync("hello")
            stamps.clear()
            sidecar.send("go", "go", peer).result()
        pending = None
        for i in range(count):
            value = i % 250 + 1
            if rank == 0:
                tensor = torch.full((nbytes,), value, dtype=torch.uint8, device=device)
                sync()
                stamp("send")
                future = sidecar.send(tensor, f"t{i}", peer)
                stamp("sent")
                ack = sidecar.recv_sync(f"a{i}")
                stamp("received")
                sidecar.mark_done_sync(f"a{i}")
                future.result()
                stamp("end")
                assert ack == i, f"acknowledgement {ack} for transfer {i}"
            else:
                if pending is not None:  # as the benchmark does: the last int acknowledged by now
                    pending.result()
                got = sidecar.recv_sync(f"t{i}")
                stamp("received")
                sync()
                flat = got.view(-1)
                assert (int(flat[0]), int(flat[-1])) == (value, value), f"transfer {i} arrived wrong"
                stamp("checked")
                del got, flat
                sidecar.mark_done_sync(f"t{i}")
                stamp("done")
                pending = sidecar.send(i, f"a{i}", peer)
                stamp("acked")
        if pending is not None:
            pending.result()
    out.put((rank, stamps))


def main() -> None:
    """Run both sides and print the p50 of each step."""
    from transports.ucx import UcxTransport

    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    nbytes = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 20
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    if nbytes <= 8 << 10:
        sys.exit("BYTES must be over 8 KiB: smaller payloads ride inside the header message")
    with tempfile.TemporaryDirectory() as workdir:
        env = {"SIDECAR_TRANSPORT": "ucx", **UcxTransport.test_environment(Path(workdir))}
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        sides = [ctx.Process(target=_side, args=(rank, env, device, nbytes, count, out)) for rank in (1, 0)]
        for process in sides:
            process.start()
        stamps = dict(out.get(timeout=600) for _ in sides)
        for process in sides:
            process.join()
    skip = count // 5
    rows = [stamps[0 if side == "send" else 1][name][skip:] for side, name, _ in STEPS]
    print(f"ucx, {nbytes} bytes on {device}, p50 of {count - skip} transfers:")
    for (_, _, what), before, after in zip(STEPS[1:], rows[:-1], rows[1:], strict=True):
        print(f"  {statistics.median(b - a for a, b in zip(before, after, strict=True)) * 1e6:8.1f} us  {what}")
    total = statistics.median(b - a for a, b in zip(rows[0], rows[-1], strict=True))
    print(f"  {total * 1e6:8.1f} us  in all ({nbytes / total / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
