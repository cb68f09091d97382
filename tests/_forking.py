"""A sidecar's owner that forks a long-lived child, for the tests of what a child keeps of its parent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path


def owner_script(rank: int, peer: int) -> str:
    """Python for ``forking_owner``: a sidecar of ``rank`` that says hello to ``peer``, then forks and waits."""
    return f"""
import os, time
from sidecar_core import Sidecar, SidecarConfig
owner = Sidecar(SidecarConfig(sidecar_rank={rank}))
owner.send("hi", "owner-hello", {peer}).result(20)  # a connection out, and one in from the peer
pid = os.fork()
if pid == 0:
    time.sleep(60)  # a long-lived child (a worker), killed by the test
    os._exit(0)
print(pid, flush=True)
time.sleep(60)  # killed by the test
"""


@contextlib.contextmanager
def forking_owner(command: list[str], env: dict[str, str], cwd: Path, wait: float) -> Iterator[Callable[[], None]]:
    """Run ``command``, which makes a sidecar, forks a child that sleeps and prints the child's pid.

    Yields a function that kills the owner (the child lives on); both are killed on the way out.
    """
    owner = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert owner.stdout is not None
        child = int(owner.stdout.readline())

        def kill_owner() -> None:
            owner.kill()
            owner.wait(wait)

        yield kill_owner
    finally:
        owner.kill()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
