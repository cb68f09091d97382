"""``sidecar bench``: sidecar transports measured side by side with memcpy and the tools users pick today.

Run ``sidecar bench --help``; ``benchmarks/README.md`` explains what is measured and the JSON schema.
"""

from sidecar_core._bench._main import main

__all__ = ["main"]
