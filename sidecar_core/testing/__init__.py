"""Testing support for sidecar and its plugins, and an opt-in pytest plugin.

Enable the plugin with ``pytest -p sidecar_core.testing`` or, in a top-level ``conftest.py``,
``pytest_plugins = ["sidecar_core.testing"]``. It provides the ``sidecar_transport`` and
``sidecar_deployment`` fixtures, the ``gpu`` skip and the ``SIDECAR_TEST_STRICT`` switch (see
:mod:`sidecar_core.testing._plugin`). Subclass :class:`TransportConformance` to run the transport
conformance suite; use :class:`PeerProcess` to drive a sidecar in another, real process,
:class:`MemoryPlugin` for in-process unit tests (a ``memory`` transport between sidecars of one
process), and :func:`ids_sent_on_the_loop` to see which frames skipped a transport's fast path.
"""

from sidecar_core.testing._deployment import BUILTIN_TRANSPORTS, Deployment, environment, local_sidecar
from sidecar_core.testing._fast_path import ids_sent_on_the_loop
from sidecar_core.testing._memory import MemoryPlugin, MemoryTransport
from sidecar_core.testing._payloads import PAYLOADS, fingerprint, payload
from sidecar_core.testing._peer import PeerCall, PeerError, PeerProcess
from sidecar_core.testing.conformance import TransportConformance

#: The hooks and fixtures live in a submodule that pytest registers along with this package.
pytest_plugins = ["sidecar_core.testing._plugin"]

__all__ = [
    "BUILTIN_TRANSPORTS",
    "PAYLOADS",
    "Deployment",
    "MemoryPlugin",
    "MemoryTransport",
    "PeerCall",
    "PeerError",
    "PeerProcess",
    "TransportConformance",
    "environment",
    "fingerprint",
    "ids_sent_on_the_loop",
    "local_sidecar",
    "payload",
]
