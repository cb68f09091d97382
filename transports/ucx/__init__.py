"""The ``ucx`` transport (``SIDECAR_TRANSPORT=ucx``): UCX through ucxx, on one host or across hosts.

Importing this package does not import ucxx; the transport imports it when it starts.
"""

from transports.ucx._transport import UcxSettings, UcxTransport

__all__ = ["UcxSettings", "UcxTransport"]
