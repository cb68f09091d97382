"""Environments for Python subprocesses that must run the code under test, not an installed copy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: The repository root: this checkout's packages.
REPO = Path(__file__).resolve().parents[1]


def checkout_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with this checkout first on ``PYTHONPATH``."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **(extra or {}), "PYTHONPATH": path}
