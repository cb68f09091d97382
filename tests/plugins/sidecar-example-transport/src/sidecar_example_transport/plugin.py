"""The plugin module named by the ``sidecar`` entry point: it registers the transport lazily.

Registration names an import path; the transport module is imported only when a sidecar selects
``example-tcp``, so installing this package costs nothing to processes that do not use it.
"""

from sidecar_core import Register, hookimpl


@hookimpl
def sidecar_register_transports(register: Register) -> None:
    """Register ``example-tcp``."""
    register(
        "example-tcp",
        "sidecar_example_transport.transport:ExampleTcpTransport",
        description="Example plugin: plain asyncio TCP, one connection per destination, acknowledged frames.",
    )
