"""The frame: what the core hands a transport and a transport hands back.

A frame is a small JSON header plus payload buffers that are never copied into the header. A
message (one ``(id, chunk_id)``) travels as one frame, or as several *parts* when it is larger than
the chunk size; the receiving core joins parts back together.

On byte streams (sockets) a frame is written as::

    b"SCF1" | header length (u32, little endian) | header (UTF-8 JSON) | buffers, back to back

Headers are validated (sizes, counts, ids) before the receiver allocates anything for the payload.
"""

from __future__ import annotations

import struct
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

import msgspec

from sidecar_core._errors import FrameError

if TYPE_CHECKING:
    import torch

MAGIC = b"SCF1"
PREFIX = struct.Struct("<4sI")
#: Bytes of the prefix that starts every frame on the wire (read them, then check them with :func:`header_length`).
PREFIX_BYTES = PREFIX.size
MAX_HEADER_BYTES = 1 << 20
MAX_BUFFERS = 4096
#: Longest message id, in characters.
MAX_ID_CHARS = 1024

#: A payload buffer: host memory as a flat byte ``memoryview``, or a flat ``torch.uint8`` tensor
#: (on CUDA for GPU payloads, or a CPU tensor where a transport already holds one).
Buffer: TypeAlias = "memoryview | torch.Tensor"

#: Serializes the warning filter changes of :func:`buffer_tensor` among threads.
_WARNINGS_LOCK = threading.Lock()
#: Whether torch has given its one warning about read-only buffers (see :func:`buffer_tensor`).
_READONLY_WARNED = False

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_Sizes = Annotated[list[NonNegative], msgspec.Meta(max_length=MAX_BUFFERS)]


class Header(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The metadata of one frame. Unknown fields are rejected.

    Decoding (:func:`decode_header`) checks the types and bounds strictly (no coercion: ``"1"`` is
    not an int, ``true`` is not a number) and then the rules of ``__post_init__``. Building one in
    code runs the rules of ``__post_init__`` but not the type checks: the core builds headers from
    values it has checked itself.
    """

    kind: Literal["data", "close"]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    chunk_id: NonNegative = 0
    #: Total chunks of the id; ``None`` while streaming (the end comes with a ``close`` frame).
    num_chunks: NonNegative | None = 1
    src: NonNegative
    part: NonNegative = 0
    num_parts: Annotated[int, msgspec.Meta(ge=1)] = 1
    #: Shared by the parts of one send of a message in parts, and different for another send of the
    #: same id and chunk (a resend after a send that timed out or was cancelled); 0 for one frame.
    message: NonNegative = 0
    serializer: str = ""
    meta: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Sizes of the message's buffers once all parts are joined.
    layout: _Sizes = msgspec.field(default_factory=list)
    #: Where this frame's bytes start in the message's payload (its buffers laid end to end).
    offset: NonNegative = 0
    #: Sizes of the buffers this frame carries.
    sizes: _Sizes = msgspec.field(default_factory=list)
    #: Device class of the sender's buffers: lets a transport pick a GPU path.
    device: Literal["cpu", "cuda"] = "cpu"

    def __post_init__(self) -> None:
        if self.part >= self.num_parts:
            raise ValueError(f"part {self.part} is not below num_parts {self.num_parts}")
        total = sum(self.layout)
        if self.offset + sum(self.sizes) > total:
            raise ValueError(f"frame bytes {self.offset}+{sum(self.sizes)} exceed the message's {total}")
        if self.num_parts == 1 and (self.offset != 0 or self.sizes != self.layout):
            raise ValueError("a single-part frame must carry exactly the message layout")
        if self.kind == "close" and (self.num_chunks is None or self.sizes or self.layout):
            raise ValueError("a close frame carries num_chunks and no buffers")
        if self.num_chunks is not None and self.kind == "data" and self.chunk_id >= self.num_chunks:
            raise ValueError(f"chunk_id {self.chunk_id} is not below num_chunks {self.num_chunks}")

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole message payload (all parts)."""
        return sum(self.layout)

    @property
    def frame_bytes(self) -> int:
        """Bytes of the payload this frame carries."""
        return sum(self.sizes)

    def describe(self) -> str:
        """Short human form used in error messages."""
        return f"id={self.id!r} chunk={self.chunk_id}"


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Header)


