"""The ``localhost`` transport: sidecars on one host.

A Unix stream socket per pair of ranks carries frame headers, small payloads and acknowledgements;
large payloads travel through a pooled shared-memory region (a sealed ``memfd``, passed over the
socket), so they are copied once on the way and the receiver gets zero-copy views. CUDA tensors are
staged through the pinned pool, or shared as CUDA IPC handles on request.

Modules: :mod:`._transport` (the transport and its settings), :mod:`._link` (connections to peers),
:mod:`._incoming` (connections from peers), :mod:`._channel` (message I/O on a socket),
:mod:`._protocol` (the wire format), :mod:`._shm` (the pool), :mod:`._rendezvous` (socket paths,
rank locks, stale-file cleanup), :mod:`._cuda` (GPU paths, imported only when used).
"""

from transports.localhost._transport import LocalhostSettings, LocalhostTransport

__all__ = ["LocalhostSettings", "LocalhostTransport"]
