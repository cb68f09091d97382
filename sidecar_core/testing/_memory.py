"""An in-process transport for unit tests: the sidecars of one process reach each other by rank.

It is not registered by any distribution; tests register it with an in-process plugin::

    registry = build_registry(extra_plugins=(MemoryPlugin(),))
    with Sidecar(SidecarConfig(sidecar_rank=0, transport="memory"), registry=registry) as sidecar: ...

Frames are copied on the way (as a real transport's receiver gets its own bytes), delivered on the
receiver's own event loop, and rejections come back to the sender as ``RemoteError``.
"""

from __future__ import annotations

import asyncio
import threading

from sidecar_core._errors import CapacityError, DuplicateChunkError, FrameError, PeerUnreachableError, RemoteError
from sidecar_core._frame import Buffer, Frame
from sidecar_core._hooks import Register, hookimpl
from sidecar_core._transport import Transport

_lock = threading.Lock()
_serving: dict[int, MemoryTransport] = {}


class MemoryTransport(Transport):
    """Moves frames between sidecars of this process."""

    name = "memory"

    async def start(self) -> None:
        """Serve this rank in this process.

        Raises:
            PeerUnreachableError: Another sidecar of this process already serves the rank.
        """
        with _lock:
            if self.ctx.rank in _serving:
                raise PeerUnreachableError(f"rank {self.ctx.rank} is already served in this process")
            _serving[self.ctx.rank] = self

    async def send(self, dst: int, frame: Frame) -> None:
        """Copy ``frame`` into ``dst``'s inbox, on ``dst``'s loop.

        Raises:
            PeerUnreachableError: No sidecar of this process serves ``dst``.
            RemoteError: ``dst`` rejected the frame.
        """
        with _lock:
            target = _serving.get(dst)
        if target is None:
            raise PeerUnreachableError(f"{self.describe_peer(dst)} is not served in this process")
        copy = Frame(frame.header, [_copy(buf) for buf in frame.buffers])
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(target._deliver(copy), target.ctx.loop))

    async def _deliver(self, frame: Frame) -> None:
        try:
            self.ctx.inbox.deliver(frame)
        except (FrameError, DuplicateChunkError, CapacityError) as exc:
            raise RemoteError(f"rank {self.ctx.rank} rejected {frame.header.describe()}: {exc}") from None

    async def close(self) -> None:
        """Stop serving the rank."""
        with _lock:
            if _serving.get(self.ctx.rank) is self:
                del _serving[self.ctx.rank]


def _copy(buf: Buffer) -> memoryview:
    if isinstance(buf, memoryview):
        return memoryview(bytes(buf))
    return memoryview(buf.detach().cpu().contiguous().numpy().tobytes())


class MemoryPlugin:
    """Registers :class:`MemoryTransport` as ``memory``."""

    @hookimpl
    def sidecar_register_transports(self, register: Register) -> None:
        """Register the in-process transport."""
        register("memory", f"{__name__}:MemoryTransport", description="In-process transport for unit tests.")
