"""Transfers that overlap: the ucx transport against raw ucxx with several tensors in flight at once.

``sidecar bench`` and ``benchmarks/ucx_steps.py`` time one transfer at a time: the receiver checks
the tensor and answers before the next one leaves, so every step of a transfer is on the clock. A
pipeline with several requests in flight overlaps them instead. Here rank 0 keeps up to ``WINDOW``
transfers unanswered: rank 1 receives each tensor, checks its size and first and last byte,
releases it and answers with its index (an int; over raw ucxx an 8-byte message), and rank 0
sends the next tensor once the oldest unanswered one is answered. The answers keep the receiver's
memory bounded, as a pipeline's flow control would (a send completes once the receiver holds the
tensor, not once it used it). The clock runs from the first send after ``WINDOW`` warm-up
transfers to the last answer. Raw ucxx runs the same schedule, tagged sends from ``WINDOW`` source
tensors into ``WINDOW`` receive buffers, each receive posted again once its tensor was checked. The
two take turns, twice, each in a fresh pair of processes::

    python benchmarks/ucx_window.py [DEVICE] [BYTES] [TRANSFERS] [WINDOW]    # e.g. cuda:0 1073741824 24 4

``DEVICE`` (default ``cpu``) holds both sides' tensors, and the receiver receives on it. ``BYTES``
defaults to 1 MiB, ``TRANSFERS`` (timed, after ``WINDOW`` warm-up transfers) to 24, ``WINDOW`` to
4. Every message is sent whole (``SIDECAR_CHUNK_SIZE`` is ignored). The progress mode is
``SIDECAR_UCX__PROGRESS_MODE`` for both (default ``blocking``), and ``UCX_*`` settings apply to both.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

#: Seconds any one wait may take before the run is given up.
WAIT = 120.0
#: How many times each side takes its turn.
TURNS = 2


def _value(i: int, window: int) -> int:
    """What every byte of source tensor ``i % window`` holds."""
    return i % window + 1


def _check(tensor: Any, i: int, window: int, nbytes: int) -> None:
    """Check transfer ``i``'s size and first and last byte, then clear those bytes.

    Sources are reused every ``window`` transfers, and so is receive memory (raw ucxx's buffers, the
    transport's from torch's cache): cleared, a buffer that nothing wrote into fails the next check.
    """
    got = (int(tensor[0]), int(tensor[-1]))
    if tensor.numel() != nbytes or got != (_value(i, window),) * 2:
        raise AssertionError(f"transfer {i} arrived wrong: {tensor.numel()} bytes, first and last byte {got}")
    tensor[0] = tensor[-1] = 0


def _sources(device: str, nbytes: int, window: int) -> list[Any]:
    import torch

    tensors = [torch.full((nbytes,), _value(k, window), dtype=torch.uint8, device=device) for k in range(window)]
    if device != "cpu":
        torch.cuda.synchronize()
    return tensors


def _transport_side(
    rank: int, env: dict[str, str], device: str, nbytes: int, count: int, window: int, out: Any
) -> None:
    """One side of the transport's run; rank 0 puts the seconds its timed transfers took on ``out``."""
    os.environ.pop("SIDECAR_CHUNK_SIZE", None)
    os.environ.update(env)
    import torch

    from sidecar_core import Sidecar, SidecarConfig

    if device != "cpu":
        torch.cuda.set_device(torch.device(device))
    settings = {"recv_device": device} if rank == 1 else {}
    with Sidecar(SidecarConfig(sidecar_rank=rank, settings=settings)) as sidecar:
        if rank == 1:
            # Connect back first: the clock must not time a connection's set-up.
            sidecar.send(-1, "ready", 0).result(WAIT)
            answers: list[Any] = []
            for i in range(window + count):
                tensor = sidecar.recv_sync(f"t{i}", timeout=WAIT)
                if device != "cpu":  # as raw ucxx's side does
                    torch.cuda.synchronize()
                _check(tensor, i, window, nbytes)
                del tensor
                sidecar.mark_done_sync(f"t{i}")
                answers.append(sidecar.send(i, f"a{i}", 0))
            for answer in answers:
                answer.result(WAIT)
            return
        sidecar.recv_sync("ready", timeout=WAIT)
        sidecar.mark_done_sync("ready")
        sources = _sources(device, nbytes, window)
        unanswered: collections.deque[tuple[int, Any]] = collections.deque()

        def answered() -> None:
            j, sent = unanswered.popleft()
            sent.result(WAIT)
            if sidecar.recv_sync(f"a{j}", timeout=WAIT) != j:
                raise AssertionError(f"rank 1 answered transfer {j} wrongly")
            sidecar.mark_done_sync(f"a{j}")

        start = 0.0
        for i in range(window + count):
            if i == window:  # the warm-up's transfers have all been answered
                while unanswered:
                    answered()
                start = time.perf_counter()
            if len(unanswered) == window:
                answered()
            unanswered.append((i, sidecar.send(sources[i % window], f"t{i}", 1)))
        while unanswered:
            answered()
        out.put(time.perf_counter() - start)


