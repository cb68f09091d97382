"""Raw ucxx next to the ucx transport, measured the same way: the ceiling the transport is held to.

Both measurements run two fresh processes (receiver and sender) and time acknowledged transfers on
the sender: each iteration moves ``nbytes`` from a filled tensor on ``src_device`` to memory on
``dst_device`` and returns once the receiver has it.

* :func:`raw_ucxx_bandwidth`: ucxx's public API (``ucxx.init``, ``create_listener``,
  ``create_endpoint``); one tagged ``send`` into a buffer the receiver allocated once, then a
  one-byte tagged ``send`` back as the acknowledgement. ``progress_mode`` is passed to
  ``ucxx.init`` (``thread`` modes with ucxx's Python futures, as the transport uses them; ucxx's
  own ``blocking`` and ``polling`` modes wait on requests by spinning the event loop).
* :func:`sidecar_ucx_bandwidth`: ``Sidecar.send(tensor, ...).result()`` with ``SIDECAR_TRANSPORT=ucx``;
  the receiver runs ``recv_sync`` then ``mark_done_sync`` for each message.

Both take ``env`` (applied in the children before anything is imported: ``UCX_TLS``,
``CUDA_VISIBLE_DEVICES``, ...) and return a :class:`Bandwidth`. ``python benchmarks/ucx_probe.py``
prints them side by side.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import statistics
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transports.ucx._addressing import free_base_port
from transports.ucx._worker import PROGRESS_MODES

_SPAWN = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class Bandwidth:
    """Timed iterations of one measurement (warm-up excluded)."""

    nbytes: int
    seconds: list[float]

    @property
    def median_gbps(self) -> float:
        """Median bandwidth in GB/s (10^9 bytes per second)."""
        return self.nbytes / statistics.median(self.seconds) / 1e9

    @property
    def best_gbps(self) -> float:
        """Best iteration's bandwidth in GB/s."""
        return self.nbytes / min(self.seconds) / 1e9


