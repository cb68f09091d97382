"""Functions the conformance suite runs inside peer processes (``PeerProcess.call(fn, ...)``).

Each takes the peer's ``Sidecar`` first. Objects travel in as payload names and come back as
fingerprints, so the harness pipe never carries what the sidecar is supposed to move.
"""

from __future__ import annotations

from typing import Any

from sidecar_core._client import Ranks, Sidecar
from sidecar_core.testing._payloads import fingerprint, payload

#: How long a peer waits for a send to complete before the call fails.
SEND_WAIT = 60.0


def recv(sidecar: Sidecar, id: str, chunk_id: int = 0, timeout: float = 30.0, release: bool = True) -> Any:
    """Receive a chunk and return its fingerprint; then ``mark_done`` it, unless ``release`` is false.

    Past the end of a stream the fingerprint is that of ``None``.
    """
    value = sidecar.recv_sync(id, chunk_id, timeout=timeout)
    got = fingerprint(value)
    if release and value is not None:
        sidecar.mark_done_sync(id, chunk_id)
    return got


def outcome(sidecar: Sidecar, id: str, chunk_id: int = 0, timeout: float = 30.0) -> tuple[str, Any, str]:
    """Receive a chunk; return ``("ok", fingerprint, "")`` or ``("error", type name, message)``."""
    try:
        value = sidecar.recv_sync(id, chunk_id, timeout=timeout)
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))
    return ("ok", fingerprint(value), "")


def recv_twice_then_done(sidecar: Sidecar, id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Receive chunk 0 twice, ``mark_done`` it, then try once more."""
    first = fingerprint(sidecar.recv_sync(id, 0, timeout=timeout))
    second = fingerprint(sidecar.recv_sync(id, 0, timeout=timeout))
    sidecar.mark_done_sync(id, 0)
    return {"first": first, "second": second, "after_done": outcome(sidecar, id, 0, timeout)}


def mark_done(sidecar: Sidecar, id: str, chunk_id: int = 0) -> None:
    """Release a chunk."""
    sidecar.mark_done_sync(id, chunk_id)


def send(
    sidecar: Sidecar,
    name: str,
    id: str,
    dst: Ranks,
    chunk_id: int = 0,
    num_chunks: int = 1,
    stream: bool = False,
) -> None:
    """Send the payload called ``name`` and wait until every destination holds it."""
    sidecar.send(payload(name), id, dst, chunk_id=chunk_id, num_chunks=num_chunks, stream=stream).result(SEND_WAIT)


def send_stream(sidecar: Sidecar, names: list[str], id: str, dst: Ranks, close: bool = True) -> None:
    """Send ``names`` as the chunks of stream ``id``, then close it (unless ``close`` is false)."""
    for chunk_id, name in enumerate(names):
        sidecar.send(payload(name), id, dst, chunk_id=chunk_id, stream=True).result(SEND_WAIT)
    if close:
        sidecar.close_stream(id, len(names), dst).result(SEND_WAIT)


async def collect_stream(sidecar: Sidecar, id: str) -> list[Any]:
    """Iterate stream ``id`` with ``Sidecar.iter_chunks`` and return the chunks' fingerprints."""
    return [fingerprint(chunk) async for chunk in sidecar.iter_chunks(id)]


def chunk_size(sidecar: Sidecar) -> int | None:
    """The peer's ``SIDECAR_CHUNK_SIZE``."""
    return sidecar.settings.chunk_size
