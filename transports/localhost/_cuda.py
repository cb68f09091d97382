"""CUDA paths of the localhost transport; imported only when a CUDA frame is sent or received.

Staged (the default): the sender copies GPU memory into its pool slot segment by segment and tells
the receiver after each one (``READY``); the receiver copies every ready segment onto its GPU on a
stream of its own while the next segment is still coming down. Both PCIe directions work at once,
and NVLink stays free for the model. The pool and the peers' mappings of it are page-locked
(``cudaHostRegister``) the first time CUDA touches them, so both copies are DMA at full speed.

IPC (opt-in, ``SIDECAR_LOCALHOST__CUDA_IPC``): the sender shares the tensor's CUDA allocation
instead of copying it. The handle fields travel as JSON (never pickled); the receiver opens them
with ``torch.UntypedStorage._new_shared_cuda`` and gets a view of the sender's memory. The sender
keeps the tensor alive until the receiver's ``mark_done`` releases it.

Concurrency: :func:`stage_out` runs on a worker thread; everything else on the event-loop thread
(:meth:`Landing.finish` blocks it only for the last segment's copy).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from collections.abc import Callable, Iterable, Sequence

import torch

from sidecar_core import Buffer, FrameError, buffer_nbytes
from transports.localhost._protocol import IpcBuffer
from transports.localhost._shm import host_bytes

logger = logging.getLogger(__name__)

#: Bytes per staged segment: small enough to overlap the two copies, large enough to run at full speed.
SEGMENT = 8 << 20
_REGISTER_PORTABLE = 1
_registered: dict[int, int] = {}
_streams: dict[torch.device, torch.cuda.Stream] = {}


def device_of(recv_device: str) -> torch.device:
    """``SIDECAR_RECV_DEVICE`` as a device with its index (``cuda`` means the current device)."""
    device = torch.device(recv_device)
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _address(region: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(region)
    address = ctypes.addressof(anchor)
    del anchor  # the export would keep the mapping from being closed
    return address


def pin(region: mmap.mmap, device: torch.device) -> bool:
    """Page-lock a mapped region for DMA, once per region (this faults every page in).

    Args:
        region: The mapping.
        device: The GPU this process uses (so no context is made on another one).

    Returns:
        Whether the region is page-locked; if not, copies still work, only slower.
    """
    address = _address(region)
    if address in _registered:
        return True
    with torch.cuda.device(device):
        error = int(torch.cuda.cudart().cudaHostRegister(address, len(region), _REGISTER_PORTABLE))  # type: ignore[no-untyped-call]
    if error:
        logger.warning(
            "cannot page-lock %d bytes of shared memory (CUDA error %d); GPU copies will be slower", len(region), error
        )
        return False
    _registered[address] = len(region)
    return True


def unpin(region: mmap.mmap) -> None:
    """Undo :func:`pin` before the region is unmapped."""
    address = _address(region)
    if _registered.pop(address, None) is not None:
        torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]


def stage_out(
    buffers: Sequence[Buffer], slot: memoryview, offsets: Sequence[int], notify: Callable[[int], None]
) -> None:
    """Copy a frame's buffers into its slot, segment by segment, calling ``notify(bytes_ready)``.

    Runs on a worker thread; ``notify`` must hand the number to the event loop. Copies run on the
    device's current stream of this thread, after the work already queued on the legacy default
    stream: tensors written on other streams must be synchronized before ``send``.
    """
    dst = torch.frombuffer(slot, dtype=torch.uint8)
    for buf, offset in zip(buffers, offsets, strict=True):
        if not buffer_nbytes(buf):
            continue
        src = buf if isinstance(buf, torch.Tensor) else torch.frombuffer(buf, dtype=torch.uint8)
        size = int(src.numel())
        for start in range(0, size, SEGMENT):
            end = min(size, start + SEGMENT)
            dst[offset + start : offset + end].copy_(src[start:end])
            if offset + end < len(slot):
                notify(offset + end)
    notify(len(slot))


class Landing:
    """A staged frame arriving on this process's GPU: one device buffer filled segment by segment.

    Args:
        span: The frame's slot size.
        device: Where it lands (``SIDECAR_RECV_DEVICE``).
    """

    def __init__(self, span: int, device: torch.device) -> None:
        self.dest = torch.empty(span, dtype=torch.uint8, device=device)
        self.stream = _stream(device)
        self.issued = 0

    def advance(self, slot: memoryview, ready: int) -> None:
        """Queue the copy of the slot's bytes up to ``ready`` (they are in shared memory now)."""
        if ready <= self.issued:
            return
        src = torch.frombuffer(slot, dtype=torch.uint8)
        with torch.cuda.stream(self.stream):
            self.dest[self.issued : ready].copy_(src[self.issued : ready], non_blocking=True)
        self.issued = ready

    def finish(self) -> torch.Tensor:
        """Wait until every queued copy is done; return the device buffer.

        Called once the last segment is queued: at most a segment or two is still in flight, so
        waiting here is shorter than handing the wait to another thread and back.
        """
        self.stream.synchronize()
        return self.dest


