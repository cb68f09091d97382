"""Worker processes: one per side of a peer (or one for a ceiling), started with ``spawn``.

The parent drives a worker over a ``multiprocessing`` pipe, one command at a time; that pipe is the
benchmark's control channel and never carries measured data.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from typing import Any

from sidecar_core._bench._memory import peak_bytes, reset_peak
from sidecar_core._settings import enter_private_environment

Command = tuple[Any, ...]


class WorkerError(RuntimeError):
    """A worker raised, died or did not answer in time; the message says which and why."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class Worker:
    """One spawned worker process.

    Args:
        peer: The peer's name (see :data:`~sidecar_core._bench._peers.PEERS`).
        role: ``send``, ``recv`` or ``solo`` (a ceiling).
        setup: What the parent prepared for the peer.
        device: Where this side's tensors live (``cpu``, ``cuda:N``).
        env: Environment variables set in the worker before anything is imported.
    """

    def __init__(self, peer: str, role: str, setup: dict[str, Any], device: str, env: dict[str, str]) -> None:
        self.name = f"{peer} {role}"
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_main, args=(child, peer, role, setup, device, env), name=f"sidecar-bench {self.name}", daemon=True
        )
        self.process.start()
        child.close()
        self._exit_requested = False

    def submit(self, command: Command) -> None:
        """Start a command; :meth:`result` waits for its answer."""
        self._conn.send(command)

    def result(self, timeout: float) -> Any:
        """Wait for the answer to the oldest command (or to the start).

        Raises:
            WorkerError: The command raised (the traceback is in ``detail``), the worker died, or
                nothing came within ``timeout`` seconds.
        """
        if not self._conn.poll(timeout):
            state = "still running" if self.process.is_alive() else f"dead (exit code {self.process.exitcode})"
            raise WorkerError(f"{self.name}: no answer within {timeout:.0f}s; the process is {state}")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise WorkerError(f"{self.name}: the process died (exit code {self.process.exitcode})") from None
        if status == "error":
            last = str(value).strip().splitlines()[-1] if str(value).strip() else "unknown error"
            raise WorkerError(f"{self.name}: {last}", detail=str(value))
        return value

    def request_exit(self) -> None:
        """Ask the worker to exit (once); :meth:`close` waits for it."""
        if not self._exit_requested and self.process.is_alive():
            self._exit_requested = True
            with contextlib.suppress(OSError):
                self._conn.send(None)

    def close(self, timeout: float = 20.0) -> None:
        """Ask the worker to exit; kill it if it does not within ``timeout`` seconds."""
        self.request_exit()
        self.process.join(timeout)
        self.kill()
        self._conn.close()

    def kill(self) -> None:
        """Kill the worker (SIGKILL) and wait for it."""
        if self.process.is_alive() and self.process.pid is not None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)


def gather(workers: list[Worker], timeout: float) -> list[Any]:
    """Wait for the answers of several workers to their current command, failing fast.

    Raises:
        WorkerError: One worker failed (the others may still be running: kill them), or not all
            answered within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    while len(results) < len(workers):
        pending = [i for i in range(len(workers)) if i not in results]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = ", ".join(workers[i].name for i in pending)
            raise WorkerError(f"{names}: no answer within {timeout:.0f}s")
        multiprocessing.connection.wait([workers[i]._conn for i in pending], remaining)
        for i in pending:
            if workers[i]._conn.poll():
                results[i] = workers[i].result(0)
    return [results[i] for i in range(len(workers))]


def _main(
    conn: multiprocessing.connection.Connection,
    peer: str,
    role: str,
    setup: dict[str, Any],
    device_name: str,
    env: dict[str, str],
) -> None:
    enter_private_environment(env)
    import torch  # after the environment is set

    from sidecar_core._bench._peers import PEERS

    endpoint: Any = None
    try:
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.empty(1, device=device)  # create the CUDA context before any transport starts
        spec = PEERS[peer]
        if not spec.is_ceiling:
            endpoint = spec.endpoint_class()(role, setup, device)
        conn.send(("ok", endpoint.address() if endpoint is not None else {}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            try:
                command = conn.recv()
            except EOFError:
                break
            if command is None:
                break
            try:
                conn.send(("ok", _run(command, peer, role, endpoint, device)))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
    finally:
        if endpoint is not None:
            endpoint.close()
        conn.close()


def _run(command: Command, peer: str, role: str, endpoint: Any, device: Any) -> dict[str, Any]:
    """Run one command and return its timings with this process's peak memory during it."""
    import torch

    from sidecar_core._bench import _schedule
    from sidecar_core._bench._ceilings import measure_ceiling

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    peak_reset = reset_peak()
    seconds: list[float] | None = None
    kind = command[0]
    if kind == "connect":
        endpoint.connect(command[1])
    elif kind == "throughput" and role == "solo":
        _, nbytes, warmup, count, src, dst = command
        seconds = measure_ceiling(peer, nbytes, warmup, count, torch.device(src), torch.device(dst))
    elif kind == "throughput" and role == "send":
        seconds = _schedule.send_tensors(endpoint, peer, *command[1:4])
    elif kind == "throughput":
        _schedule.recv_tensors(endpoint, peer, *command[1:4])
    elif kind == "latency" and role == "send":
        seconds = _schedule.send_objects(endpoint, peer, *command[1:4])
    elif kind == "latency":
        _schedule.echo_objects(endpoint, *command[2:4])
    else:
        raise ValueError(f"unknown command {command!r} for role {role}")
    return {
        "seconds": seconds,
        "peak_rss_bytes": peak_bytes(),
        "peak_rss_reset": peak_reset,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
