"""Waiting in tests for something another thread or process makes happen."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def wait_until(condition: Callable[[], object], what: str, timeout: float = 5.0, pause: float = 0.01) -> None:
    """Return once ``condition()`` is true; fail the test, naming ``what``, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting until {what}")
        time.sleep(pause)


def _thread_states(pid: int) -> list[str]:
    """The scheduler state of each thread of process ``pid`` (``T``: stopped), from ``/proc``."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # the thread ended meanwhile
            stat = (task / "stat").read_text()
            states.append(stat[stat.rindex(")") + 2])  # after "pid (comm) ", comm may hold anything
    return states


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """Stop process ``pid`` with ``SIGSTOP`` and return once every one of its threads has stopped.

    ``kill`` returns before the signal has stopped the process: on a busy machine one of its threads
    can go on for milliseconds (the sidecar's loop acknowledged a few dozen frames sent right after
    ``kill``), so a test that needs the peer silent waits for this.
    """
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: all(state in "Tt" for state in _thread_states(pid)), f"process {pid} stopped", timeout)
