"""A sidecar in another, real process, driven from the test process.

The test process starts a peer with a rank and environment; the peer builds a ``Sidecar`` and runs
module-level functions ``fn(sidecar, *args)`` on request. Results come back over a
``multiprocessing`` pipe: that is the test harness's channel, never a sidecar receive path.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import multiprocessing.connection
import os
import signal
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from sidecar_core._client import Sidecar, SidecarConfig

_START_TIMEOUT = 60.0


class PeerError(AssertionError):
    """A function run in a peer raised; the message carries the peer's traceback."""


class PeerCall:
    """A call running in a peer; :meth:`result` waits for it."""

    def __init__(self, peer: PeerProcess, what: str) -> None:
        self._peer = peer
        self._what = what
        self._done = False
        self._value: Any = None

    def result(self, timeout: float = 60.0) -> Any:
        """Wait for the call's return value.

        Raises:
            PeerError: The function raised in the peer (its traceback is in the message), the peer
                died, or no answer came within ``timeout`` seconds.
        """
        if not self._done:
            self._value = self._peer._wait_answer(self._what, timeout)
            self._done = True
        return self._value


class PeerProcess:
    """One sidecar rank in a child process started with the ``spawn`` method.

    Args:
        rank: The child's sidecar rank.
        env: Environment variables for the child (transport settings, test deployment).

    Raises:
        PeerError: The child failed to build its sidecar; the message has its traceback.
    """

    def __init__(self, rank: int, env: Mapping[str, str]) -> None:
        self.rank = rank
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_peer_main, args=(child_conn, rank, dict(env)), daemon=True)
        self.process.start()
        child_conn.close()
        self._pending: list[str] = []
        self._wait_answer("start", _START_TIMEOUT)

    def submit(self, fn: Callable[..., Any], *args: Any) -> PeerCall:
        """Start ``fn(sidecar, *args)`` in the peer and return at once.

        Calls run one after another in the peer, in the order submitted.
        """
        what = f"{fn.__qualname__}{args!r:.200}"
        self._conn.send((fn, args))
        self._pending.append(what)
        return PeerCall(self, what)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
        """Run ``fn(sidecar, *args)`` in the peer and return its result (see :meth:`submit`)."""
        return self.submit(fn, *args).result(timeout)

    def _wait_answer(self, what: str, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            alive = "alive" if self.process.is_alive() else f"dead (exit code {self.process.exitcode})"
            raise PeerError(f"peer rank {self.rank} gave no answer to {what} within {timeout:g}s; it is {alive}")
        try:
            status, value = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise PeerError(f"peer rank {self.rank} died during {what} (exit code {self.process.exitcode})") from None
        if self._pending:
            self._pending.pop(0)
        if status == "error":
            raise PeerError(f"peer rank {self.rank} raised in {what}:\n{value}")
        return value

    def kill(self) -> None:
        """Kill the peer with SIGKILL, as a crash would, and wait for it to exit."""
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def close(self, timeout: float = 20.0) -> None:
        """Shut the peer's sidecar down and wait for the process to exit (kill it if it hangs)."""
        if self.process.is_alive():
            try:
                self._conn.send(None)
                self.process.join(timeout)
            except (BrokenPipeError, OSError):
                pass
        if self.process.is_alive():
            self.kill()
        self._conn.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _peer_main(conn: multiprocessing.connection.Connection, rank: int, env: dict[str, str]) -> None:
    os.environ.update(env)
    try:
        sidecar = Sidecar(SidecarConfig(sidecar_rank=rank))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:
                break
            if request is None:
                break
            fn, args = request
            try:
                result = fn(sidecar, *args)
                if inspect.isawaitable(result):
                    result = asyncio.run(_await(result))
                conn.send(("ok", result))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
    finally:
        sidecar.shutdown_sync()
        conn.close()


async def _await(awaitable: Any) -> Any:
    return await awaitable
