"""Where one transfer's time goes over the ucx transport and over raw ucxx: p50 of each step, stamped in both processes.

Rank 0 sends a tensor, rank 1 receives it, checks its first and last byte, marks it done and sends
back an int; rank 0 receives that (the loop of ``sidecar bench``). Both processes stamp each step
with ``time.perf_counter`` (one clock on one host), the transport's internal steps through
wrappers around its send and receive paths, so a step between the processes is the time from one
stamp to the next. The same loop runs first over raw ucxx (the benchmark's ``ucxx`` peer: a tagged
send into a buffer the receiver posted ahead, an 8-byte tagged message back), so that each of the
transport's steps can be held against what raw ucxx spends on the same part of the transfer::

    python benchmarks/ucx_steps.py [DEVICE] [BYTES] [TRANSFERS]    # e.g. cuda:0 1073741824 40

``DEVICE`` (default ``cpu``) holds both sides' tensors; the receiver receives on it. ``BYTES``
(default 1 MiB) must be over 8 KiB, so that the payload travels apart from its header, and is
sent as one frame (``SIDECAR_CHUNK_SIZE`` is ignored). The first fifth of the transfers warm up
and are not counted. Other settings come from the environment as usual
(``SIDECAR_UCX__PROGRESS_MODE``, which raw ucxx uses too, ``UCX_*``).

A step from one process to the other may come out negative: a frame's header often reaches the
peer's loop before ``send()`` has returned on the sending thread. Each step is its own median, so
the steps need not add up to the median of the whole.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Seconds any one wait may take before the run is given up.
WAIT = 60.0

#: The transport's steps in the order they happen: (process, stamp, what ends there).
STEPS = [
    ("send", "send", "rank 0 calls send()"),
    ("send", "submitted", "the header and the payload are submitted"),
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

#: Raw ucxx's steps (the benchmark's ``ucxx`` peer), in the same form.
RAW_STEPS = [
    ("send", "send", "rank 0 calls send()"),
    ("recv", "received", "the tensor arrived: recv() returned"),
    ("recv", "checked", "first and last byte checked"),
    ("recv", "acked", "send() of the int returned"),
    ("send", "received", "rank 0's recv() of the int returned"),
]


def _stamp_transport(stamp: Callable[[str], None]) -> None:
    """Make the transport's steps call ``stamp`` (``submitted``, ``header``, ``posted``, ``deliver``)."""
    from transports.ucx._endpoint import Endpoint
    from transports.ucx._inbound import Inbound

    def wrap(
        owner: type, name: str, step: str, *, after: bool = False, when: Callable[..., bool] | None = None
    ) -> None:
        method: Callable[..., Any] = getattr(owner, name)

        def stamped(*args: Any, **kwargs: Any) -> Any:
            counts = when is None or when(*args, **kwargs)
            if counts and not after:
                stamp(step)
            result = method(*args, **kwargs)
            if counts and after:
                stamp(step)
            return result

        setattr(owner, name, stamped)

    # A frame with its payload apart (acknowledgements and ints go as one message).
    wrap(Endpoint, "submit", "submitted", after=True, when=lambda _self, messages: len(messages) > 1)
    wrap(Inbound, "_take_header", "header")
    wrap(Inbound, "_receive", "posted", after=True)
    wrap(Inbound, "_deliver", "deliver")


def _side(rank: int, env: dict[str, str], device: str, nbytes: int, count: int, out: Any) -> None:
    """One side of the transfers (rank 0 sends tensors, rank 1 answers ints); puts its stamps on ``out``."""
    os.environ.pop("SIDECAR_CHUNK_SIZE", None)
    os.environ.update(env)
    import torch

    from sidecar_core import Sidecar, SidecarConfig

    if device != "cpu":
        torch.cuda.set_device(torch.device(device))
    stamps: dict[str, list[float]] = {}

    def stamp(name: str) -> None:
        stamps.setdefault(name, []).append(time.perf_counter())

    _stamp_transport(stamp)

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    settings = {"recv_device": device} if rank == 1 and device != "cpu" else {}
    with Sidecar(SidecarConfig(sidecar_rank=rank, settings=settings)) as sidecar:
        peer = 1 - rank
        # Both connections exist, and rank 1 stamps nothing more of them, before rank 0 starts.
        if rank == 0:
            sidecar.send("hello", "hello", peer).result(WAIT)
            sidecar.recv_sync("go", timeout=WAIT)
            sidecar.mark_done_sync("go")
            stamps.clear()
        else:
            sidecar.recv_sync("hello", timeout=WAIT)
            sidecar.mark_done_sync("hello")
            stamps.clear()
            sidecar.send("go", "go", peer).result(WAIT)
        pending = None
        for i in range(count):
            value = i % 250 + 1
            if rank == 0:
                tensor = torch.full((nbytes,), value, dtype=torch.uint8, device=device)
                sync()
                stamp("send")
                future = sidecar.send(tensor, f"t{i}", peer)
                stamp("sent")
                ack = sidecar.recv_sync(f"a{i}", timeout=WAIT)
                stamp("received")
                sidecar.mark_done_sync(f"a{i}")
                future.result(WAIT)
                stamp("end")
                assert ack == i, f"acknowledgement {ack} for transfer {i}"
            else:
                if pending is not None:  # as the benchmark does: the last int acknowledged by now
                    pending.result(WAIT)
                got = sidecar.recv_sync(f"t{i}", timeout=WAIT)
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
            pending.result(WAIT)
    out.put((rank, stamps))