def raw_ucxx_bandwidth(
    nbytes: int,
    *,
    iterations: int = 10,
    warmup: int = 2,
    src_device: str = "cpu",
    dst_device: str = "cpu",
    progress_mode: str = "blocking",
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> Bandwidth:
    """Measure acknowledged ucxx transfers of ``nbytes`` between two processes (see the module docstring).

    Raises:
        ValueError: Unknown progress mode.
        RuntimeError: A child process failed (its traceback is in the message) or timed out.
    """
    _check_mode(progress_mode)
    args = (nbytes, iterations + warmup, progress_mode)
    return _measure(_raw_receiver, _raw_sender, args, src_device, dst_device, warmup, env or {}, timeout)


def sidecar_ucx_bandwidth(
    nbytes: int,
    *,
    iterations: int = 10,
    warmup: int = 2,
    src_device: str = "cpu",
    dst_device: str = "cpu",
    progress_mode: str = "blocking",
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> Bandwidth:
    """Measure ``Sidecar.send(...).result()`` of ``nbytes`` over the ucx transport, as :func:`raw_ucxx_bandwidth`.

    Raises:
        ValueError: Unknown progress mode.
        RuntimeError: A child process failed (its traceback is in the message) or timed out.
    """
    _check_mode(progress_mode)
    env = {
        "SIDECAR_TRANSPORT": "ucx",
        "SIDECAR_IS_LOCAL": "1",
        "SIDECAR_BASE_PORT": str(free_base_port(2)),
        "SIDECAR_UCX__PROGRESS_MODE": progress_mode,
        "SIDECAR_RECV_DEVICE": dst_device,
        "SIDECAR_SEND_TIMEOUT": str(timeout),
        "SIDECAR_RECV_TIMEOUT": str(timeout),
        **(env or {}),
    }
    args = (nbytes, iterations + warmup, progress_mode)
    return _measure(_sidecar_receiver, _sidecar_sender, args, src_device, dst_device, warmup, env, timeout)


def _check_mode(mode: str) -> None:
    if mode not in PROGRESS_MODES:
        raise ValueError(f"unknown progress mode {mode!r}; choose from {', '.join(PROGRESS_MODES)}")


Child = Callable[[multiprocessing.connection.Connection, tuple[Any, ...], str, dict[str, str]], None]


def _measure(
    receiver: Child,
    sender: Child,
    args: tuple[Any, ...],
    src_device: str,
    dst_device: str,
    warmup: int,
    env: Mapping[str, str],
    timeout: float,
) -> Bandwidth:
    recv_conn, recv_child = _SPAWN.Pipe()
    send_conn, send_child = _SPAWN.Pipe()
    procs = [
        _SPAWN.Process(target=_child, args=(receiver, recv_child, args, dst_device, dict(env)), daemon=True),
        _SPAWN.Process(target=_child, args=(sender, send_child, args, src_device, dict(env)), daemon=True),
    ]
    try:
        procs[0].start()
        address = _answer(recv_conn, "receiver", timeout)
        procs[1].start()
        send_conn.send(address)
        seconds: list[float] = _answer(send_conn, "sender", timeout)
        recv_conn.send("stop")
        _answer(recv_conn, "receiver", timeout)
        return Bandwidth(args[0], seconds[warmup:])
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _answer(conn: multiprocessing.connection.Connection, who: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"the {who} process gave no answer within {timeout:g}s")
    try:
        status, value = conn.recv()
    except EOFError:
        raise RuntimeError(f"the {who} process died") from None
    if status == "error":
        raise RuntimeError(f"the {who} process failed:\n{value}")
    return value


def _child(
    fn: Child, conn: multiprocessing.connection.Connection, args: tuple[Any, ...], device: str, env: dict[str, str]
) -> None:
    os.environ.update(env)
    try:
        fn(conn, args, device, env)
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def _source(nbytes: int, device: str) -> Any:
    import torch

    tensor = torch.full((nbytes,), 7, dtype=torch.uint8, device=device)
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return tensor


def _check(tensor: Any, nbytes: int) -> None:
    flat = tensor.reshape(-1)
    if flat.numel() != nbytes or int(flat[0]) != 7 or int(flat[-1]) != 7:
        raise ValueError(
            f"received {flat.numel()} bytes (first {int(flat[0])}, last {int(flat[-1])}), expected {nbytes} x 7"
        )


# -- raw ucxx ---------------------------------------------------------------------------------


def _ucxx_init(mode: str) -> Any:
    import ucxx

    ucxx.init(progress_mode=mode, enable_python_future=mode.startswith("thread"))
    return ucxx


def _raw_receiver(
    conn: multiprocessing.connection.Connection, args: tuple[Any, ...], device: str, env: dict[str, str]
) -> None:
    import numpy as np
    import torch

    nbytes, total, mode = args

    async def main() -> None:
        ucxx = _ucxx_init(mode)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        target = buf if buf.is_cuda else buf.numpy()
        ack = np.ones(1, dtype=np.uint8)
        done = asyncio.get_running_loop().create_future()

        async def serve(ep: Any) -> None:
            try:
                for _ in range(total):
                    await ep.recv(target)
                    await ep.send(ack)
                _check(buf, nbytes)
                done.set_result(None)
            except BaseException as exc:
                done.set_exception(exc)

        listener = ucxx.create_listener(serve)
        conn.send(("ok", {"port": listener.port}))
        await done
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        listener.close()
        ucxx.stop_notifier_thread()
        conn.send(("ok", None))

    asyncio.run(main())


def _raw_sender(
    conn: multiprocessing.connection.Connection, args: tuple[Any, ...], device: str, env: dict[str, str]
) -> None:
    import numpy as np

    nbytes, total, mode = args
    address = conn.recv()

    async def main() -> list[float]:
        ucxx = _ucxx_init(mode)
        src = _source(nbytes, device)
        data = src if src.is_cuda else src.numpy()
        ack = np.zeros(1, dtype=np.uint8)
        ep = await ucxx.create_endpoint("127.0.0.1", address["port"])
        seconds = []
        for _ in range(total):
            start = time.perf_counter()
            await ep.send(data)
            await ep.recv(ack)
            seconds.append(time.perf_counter() - start)
        await ep.close()
        ucxx.stop_notifier_thread()
        return seconds

    conn.send(("ok", asyncio.run(main())))


# -- the sidecar ucx transport ----------------------------------------------------------------


def _sidecar_receiver(
    conn: multiprocessing.connection.Connection, args: tuple[Any, ...], device: str, env: dict[str, str]
) -> None:
    from sidecar_core import Sidecar, SidecarConfig

    nbytes, total, _ = args
    with Sidecar(SidecarConfig(sidecar_rank=1)) as sidecar:
        conn.send(("ok", {}))
        for i in range(total):
            tensor = sidecar.recv_sync(f"probe-{i}")
            if i == total - 1:
                _check(tensor, nbytes)
            del tensor
            sidecar.mark_done_sync(f"probe-{i}")
        conn.recv()  # the sender has every acknowledgement: closing now loses nothing
    conn.send(("ok", None))


def _sidecar_sender(
    conn: multiprocessing.connection.Connection, args: tuple[Any, ...], device: str, env: dict[str, str]
) -> None:
    from sidecar_core import Sidecar, SidecarConfig

    nbytes, total, _ = args
    conn.recv()
    src = _source(nbytes, device)
    seconds = []
    with Sidecar(SidecarConfig(sidecar_rank=0)) as sidecar:
        for i in range(total):
            start = time.perf_counter()
            sidecar.send(src, f"probe-{i}", 1).result()
            seconds.append(time.perf_counter() - start)
    conn.send(("ok", seconds))