def _stream(device: torch.device) -> torch.cuda.Stream:
    """This process's copy stream on ``device`` (one, reused)."""
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    return stream


def synchronize(devices: Iterable[torch.device]) -> None:
    """Wait for the work queued on each device's current stream."""
    for device in set(devices):
        torch.cuda.current_stream(device).synchronize()


def to_host(buf: Buffer) -> memoryview:
    """A host view of a buffer (a CUDA buffer is copied to the host first)."""
    if isinstance(buf, memoryview):
        return buf
    return host_bytes(buf.detach().cpu())


def tensors(buffers: Sequence[Buffer]) -> list[torch.Tensor]:
    """The buffers as tensors (all of a CUDA IPC frame's buffers are CUDA tensors)."""
    return [b for b in buffers if isinstance(b, torch.Tensor)]


def export_ipc(buf: torch.Tensor) -> IpcBuffer:
    """The CUDA IPC fields of a CUDA buffer, for JSON."""
    storage = buf.untyped_storage()
    device, handle, size, offset, counter, counter_offset, event, sync = storage._share_cuda_()  # type: ignore[no-untyped-call]
    return IpcBuffer(
        device=int(device),
        handle=bytes(handle).hex(),
        storage_bytes=int(size),
        storage_offset=int(offset),
        ref_counter=bytes(counter).hex(),
        ref_counter_offset=int(counter_offset),
        event=bytes(event).hex() if event else None,
        event_sync_required=bool(sync),
        view_offset=int(buf.storage_offset()) * int(buf.element_size()),
        nbytes=int(buf.numel()) * int(buf.element_size()),
    )


def import_ipc(desc: IpcBuffer) -> torch.Tensor:
    """Open a peer's CUDA buffer from its IPC fields; a flat ``uint8`` view of the peer's memory.

    Raises:
        FrameError: The fields are inconsistent or name a device this process cannot see.
    """
    if desc.view_offset + desc.nbytes > desc.storage_bytes:
        raise FrameError(
            f"CUDA IPC view [{desc.view_offset}, {desc.view_offset + desc.nbytes}) exceeds its "
            f"{desc.storage_bytes}-byte storage"
        )
    torch.cuda.init()  # type: ignore[no-untyped-call]
    if desc.device >= torch.cuda.device_count():
        raise FrameError(f"CUDA IPC buffer on device {desc.device}, but this process sees {torch.cuda.device_count()}")
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            desc.device,
            bytes.fromhex(desc.handle),
            desc.storage_bytes,
            desc.storage_offset,
            bytes.fromhex(desc.ref_counter),
            desc.ref_counter_offset,
            bytes.fromhex(desc.event) if desc.event is not None else b"",
            desc.event_sync_required,
        )
    except (RuntimeError, ValueError) as exc:
        raise FrameError(f"cannot open the peer's CUDA IPC handle: {exc}") from None
    view = torch.empty(0, dtype=torch.uint8, device=f"cuda:{desc.device}")
    view.set_(storage, desc.view_offset, (desc.nbytes,), (1,))
    return view
