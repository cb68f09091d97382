"""The receive store: arrived chunks keyed by ``(id, chunk_id)`` until ``mark_done``.

Concurrency: the transport delivers on the sidecar's event-loop thread; receivers register waiters,
give up and ``mark_done`` from their own threads, without a hop through the loop. One re-entrant
lock makes each public method atomic; ``deliver`` holds it while it decodes (and, for a message in
parts, copies a part), so a receiver's call may wait that long. Waiters are settled under the lock
(a waiter's callbacks must not block). A frame's ``release`` still runs on the loop thread
(transports expect it there): when ``mark_done`` frees a frame, or a frame delivered from another
thread (inside ``poll_while_waiting``) is refused or joined into its message, the release is handed
to ``loop``.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from sidecar_core._codec import Codec
from sidecar_core._errors import (
    AlreadyDoneError,
    CapacityError,
    DuplicateChunkError,
    FrameError,
    PeerLostError,
    RecvTimeoutError,
    SidecarClosedError,
)
from sidecar_core._frame import Buffer, Frame, Header, buffer_tensor

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Key = tuple[str, int]
_K = TypeVar("_K")
_V = TypeVar("_V")
Release = Callable[[], None]
#: A receive waiting for a chunk: a thread-safe future, resolved on the loop thread.
Waiter = concurrent.futures.Future[object]

#: How many released keys are remembered, so that a late ``recv`` of one raises at once.
DONE_MEMORY = 1 << 16


@dataclass(slots=True)
class _Held:
    value: object
    nbytes: int
    src: int
    release: Release | None
    #: Whether a receive got the value: its memory then stays until mark_done, whatever happens.
    handed: bool = False


@dataclass(slots=True)
class _Assembly:
    first: Header
    dest: torch.Tensor
    parts: set[int] = field(default_factory=set)
    #: The byte ranges ``(start, end)`` the parts so far filled or landing, sorted; they never overlap.
    spans: list[tuple[int, int]] = field(default_factory=list)
    covered: int = 0
    #: Parts given memory here by :meth:`ReceiveStore.part_landing` whose bytes have not come yet.
    #: A message given up meanwhile stays counted until the last of them comes or its sender is lost.
    landing: int = 0
    #: When a part last came, or was given memory (``time.monotonic()``; set by every claim).
    touched: float = 0.0


def settle_waiter(waiter: Waiter, value: object = None, error: BaseException | None = None) -> None:
    """Resolve a waiter unless its receiver already gave up (timed out or cancelled)."""
    try:
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


def _call(release: Release | None) -> None:
    if release is not None:
        try:
            release()
        except Exception:  # a transport bug must not break the store
            logger.exception("releasing a frame's buffers failed")


class ReceiveStore:
    """Holds received chunks, wakes waiting receivers, enforces the memory bound."""

    def __init__(
        self,
        codec: Codec,
        *,
        rank: int,
        transport: str,
        max_bytes: int,
        device: str,
        on_recv: Callable[[Header, int], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        abandon_after: float | None = None,
        ends_learned: bool = False,
    ) -> None:
        """Create an empty store.

        Args:
            codec: Decodes arrived frames.
            rank: This sidecar's rank, for messages.
            transport: The transport's name, for messages.
            max_bytes: ``SIDECAR_MAX_BUFFERED_BYTES``.
            device: Where received tensors land (``SIDECAR_RECV_DEVICE``).
            on_recv: Called (on the delivering thread) for each chunk stored.
            loop: The event loop whose thread runs the releases of frames freed by ``mark_done``;
                ``None`` runs them at once, on the calling thread.
            abandon_after: Seconds after which a message in parts that no part reached is dropped
                (its send has timed out: ``SIDECAR_SEND_TIMEOUT`` covers all of a message's parts);
                ``None`` keeps it until its key is sent again or marked done, or its sender is lost.
            ends_learned: Whether the transport learns ids' ends by looking for chunks (pull-based, as
                mock-file: a missing chunk ends its id there), so that a smaller end found later wins.
                Otherwise ends come from senders, and a frame that gives an id another end than the
                known one is refused.
        """
        self._codec = codec
        self._rank = rank
        self._transport = transport
        self._max_bytes = max_bytes
        self._device = device
        self._on_recv = on_recv
        self._held: dict[Key, _Held] = {}
        #: The chunk numbers held per id, so that an id's end looks at its own chunks only.
        self._held_chunks: defaultdict[str, set[int]] = defaultdict(set)
        self._assembling: dict[Key, _Assembly] = {}
        #: Parts given memory by :meth:`part_landing` whose bytes are still arriving, by key, send and
        #: part: the assembly they land in (which a later send of the same key may have replaced).
        self._landing: dict[tuple[Key, int, int], _Assembly] = {}
        self._done: OrderedDict[Key, None] = OrderedDict()
        # Per-id facts, forgotten oldest first beyond DONE_MEMORY ids.
        self._ends: OrderedDict[str, int] = OrderedDict()
        self._sources: OrderedDict[str, int] = OrderedDict()
        self._lost: OrderedDict[str, str] = OrderedDict()
        self._waiters: defaultdict[Key, list[Waiter]] = defaultdict(list)
        self._loop = loop
        self._abandon_after = abandon_after
        self._ends_learned = ends_learned
        #: ``(key, message)`` of the messages in parts dropped for want of parts: their late parts are refused.
        self._abandoned: OrderedDict[tuple[Key, int], None] = OrderedDict()
        self._lock = threading.RLock()
        self.buffered_bytes = 0
        self._closed = False

    # -- the transport side -------------------------------------------------------------------

    def deliver(self, frame: Frame, release: Release | None = None) -> None:
        """Store an arrived frame (see :meth:`sidecar_core.Inbox.deliver`)."""
        try:
            with self._lock:
                self._deliver(frame, release)
        except BaseException:
            self._release_soon(release)
            raise

    def _deliver(self, frame: Frame, release: Release | None) -> None:
        h = frame.header
        self._check_open(h)
        if len(frame.buffers) != len(h.sizes):
            raise FrameError(f"{h.describe()}: header lists {len(h.sizes)} buffers, {len(frame.buffers)} arrived")
        if h.kind == "close":
            assert h.num_chunks is not None  # enforced by Header validation
            self._check_end(h)
            self._note_sender(h)
            self._set_end(h.id, h.num_chunks)
            self._release_soon(release)
            return
        key = (h.id, h.chunk_id)
        landed = self._take_landing(key, frame)
        self._check_new(key, h)
        if h.num_parts == 1:
            self._check_room(h, h.total_bytes)
            value = self._codec.decode(h, frame.buffers, self._device)
            self._note_sender(h)
            self._hold(key, h, value, h.total_bytes, release)
            return
        self._add_part(key, frame, landed)
        self._note_sender(h)
        self._release_soon(release)  # the part is in the assembly (copied there, or received there)

    def _take_landing(self, key: Key, frame: Frame) -> _Assembly | None:
        """The assembly a part was received into (see :meth:`part_landing`), or ``None``.

        Only a frame whose buffers are the memory handed out counts: any other frame with the same
        header is a second copy of the part, and is joined (or refused) as if no memory had been given.
        """
        h = frame.header
        if h.num_parts == 1:
            return None
        slot = (key, h.message, h.part)
        assembly = self._landing.get(slot)
        if assembly is None or len(frame.buffers) != len(h.sizes):
            return None
        pos = h.offset
        for buf, size in zip(frame.buffers, h.sizes, strict=True):
            if size and not _same_memory(buffer_tensor(buf), assembly.dest[pos : pos + size]):
                return None
            pos += size
        self._forget_landing(slot)
        return assembly

    def _forget_landing(self, slot: tuple[Key, int, int]) -> None:
        """A part's bytes came, or will not: stop waiting for them (and let a dropped message's memory go)."""
        assembly = self._landing.pop(slot)
        assembly.landing -= 1
        if not assembly.landing and self._assembling.get(slot[0]) is not assembly:  # given up: let it go now
            self.buffered_bytes -= assembly.first.total_bytes

    def _note_sender(self, h: Header) -> None:
        """Remember who sends ``h.id`` (for a lost peer's receives); only for frames the store took."""
        _remember(self._sources, h.id, h.src, keep=self._in_use)
        self._lost.pop(h.id, None)

    def _in_use(self, id: str) -> bool:
        """Whether chunks of ``id`` are held: its end and sender are remembered however many ids come after."""
        return id in self._held_chunks

    def _check_open(self, h: Header) -> None:
        if self._closed:  # a transport still reading while the sidecar shuts down
            raise SidecarClosedError(f"{h.describe()}: sidecar rank {self._rank} is shutting down; it was not stored")

    def _check_new(self, key: Key, h: Header) -> None:
        """Refuse a chunk that is held, was marked done, or lies past its id's end."""
        if key in self._held or key in self._done:
            state = "is already held" if key in self._held else "was already marked done"
            raise DuplicateChunkError(
                f"{h.describe()} {state} on rank {self._rank}; send it under a fresh id (a chunk is refused while "
                f"it is held, and after mark_done for the last {DONE_MEMORY} chunks released)"
            )
        end = self._ends.get(h.id)
        if end is not None and h.chunk_id >= end:
            raise FrameError(
                f"{h.describe()} is past the end of id {h.id!r}, which has {end} chunks on rank {self._rank} "
                "(from close_stream or num_chunks); send chunks below the end, or close the stream later"
            )
        self._check_end(h)

    def _check_end(self, h: Header) -> None:
        """Refuse a frame that gives its id another number of chunks than the end already known.

        Taking the new end would drop chunks already acknowledged past it, or leave chunks promised
        before it unreachable.
        """
        end = self._ends.get(h.id)
        if h.num_chunks is not None and end is not None and h.num_chunks != end and not self._ends_learned:
            what = "close_stream" if h.kind == "close" else h.describe()
            raise FrameError(
                f"{what} gives id {h.id!r} {h.num_chunks} chunks, but it has {end} on rank {self._rank} (from an "
                "earlier close_stream or num_chunks); give every chunk of an id the same num_chunks, and close a "
                "stream once"
            )

    def part_landing(self, header: Header, *, arriving: int = 0) -> torch.Tensor | None:
        """Memory inside its message's assembly for a part to be received into (see :class:`sidecar_core.Inbox`)."""
        with self._lock:
            self._check_open(header)
            if header.kind != "data" or header.num_parts == 1:
                return None
            key = (header.id, header.chunk_id)
            self._check_new(key, header)
            assembly = self._assembly_for(key, header, arriving)
            self._claim(key, assembly, header)
            self._landing[(key, header.message, header.part)] = assembly
            assembly.landing += 1
            return assembly.dest[header.offset : header.offset + header.frame_bytes]

    def _assembly_for(self, key: Key, h: Header, arriving: int = 0) -> _Assembly:
        """The assembly of ``h``'s message, made (and its bytes counted) at its first part.

        Raises:
            FrameError: ``h`` disagrees with the parts before it.
            CapacityError: The message does not fit the bound.
        """
        assembly = self._assembling.get(key)
        if assembly is not None and h.message != assembly.first.message and h.src == assembly.first.src:
            if h.part != 0:
                raise FrameError(
                    f"{h.describe()}: part {h.part} from rank {h.src} belongs to another send of this id and chunk "
                    "than the parts before it; send each id and chunk once at a time"
                )
            # The sender gave up on the earlier send (timed out or cancelled) and sends again.
            logger.info("%s: rank %d sends it again; the parts of its earlier send are dropped", h.describe(), h.src)
            self._drop_assembly(key)
            assembly = None
        if assembly is None:
            if (key, h.message) in self._abandoned:
                raise FrameError(
                    f"{h.describe()}: part {h.part} from rank {h.src} came after its message was given up on rank "
                    f"{self._rank}, which no part had reached for {self._abandon_after:g}s (twice its "
                    "SIDECAR_SEND_TIMEOUT); send the message again, and set the same SIDECAR_SEND_TIMEOUT on "
                    "every sidecar"
                )
            self._check_room(h, h.total_bytes, arriving)
            import torch  # imported when first needed: importing sidecar_core stays light

            device = self._land_device(h)
            try:
                dest = torch.empty(h.total_bytes, dtype=torch.uint8, device=device)
            except (RuntimeError, MemoryError) as exc:  # torch's out-of-memory errors
                raise CapacityError(
                    f"{h.describe()}: rank {self._rank} cannot allocate {h.total_bytes} bytes on {device}: {exc}"
                ) from exc
            assembly = self._assembling[key] = _Assembly(h, dest)
            self.buffered_bytes += h.total_bytes
        first = assembly.first
        if (h.num_parts, h.layout, h.serializer, h.meta, h.src, h.message) != (
            first.num_parts,
            first.layout,
            first.serializer,
            first.meta,
            first.src,
            first.message,
        ):
            raise FrameError(
                f"{h.describe()}: part {h.part} from rank {h.src} disagrees with part {first.part} from rank "
                f"{first.src} on layout, metadata or sender"
            )
        return assembly

    def _claim(self, key: Key, assembly: _Assembly, h: Header) -> None:
        """Take part ``h``'s bytes in the assembly: refused if the part came (or is landing) already, or overlaps."""
        if h.part in assembly.parts or (key, h.message, h.part) in self._landing:
            raise FrameError(f"{h.describe()}: part {h.part} arrived twice")
        start, end = h.offset, h.offset + h.frame_bytes
        spans = assembly.spans
        at = bisect.bisect_left(spans, (start, end))
        if start < end and ((at > 0 and spans[at - 1][1] > start) or (at < len(spans) and spans[at][0] < end)):
            raise FrameError(f"{h.describe()}: part {h.part} (bytes {start} to {end}) overlaps another part")
        if start < end:  # an empty part covers nothing, and as a span it would hide its neighbours
            spans.insert(at, (start, end))
        assembly.touched = time.monotonic()

    def _add_part(self, key: Key, frame: Frame, landed: _Assembly | None) -> None:
        """Join a part into its message; ``landed``: the assembly it was received into (see :meth:`part_landing`)."""
        h = frame.header
        assembly = landed
        if assembly is None:
            if (key, h.message, h.part) in self._landing:  # a second copy: must not start (or drop) any send
                raise FrameError(f"{h.describe()}: part {h.part} arrived twice")
            assembly = self._assembly_for(key, h)
            self._claim(key, assembly, h)
        elif self._assembling.get(key) is not assembly:  # its bytes were claimed when its memory was handed out
            raise FrameError(
                f"{h.describe()}: part {h.part} from rank {h.src} arrived after its send was given up (the sender "
                "sent the message again, or its sender was lost)"
            )
        assembly.touched = time.monotonic()
        pos = h.offset
        for buf, size in zip(frame.buffers, h.sizes, strict=True):
            source, target = buffer_tensor(buf), assembly.dest[pos : pos + size]
            if size and not _same_memory(source, target):  # a part received in place is there already
                target.copy_(source, non_blocking=False)
            pos += size
        assembly.parts.add(h.part)
        assembly.covered += h.frame_bytes
        first = assembly.first
        if len(assembly.parts) < first.num_parts:
            return
        self._drop_assembly(key)  # complete, or refused: the message is counted as held, or not at all
        if assembly.covered != first.total_bytes:
            raise FrameError(
                f"{h.describe()}: its {first.num_parts} parts hold {assembly.covered} of {first.total_bytes} bytes"
            )
        views: list[Buffer] = []
        pos = 0
        for size in first.layout:
            views.append(assembly.dest[pos : pos + size])
            pos += size
        value = self._codec.decode(first, views, self._device)
        self._hold(key, first, value, first.total_bytes, None)

    def _land_device(self, h: Header) -> str:
        return self._device if self._device.startswith("cuda") else "cpu"

    def _check_room(self, h: Header, nbytes: int, arriving: int = 0) -> None:
        held = self.buffered_bytes + arriving
        if held + nbytes > self._max_bytes and self._assembling:  # short of room: let abandoned messages go
            self._drop_abandoned()
            held = self.buffered_bytes + arriving
        if held + nbytes > self._max_bytes:
            what = f"{held} held or arriving" if arriving else f"{held} held"
            raise CapacityError(
                f"{h.describe()}: {nbytes} bytes would exceed SIDECAR_MAX_BUFFERED_BYTES="
                f"{self._max_bytes} on rank {self._rank} ({what}); the receiver "
                "must mark_done chunks it has consumed, or raise the bound"
            )

    def _drop_abandoned(self) -> None:
        """Drop the messages in parts that no part reached for ``abandon_after`` seconds (none still landing)."""
        if self._abandon_after is None:
            return
        cutoff = time.monotonic() - self._abandon_after
        for key in [k for k, into in self._assembling.items() if into.touched < cutoff and not into.landing]:
            first = self._assembling[key].first
            logger.warning(
                "%s: dropped the parts of a message from rank %d on rank %d: no part came for %gs, so its send has "
                "timed out",
                first.describe(),
                first.src,
                self._rank,
                self._abandon_after,
            )
            _remember(self._abandoned, (key, first.message), None)
            self._drop_assembly(key)

    def _hold(self, key: Key, h: Header, value: object, nbytes: int, release: Release | None) -> None:
        """Store a complete chunk and wake its receivers.

        Once stored, the chunk is the store's: nothing after that may raise to :meth:`deliver`, whose
        caller would then release memory a receive may already hold (a failure is logged).
        """
        held = self._held[key] = _Held(value, nbytes, h.src, release)
        self._held_chunks[key[0]].add(key[1])
        self.buffered_bytes += nbytes
        for waiter in self._waiters.pop(key, []):
            held.handed = True
            settle_waiter(waiter, value)
        try:
            if h.num_chunks is not None:
                self._set_end(h.id, h.num_chunks)
        except Exception:  # the chunk is stored: the caller must not release or refuse it now
            logger.exception("recording the end of id %r failed after %s was stored", h.id, h.describe())
        if self._on_recv is not None:
            try:
                self._on_recv(h, nbytes)
            except Exception:
                logger.exception("the on_recv callback failed for %s", h.describe())

    def _set_end(self, id: str, num_chunks: int) -> None:
        """Record the end of ``id`` and apply a new one (a learned end only ever shrinks; see ``ends_learned``)."""
        known = self._ends.get(id)
        end = num_chunks if known is None else min(num_chunks, known)
        _remember(self._ends, id, end, keep=self._in_use)
        if end == known:  # nothing new (every chunk of a message with num_chunks says it again)
            return
        for key in [k for k in self._waiters if k[0] == id and k[1] >= end]:
            for waiter in self._waiters.pop(key):
                settle_waiter(waiter, None)
        # Past the end, a recv returns None: chunks that arrived before the end was known are let go,
        # unless a receive got one already (it may hold views of its memory until mark_done).
        for chunk_id in [c for c in self._held_chunks.get(id, ()) if c >= end and not self._held[(id, c)].handed]:
            logger.warning("dropped id=%r chunk=%d on rank %d: past the id's end (%d)", id, chunk_id, self._rank, end)
            self._release_on_loop(self._pop_held((id, chunk_id)).release)
        # A message past the end still in parts can never be completed (its later parts are refused).
        for key in [k for k in self._assembling if k[0] == id and k[1] >= end]:
            self._drop_assembly(key)

    def peer_lost(self, rank: int, reason: str) -> None:
        """Fail receives that wait on ids last sent by ``rank`` (see :class:`sidecar_core.Inbox`)."""
        with self._lock:
            self._peer_lost(rank, reason)

    def _peer_lost(self, rank: int, reason: str) -> None:
        self._drop_parts(rank, None)
        ids = {id for id, src in self._sources.items() if src == rank}
        for id in ids:
            _remember(self._lost, id, f"rank {rank} was lost: {reason}")
        for key in [k for k in self._waiters if k[0] in ids]:
            error = self._lost_error(key)
            for waiter in self._waiters.pop(key):
                settle_waiter(waiter, error=error)

    def parts_lost(self, rank: int, messages: Collection[int]) -> None:
        """Drop the unfinished messages in parts ``messages`` from ``rank`` (see :class:`sidecar_core.Inbox`)."""
        with self._lock:
            self._drop_parts(rank, messages)

    def _drop_parts(self, rank: int, messages: Collection[int] | None) -> None:
        """Drop the unfinished messages in parts from ``rank`` (``messages``: only those), and their landings.

        Their connection is gone: the bytes of parts still landing will not come.
        """
        for key in [
            k
            for k, into in self._assembling.items()
            if into.first.src == rank and (messages is None or into.first.message in messages)
        ]:
            self._drop_assembly(key)
        for slot in [
            slot
            for slot, into in self._landing.items()
            if into.first.src == rank and (messages is None or slot[1] in messages)
        ]:
            self._forget_landing(slot)

    def _lost_error(self, key: Key) -> PeerLostError:
        return PeerLostError(
            f"recv id={key[0]!r} chunk={key[1]} on rank {self._rank} ({self._transport}): {self._lost[key[0]]} "
            "before it sent this chunk"
        )

    # -- the user side ------------------------------------------------------------------------

    def past_end(self, id: str, chunk_id: int) -> bool:
        """Whether ``chunk_id`` is at or past the known end of ``id`` (and not marked done; any thread)."""
        with self._lock:
            return self._past_end(id, chunk_id) and (id, chunk_id) not in self._done

    def _past_end(self, id: str, chunk_id: int) -> bool:
        end = self._ends.get(id)
        return end is not None and chunk_id >= end

    def peek(self, id: str, chunk_id: int) -> tuple[bool, object]:
        """``(True, value)`` if the chunk is held (and not past its id's end), else ``(False, None)`` (any thread)."""
        with self._lock:
            held = self._held.get((id, chunk_id))
            if held is None or self._past_end(id, chunk_id):
                return False, None
            held.handed = True
            return True, held.value

    def add_waiter(self, id: str, chunk_id: int, waiter: Waiter) -> None:
        """Resolve ``waiter`` with the chunk (``None`` past the end of its id) now or when it arrives.

        Any thread may call it. ``waiter`` is a thread-safe future, so the receiving thread wakes
        without another hop through the event loop. It fails with :class:`AlreadyDoneError`
        (released with ``mark_done``) or :class:`PeerLostError` (the sender of this id
        disconnected). Timeouts are the waiting side's business: it calls :meth:`drop_waiter` and
        :meth:`timeout_error`.
        """
        with self._lock:
            self._add_waiter(id, chunk_id, waiter)

    def _add_waiter(self, id: str, chunk_id: int, waiter: Waiter) -> None:
        if waiter.done():  # its receive gave up already (a pull-based transport answers late)
            return
        if self._closed:  # a receive that started while the sidecar shut down
            settle_waiter(waiter, error=self.closed_error(id, chunk_id))
            return
        key = (id, chunk_id)
        held = self._held.get(key)
        past_end = self._past_end(id, chunk_id)
        if held is not None and not past_end:
            held.handed = True
            settle_waiter(waiter, held.value)
        elif key in self._done:
            settle_waiter(waiter, error=self._done_error(id, chunk_id))
        elif past_end:
            settle_waiter(waiter, None)
        elif id in self._lost:
            settle_waiter(waiter, error=self._lost_error(key))
        else:
            self._waiters[key].append(waiter)

    def drop_waiter(self, id: str, chunk_id: int, waiter: Waiter) -> None:
        """Forget a waiter that gave up (timed out or was cancelled); any thread."""
        key = (id, chunk_id)
        with self._lock:
            waiters = self._waiters.get(key)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[key]

    def timeout_error(self, id: str, chunk_id: int, timeout: float) -> RecvTimeoutError:
        """The error for a receive of ``(id, chunk_id)`` that waited ``timeout`` seconds in vain."""
        src = self._sources.get(id)
        peer = f"last data for this id came from rank {src}" if src is not None else "no peer has sent this id yet"
        return RecvTimeoutError(
            f"recv id={id!r} chunk={chunk_id} timed out after {timeout:g}s on rank {self._rank} "
            f"(transport {self._transport}; {peer}). Check that the sender sends to rank {self._rank} "
            "with the same id and chunk, or raise SIDECAR_RECV_TIMEOUT."
        )

    async def get(self, id: str, chunk_id: int, timeout: float) -> object:
        """Wait for a chunk on the store's own loop; ``None`` if it is at or past the end of its id.

        Raises:
            AlreadyDoneError: The chunk was released with ``mark_done``.
            RecvTimeoutError: Nothing arrived within ``timeout`` seconds.
            PeerLostError: The peer that was sending this id disconnected.
        """
        waiter: Waiter = concurrent.futures.Future()
        self.add_waiter(id, chunk_id, waiter)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(waiter), timeout)
        except TimeoutError:
            raise self.timeout_error(id, chunk_id, timeout) from None
        finally:
            self.drop_waiter(id, chunk_id, waiter)

    def mark_done(self, id: str, chunk_id: int) -> None:
        """Release a chunk's memory; later receives of it raise. Unknown chunks are ignored.

        Any thread may call it; the frame's release runs on the loop thread (see the module docstring).
        """
        key = (id, chunk_id)
        with self._lock:
            if key in self._assembling:  # given up before every part came: later parts are refused
                self._drop_assembly(key)
                _remember(self._done, key, None)
                for waiter in self._waiters.pop(key, []):
                    settle_waiter(waiter, error=self._done_error(id, chunk_id))
            if key not in self._held:
                return
            held = self._pop_held(key)
            _remember(self._done, key, None)
        self._release_on_loop(held.release)

    def _pop_held(self, key: Key) -> _Held:
        """Forget a held chunk and stop counting its bytes (its release is the caller's to run)."""
        chunks = self._held_chunks[key[0]]
        chunks.discard(key[1])
        if not chunks:
            del self._held_chunks[key[0]]
        held = self._held.pop(key)
        self.buffered_bytes -= held.nbytes
        return held

    def _drop_assembly(self, key: Key) -> None:
        """Forget a message being joined and stop counting its bytes (once no part still lands in it)."""
        assembly = self._assembling.pop(key)
        if not assembly.landing:  # else parts still arrive into its memory: the last one lets it go
            self.buffered_bytes -= assembly.first.total_bytes

    def _release_soon(self, release: Release | None) -> None:
        """Run a frame's release at once on the loop thread, else hand it to the loop (see :class:`sidecar_core.Inbox`).

        A transport may deliver from a thread inside ``poll_while_waiting``; its releases still run on the loop.
        """
        if release is None:
            return
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # no loop runs on this thread
            here = self._loop is None
        if here:
            _call(release)
        else:
            self._release_on_loop(release)

    def _release_on_loop(self, release: Release | None) -> None:
        """Run a frame's release on the loop thread (at once where the store has no loop)."""
        if release is None:
            return
        if self._loop is None:
            _call(release)
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the transport and the memory it lent are gone
            self._loop.call_soon_threadsafe(_call, release)

    def close(self) -> None:
        """Release everything and fail all waiting receives with :class:`SidecarClosedError`.

        The releases run after the store's lock is let go, as in :meth:`mark_done`: a release may
        wait for a transport's own lock, which a thread delivering a frame holds while it waits for
        the store's.
        """
        with self._lock:
            self._closed = True
            held = list(self._held.values())
            self._held.clear()
            self._held_chunks.clear()
            self._assembling.clear()
            self._landing.clear()
            for (id, chunk_id), waiters in self._waiters.items():
                for waiter in waiters:
                    settle_waiter(waiter, error=self.closed_error(id, chunk_id))
            self._waiters.clear()
            self.buffered_bytes = 0
        for entry in held:
            _call(entry.release)

    def _done_error(self, id: str, chunk_id: int) -> AlreadyDoneError:
        return AlreadyDoneError(
            f"id={id!r} chunk={chunk_id} was marked done on rank {self._rank}; recv it before mark_done"
        )

    def closed_error(self, id: str, chunk_id: int) -> SidecarClosedError:
        """The error for a receive of ``(id, chunk_id)`` that the sidecar's shutdown ended."""
        return SidecarClosedError(f"recv id={id!r} chunk={chunk_id}: sidecar rank {self._rank} was shut down")


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two flat byte tensors are the same memory (a part received in place)."""
    return a.device == b.device and a.data_ptr() == b.data_ptr()


def _remember(table: OrderedDict[_K, _V], key: _K, value: _V, keep: Callable[[_K], bool] | None = None) -> None:
    """Record ``key`` as the newest entry, forgetting the oldest beyond ``DONE_MEMORY``.

    An oldest entry that ``keep`` says is still needed is moved to the newest end instead (one per
    call), so the table may outgrow the limit by the entries in use.
    """
    table[key] = value
    table.move_to_end(key)
    kept = False
    while len(table) > DONE_MEMORY:
        oldest = next(iter(table))
        if keep is None or not keep(oldest):
            del table[oldest]
        elif kept:
            break
        else:
            table.move_to_end(oldest)
            kept = True
