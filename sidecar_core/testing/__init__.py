"""Testing helpers for sidecar and its plugins: real peer processes (and the conformance suite)."""

from sidecar_core.testing._peer import PeerCall, PeerError, PeerProcess

__all__ = ["PeerCall", "PeerError", "PeerProcess"]
