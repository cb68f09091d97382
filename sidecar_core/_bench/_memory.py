"""Peak resident memory of the current process, resettable per measurement (Linux)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Reset the process's resident-memory high-water mark; return whether that worked.

    Linux resets ``VmHWM`` when ``5`` is written to ``/proc/self/clear_refs``. Elsewhere the peak
    is the process's lifetime peak (``getrusage``), which only grows.
    """
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_bytes() -> int:
    """The resident-memory high-water mark in bytes (since the last :func:`reset_peak`, where it worked)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)