@dataclass(slots=True)
class Frame:
    """A header and the buffers it describes (``len(buffers) == len(header.sizes)``)."""

    header: Header
    buffers: list[Buffer] = field(default_factory=list)


def buffer_nbytes(buf: Buffer) -> int:
    """Size in bytes of a payload buffer."""
    if isinstance(buf, memoryview):
        return buf.nbytes
    return int(buf.numel()) * int(buf.element_size())


def buffer_tensor(buf: Buffer) -> torch.Tensor:
    """A flat ``torch.uint8`` tensor over a payload buffer's bytes, without copying.

    A read-only ``memoryview`` (a transport's receive memory) is wrapped as it is: the tensor must
    not be written to. PyTorch has no read-only tensors and warns about such buffers, once per
    process (every time under ``torch.set_warn_always(True)``); that warning is silenced here, under
    a lock, since ``warnings.catch_warnings`` changes process-wide state and receiving threads may
    call this at once. Once torch has warned, later calls skip it unless torch warns always: after
    a large copy has flushed the caches, entering it cost about 50 µs per call.
    """
    import torch

    global _READONLY_WARNED  # set once, the first time
    if not isinstance(buf, memoryview):
        return buf
    if not buf.nbytes:
        return torch.empty(0, dtype=torch.uint8)
    if not buf.readonly or (_READONLY_WARNED and not torch.is_warn_always_enabled()):
        return torch.frombuffer(buf, dtype=torch.uint8)
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        tensor = torch.frombuffer(buf, dtype=torch.uint8)
        _READONLY_WARNED = True
    return tensor


def check_sender(header: Header, rank: int) -> None:
    """Refuse an arrived frame whose header names another sender than the rank its connection proved.

    The store files a frame under ``header.src`` (whose loss fails its receives and frees its parts),
    so a frame must not speak for another rank.

    Raises:
        FrameError: ``header.src`` is not ``rank``.
    """
    if header.src != rank:
        raise FrameError(
            f"{header.describe()}: its header says it comes from rank {header.src}, but it came over the "
            f"connection from rank {rank}; a sidecar sends its own rank"
        )


def check_header_size(header: Header) -> None:
    """Refuse a header to be sent that a receiver would refuse for its size.

    Raises:
        FrameError: Its JSON is over ``MAX_HEADER_BYTES`` (the message says how to fix that).
    """
    try:
        length = len(_ENCODER.encode(header))
    except UnicodeEncodeError:  # an id that is not valid UTF-8: only a storage transport (mock-file) takes it
        return
    if length > MAX_HEADER_BYTES:
        meta = len(_ENCODER.encode(header.meta))
        raise FrameError(
            f"{header.describe()}: its frame header would be {length} bytes, over the {MAX_HEADER_BYTES}-byte "
            f"limit ({meta} of them the metadata of serializer {header.serializer!r}); send fewer tensors per "
            "message, or less metadata"
        )


def encode_header(header: Header) -> bytes:
    """Return the wire prefix and JSON header of a frame (payload buffers follow it)."""
    body = _ENCODER.encode(header)
    return PREFIX.pack(MAGIC, len(body)) + body


def header_length(prefix: bytes) -> int:
    """Validate the 8-byte wire prefix and return the JSON header's length.

    Raises:
        FrameError: The prefix is not 8 bytes, its magic is wrong (the peer is not a sidecar) or the
            header is too large.
    """
    if len(prefix) != PREFIX.size:
        raise FrameError(f"frame prefix of {len(prefix)} bytes, expected {PREFIX.size}")
    magic, length = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {magic!r}: the peer is not a sidecar or speaks another version")
    if length > MAX_HEADER_BYTES:
        raise FrameError(f"frame header of {length} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    return int(length)


def decode_header(body: bytes | bytearray) -> Header:
    """Parse and validate a JSON frame header.

    Raises:
        FrameError: The header is not valid JSON or breaks a rule (the message says which).
    """
    try:
        return _DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise FrameError(f"malformed frame header: {exc}") from None
    except UnicodeDecodeError:  # in a string: JSON text must be UTF-8
        raise FrameError("malformed frame header: a string in it is not UTF-8 text") from None
    except RecursionError:  # metadata nested thousands deep
        raise FrameError("malformed frame header: it nests too deeply") from None