def _raw_side(rank: int, device: str, nbytes: int, count: int, window: int, ports: Any, out: Any) -> None:
    """One side of raw ucxx's run; rank 0 puts the seconds its timed transfers took on ``out``."""
    import numpy
    import torch
    import ucxx

    if device != "cpu":
        torch.cuda.set_device(torch.device(device))
    loop = asyncio.new_event_loop()
    mode = os.environ.get("SIDECAR_UCX__PROGRESS_MODE", "blocking")

    def run(awaitable: Awaitable[Any]) -> Any:
        return loop.run_until_complete(asyncio.wait_for(awaitable, WAIT))

    async def init() -> None:  # inside the loop: ucxx binds its notifier to the running loop
        ucxx.init(progress_mode=mode, enable_python_future=mode.startswith("thread"))

    def array(tensor: torch.Tensor) -> Any:
        return tensor if tensor.is_cuda else tensor.numpy()

    run(init())
    answer = numpy.zeros(1, dtype=numpy.int64)
    try:
        if rank == 1:
            accepted: asyncio.Future[Any] = loop.create_future()

            async def listen() -> Any:
                async def accept(endpoint: Any) -> None:
                    accepted.set_result(endpoint)

                return ucxx.create_listener(accept)

            listener = run(listen())
            ports.put(listener.port)
            endpoint = run(accepted)
            buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(window)]

            async def receive_all() -> None:
                posted = collections.deque(
                    asyncio.ensure_future(endpoint.recv(array(buffers[i]))) for i in range(window)
                )
                for i in range(window + count):
                    await posted.popleft()
                    if device != "cpu":
                        torch.cuda.synchronize()
                    _check(buffers[i % window], i, window, nbytes)
                    if i + window < window + count:
                        posted.append(asyncio.ensure_future(endpoint.recv(array(buffers[i % window]))))
                    answer[0] = i
                    await endpoint.send(answer)

            run(receive_all())
            run(_drain(ports))
            listener.close()
        else:
            endpoint = run(ucxx.create_endpoint("127.0.0.1", ports.get(timeout=WAIT)))
            sources = _sources(device, nbytes, window)

            async def send_all() -> float:
                unanswered: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

                async def answered() -> None:
                    j, sent = unanswered.popleft()
                    await sent
                    await endpoint.recv(answer)  # answers come in order
                    if answer[0] != j:
                        raise AssertionError(f"rank 1 answered transfer {j} wrongly")

                start = 0.0
                for i in range(window + count):
                    if i == window:
                        while unanswered:
                            await answered()
                        start = time.perf_counter()
                    if len(unanswered) == window:
                        await answered()
                    unanswered.append((i, asyncio.ensure_future(endpoint.send(array(sources[i % window])))))
                while unanswered:
                    await answered()
                return time.perf_counter() - start

            out.put(run(send_all()))
            ports.put("done")  # rank 1 closes once the last message was read
    finally:
        ucxx.stop_notifier_thread()  # not a daemon thread: the process would never exit


async def _drain(ports: Any) -> None:
    """Wait (without blocking the loop) until rank 0 has read the last message."""
    while True:
        try:
            ports.get_nowait()
            return
        except queue.Empty:
            await asyncio.sleep(0.01)


def _run(target: Any, args: tuple[Any, ...], with_ports: bool) -> float:
    """Run both ranks of ``target`` in spawned processes; return rank 0's seconds, or exit if a side failed."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    extra = (ctx.Queue(),) if with_ports else ()
    sides = [ctx.Process(target=target, args=(rank, *args, *extra, out)) for rank in (1, 0)]
    for process in sides:
        process.start()
    try:
        deadline = time.monotonic() + 4 * WAIT
        while True:
            try:
                return float(out.get(timeout=1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in sides) or time.monotonic() > deadline:
                    sys.exit(f"a side failed (exit codes {[p.exitcode for p in sides]}; its error is above)")
    finally:
        for process in sides:
            process.join(WAIT)
            if process.is_alive():
                process.kill()


def main() -> None:
    """Take turns: raw ucxx, then the transport, twice; print each turn's throughput and the ratio."""
    from transports.ucx import UcxTransport

    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    nbytes = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 20
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 24
    window = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    if nbytes < 1 or count < 1 or window < 1:
        sys.exit("BYTES, TRANSFERS and WINDOW must be positive")
    print(f"{nbytes} bytes on {device}, {count} transfers timed, up to {window} in flight")
    for _ in range(TURNS):
        raw = _run(_raw_side, (device, nbytes, count, window), with_ports=True)
        print(
            f"raw ucxx   {nbytes * count / raw / 1e9:10.2f} GB/s  {raw / count * 1e6:9.0f} us per transfer", flush=True
        )
        with tempfile.TemporaryDirectory() as workdir:
            env = {"SIDECAR_TRANSPORT": "ucx", **UcxTransport.test_environment(Path(workdir))}
            ucx = _run(_transport_side, (env, device, nbytes, count, window), with_ports=False)
        print(
            f"ucx        {nbytes * count / ucx / 1e9:10.2f} GB/s  {ucx / count * 1e6:9.0f} us per transfer  "
            f"ucx/raw ucxx: {raw / ucx:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
