"""What machine a run was measured on."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

_PACKAGES = ("sidecar", "torch", "numpy", "pyzmq", "ucxx-cu12", "ucxx-cu13", "ucxx")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages when the run started (other work on the machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _cuda(gpus: list[int]) -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    return {
        "torch_cuda": torch.version.cuda,
        "device_count": count,
        "devices": {g: torch.cuda.get_device_name(g) for g in gpus if g < count},
    }


def machine_info(device: str, gpus: list[int]) -> dict[str, Any]:
    """CPU model, cores, RAM, load, OS, Python and package versions, date; CUDA devices when ``device`` is cuda."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "ram_bytes": _ram_bytes(),
        "load_average": _load_average(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "packages": _versions(),
        "cuda": _cuda(gpus) if device == "cuda" else None,
    }
