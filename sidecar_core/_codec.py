"""Objects to frames and back: serializer choice, part splitting, decoding."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from msgspec.structs import replace

from sidecar_core._errors import FrameError, SerializationError, SidecarError
from sidecar_core._frame import Buffer, Frame, Header, buffer_nbytes, check_header_size
from sidecar_core._serializer import Encoded, Serializer


class Codec:
    """Encodes objects with the first serializer that accepts them and decodes frames by name."""

    def __init__(self, serializers: Sequence[Serializer]) -> None:
        self._ordered = list(serializers)
        self._by_name = {s.NAME: s for s in self._ordered}

    @property
    def names(self) -> list[str]:
        """Names of the loaded serializers, in the order they are tried."""
        return [s.NAME for s in self._ordered]

    def encode(self, obj: object, serializer: str | None = None) -> tuple[str, Encoded]:
        """Encode ``obj`` with ``serializer`` or the first one that accepts it.

        ``encode`` is called only with an object its serializer's ``accepts`` took.

        Raises:
            SerializationError: No serializer accepts ``obj`` (or the named one is unknown or refuses it).
        """
        if serializer is not None:
            chosen = self._by_name.get(serializer)
            if chosen is None:
                raise SerializationError(f"unknown serializer {serializer!r}; installed: {', '.join(self.names)}")
            if not chosen.accepts(obj):
                raise SerializationError(
                    f"serializer {serializer!r} refuses this {type(obj).__module__}.{type(obj).__qualname__}: it "
                    f"cannot carry it exactly (the {serializer} serializer's documentation says what it takes)"
                )
            return chosen.NAME, chosen.encode(obj)
        for candidate in self._ordered:
            if candidate.accepts(obj):
                return candidate.NAME, candidate.encode(obj)
        raise SerializationError(
            f"no serializer accepts {type(obj).__module__}.{type(obj).__qualname__}. Send a tensor, a "
            "list/tuple of tensors, a JSON-compatible dict or list, or None/bool/int/float/str/bytes; "
            f"installed serializers: {', '.join(self.names)}"
        )

    def frames(
        self,
        obj: object,
        *,
        id: str,
        chunk_id: int,
        num_chunks: int | None,
        src: int,
        max_part_bytes: int | None,
        serializer: str | None = None,
    ) -> list[Frame]:
        """Encode ``obj`` into one frame, or into parts of at most ``max_part_bytes`` each.

        Raises:
            SerializationError: No serializer accepts ``obj``, or its buffers are not flat, contiguous bytes.
            FrameError: A frame's header would exceed ``MAX_HEADER_BYTES`` (too much metadata).
        """
        name, enc = self.encode(obj, serializer)
        for buf in enc.buffers:
            # Transports send each buffer as one block of bytes, and parts cut them by byte: a strided
            # buffer would fail there, and a tensor of wider elements would be cut in the wrong places.
            if isinstance(buf, memoryview):
                flat = buf.c_contiguous
            else:
                import torch  # loaded already: the buffer is a tensor

                flat = buf.dtype == torch.uint8 and buf.dim() == 1 and buf.is_contiguous()
            if not flat:
                raise SerializationError(
                    f"serializer {name!r} returned a buffer that is not one flat block of bytes; its encode "
                    "must return C-contiguous memoryviews and flat torch.uint8 tensors (tensor.contiguous().view(-1)"
                    ".view(torch.uint8))"
                )
        layout = [buffer_nbytes(b) for b in enc.buffers]
        whole = Header(
            kind="data",
            id=id,
            chunk_id=chunk_id,
            num_chunks=num_chunks,
            src=src,
            serializer=name,
            meta=enc.meta,
            layout=layout,
            device=enc.device,
            sizes=layout,
        )
        if max_part_bytes is None or whole.total_bytes <= max_part_bytes:
            frames = [Frame(whole, list(enc.buffers))]
        else:
            pieces = list(_split(enc.buffers, layout, max_part_bytes))
            message = secrets.randbits(63)  # tells this send's parts from another send's of the same chunk
            frames = [
                Frame(replace(whole, part=i, num_parts=len(pieces), offset=offset, sizes=sizes, message=message), bufs)
                for i, (offset, sizes, bufs) in enumerate(pieces)
            ]
        for frame in frames:  # refused here, not by the receiver (a transport's header buffer may not hold it)
            check_header_size(frame.header)
        return frames

    def decode(self, header: Header, buffers: Sequence[Buffer], device: str) -> object:
        """Rebuild the object of a complete message.

        Raises:
            FrameError: Unknown serializer, metadata inconsistent with the buffers, or any other failure
                of the serializer's ``decode`` (a bug in a plugin must not break the transport that
                delivers: the sender is told why its frame was refused).
            SidecarError: Another refusal the serializer raised itself (a ``CapacityError``), as it is.
        """
        serializer = self._by_name.get(header.serializer)
        if serializer is None:
            raise FrameError(
                f"{header.describe()}: unknown serializer {header.serializer!r}; this sidecar has "
                f"{', '.join(self.names)}. Install the same serializer plugins on both sides."
            )
        try:
            return serializer.decode(header.meta, buffers, device)
        except SidecarError:  # FrameError, or a refusal of another kind (CapacityError): passed on as it is
            raise
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
            raise FrameError(
                f"{header.describe()}: serializer {header.serializer!r} rejected the frame: {exc}"
            ) from exc
        except Exception as exc:  # BufferError, AttributeError, ...: a view it cannot read, or a bug of its own
            raise FrameError(
                f"{header.describe()}: serializer {header.serializer!r} failed to decode the frame: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def _split(buffers: Sequence[Buffer], layout: Sequence[int], limit: int) -> list[tuple[int, list[int], list[Buffer]]]:
    """Cut the concatenation of ``buffers`` into windows of ``limit`` bytes, without copying."""
    parts: list[tuple[int, list[int], list[Buffer]]] = []
    offset = 0
    sizes: list[int] = []
    bufs: list[Buffer] = []
    room = limit
    start = 0
    for buf, size in zip(buffers, layout, strict=True):
        flat = buf.cast("B") if isinstance(buf, memoryview) else buf
        pos = 0
        while pos < size or (size == 0 and pos == 0):
            take = min(room, size - pos)
            sizes.append(take)
            bufs.append(flat[pos : pos + take])
            pos += take
            room -= take
            if room == 0:
                parts.append((start, sizes, bufs))
                offset += limit
                start, sizes, bufs, room = offset, [], [], limit
            if size == 0:
                break
    if sizes:
        parts.append((start, sizes, bufs))
    return parts