def _raw_side(rank: int, env: dict[str, str], device: str, nbytes: int, count: int, addresses: Any, out: Any) -> None:
    """The same transfers over raw ucxx (the benchmark's ``ucxx`` peer); puts its stamps on ``out``."""
    os.environ.update(env)
    import torch

    from sidecar_core._bench._ucxx import UcxxEndpoint
    from transports.ucx import UcxSettings

    where = torch.device(device)
    if where.type == "cuda":  # the CUDA context first, as the benchmark's workers make it
        torch.cuda.set_device(where)
        torch.empty(1, device=where)
    stamps: dict[str, list[float]] = {}

    def stamp(name: str) -> None:
        stamps.setdefault(name, []).append(time.perf_counter())

    setup = {"progress_mode": UcxSettings().progress_mode}
    endpoint = UcxxEndpoint("send" if rank == 0 else "recv", setup, where)
    try:
        if rank == 1:
            addresses.put(endpoint.address())
            endpoint.connect({})
        else:
            endpoint.connect(addresses.get(timeout=WAIT))
        for i in range(count):
            value = i % 250 + 1
            if rank == 0:
                tensor = torch.full((nbytes,), value, dtype=torch.uint8, device=where)
                if where.type == "cuda":
                    torch.cuda.synchronize()
                stamp("send")
                endpoint.send_tensor(tensor)
                ack = endpoint.recv_ack()
                stamp("received")
                assert ack == i, f"acknowledgement {ack} for transfer {i}"
            else:
                got = endpoint.recv_tensor(nbytes)
                stamp("received")
                if where.type == "cuda":
                    torch.cuda.synchronize()
                assert (int(got[0]), int(got[-1])) == (value, value), f"transfer {i} arrived wrong"
                stamp("checked")
                endpoint.send_ack(i)
                stamp("acked")
        out.put((rank, stamps))
        if rank == 1:  # the sender may still be reading the last int: close after it has
            addresses.get(timeout=WAIT)
        else:
            addresses.put("done")
    finally:
        endpoint.close()


def _collect(out: Any, sides: list[Any]) -> dict[int, dict[str, list[float]]]:
    """Both sides' stamps, or exit once a side has died without giving them."""
    stamps: dict[int, dict[str, list[float]]] = {}
    while len(stamps) < len(sides):
        try:
            rank, side_stamps = out.get(timeout=1.0)
        except queue.Empty:
            if any(process.exitcode not in (None, 0) for process in sides):
                sys.exit("a side failed (its error is above)")
            continue
        stamps[rank] = side_stamps
    return stamps


def _run(target: Callable[..., None], *args: Any) -> dict[int, dict[str, list[float]]]:
    """Run ``target(rank, *args, out)`` for ranks 1 and 0 in spawned processes; return their stamps."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    extra = (ctx.Queue(),) if target is _raw_side else ()
    sides = [ctx.Process(target=target, args=(rank, *args, *extra, out)) for rank in (1, 0)]
    for process in sides:
        process.start()
    try:
        return _collect(out, sides)
    finally:
        for process in sides:
            process.join(WAIT)
            if process.is_alive():
                process.kill()


def _report(
    title: str, steps: list[tuple[str, str, str]], stamps: dict[int, dict[str, list[float]]], count: int, nbytes: int
) -> float:
    """Print the p50 of each step and of the whole transfer; return the latter (seconds)."""
    for side, name, what in steps:
        got = len(stamps[0 if side == "send" else 1].get(name, []))
        if got != count:
            sys.exit(f"{title}: stamped {got} of {count} transfers at '{what}': the transport has changed")
    skip = count // 5
    rows = [stamps[0 if side == "send" else 1][name][skip:] for side, name, _ in steps]
    print(f"{title}, {nbytes} bytes, p50 of {count - skip} transfers:")
    for (_, _, what), before, after in zip(steps[1:], rows[:-1], rows[1:], strict=True):
        print(f"  {statistics.median(b - a for a, b in zip(before, after, strict=True)) * 1e6:8.1f} us  {what}")
    total = statistics.median(b - a for a, b in zip(rows[0], rows[-1], strict=True))
    print(f"  {total * 1e6:8.1f} us  in all ({nbytes / total / 1e9:.2f} GB/s)")
    return total


def main() -> None:
    """Run the transfers over raw ucxx, then over the transport, and print the p50 of each step."""
    from transports.ucx import UcxTransport

    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    nbytes = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 20
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    if nbytes <= 8 << 10:
        sys.exit("BYTES must be over 8 KiB: smaller payloads ride inside the header message")
    with tempfile.TemporaryDirectory() as workdir:
        env = {"SIDECAR_TRANSPORT": "ucx", **UcxTransport.test_environment(Path(workdir))}
        raw = _report(f"raw ucxx on {device}", RAW_STEPS, _run(_raw_side, env, device, nbytes, count), count, nbytes)
        ucx = _report(f"ucx on {device}", STEPS, _run(_side, env, device, nbytes, count), count, nbytes)
    print(f"ucx/raw ucxx: {raw / ucx:.2f}x")


if __name__ == "__main__":
    main()
