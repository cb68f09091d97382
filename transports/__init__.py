"""Built-in transports, registered through the ``sidecar`` entry-point group.

This module must stay import-light: it names import targets, it does not import them.
"""

from sidecar_core import hookimpl
from sidecar_core._hooks import Register


@hookimpl
def sidecar_register_transports(register: Register) -> None:
    """Register localhost, ucx and mock-file."""
    register(
        "localhost",
        "transports.localhost:LocalhostTransport",
        description="Processes on one host: Unix socket for headers, shared memory for payloads.",
    )
    register(
        "ucx",
        "transports.ucx:UcxTransport",
        requires=("ucxx",),
        install_hint="pip install 'sidecar[ucx]'",
        description="UCX through ucxx: TCP, shared memory, RDMA and CUDA IPC, across hosts.",
    )
    register(
        "mock-file",
        "transports.mock_file:MockFileTransport",
        description="No peers: '{id}-{chunk_id}' maps to a file (Cornserve's mock mode).",
    )
