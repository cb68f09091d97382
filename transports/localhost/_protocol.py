"""The wire protocol of the localhost transport's control socket.

Every message is a fixed 20-byte envelope and a body::

    b"SLH1" | type (u8) | 3 pad bytes | body length (u32, little endian) | arg (u64) | body

``arg`` is the frame's sequence number for frame-related messages. A sidecar connects to a peer
(the *sender* side) and sends ``HELLO``; the peer (the *receiver* side) answers ``WELCOME`` or
``REFUSED``. After that, the sender sends frames and the receiver answers each with ``ACK`` or
``NACK`` and, once it no longer needs a frame's shared memory, ``RELEASE``:

=========== ========= ====================================================================
type        direction body
=========== ========= ====================================================================
HELLO       s → r     JSON :class:`Hello`
WELCOME     r → s     JSON :class:`Welcome`
REFUSED     r → s     JSON :class:`Problem`; the receiver closes the connection
FRAME       s → r     a core frame (``SCF1`` prefix, JSON header, buffers inline)
POOL        s → r     u64 pool size; the pool's memfd travels as ``SCM_RIGHTS`` ancillary data
SHM_FRAME   s → r     u64 slot offset, u64 bytes ready, then the core frame without buffers
READY       s → r     u64 bytes of the slot ready (a staged CUDA frame's copy progressed)
ABORT       s → r     JSON :class:`Problem`: the sender gave up on a staged frame
IPC_FRAME   s → r     u32 descriptor length, JSON :class:`IpcBuffers`, the core frame without buffers
ACK         r → s     empty: the inbox accepted frame ``arg``
NACK        r → s     JSON :class:`Problem`: the inbox refused frame ``arg``
RELEASE     r → s     empty: the receiver no longer reads frame ``arg``'s shared memory
ERROR       r → s     JSON :class:`Problem`: the input was malformed; the receiver closes
=========== ========= ====================================================================

Everything a receiver reads is validated here before it allocates or maps anything.
"""

from __future__ import annotations

import enum
import socket
import struct
from typing import Annotated, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from sidecar_core import FrameError, Header, decode_header, header_length
from sidecar_core._frame import MAX_HEADER_BYTES, PREFIX

MAGIC = b"SLH1"
#: Spoken in the handshake; peers of another version refuse each other with a clear error. 2: frame
#: headers carry ``message`` (parts of one send); WELCOME says whether the receiver pins the pool.
VERSION = 2
ENVELOPE = struct.Struct("<4sB3xIQ")
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
SHM_PREFIX = struct.Struct("<QQ")

#: The largest payload a frame may carry inline on the socket (the shm threshold's upper bound).
MAX_INLINE_PAYLOAD = 16 << 20
#: The largest message body a receiver accepts.
MAX_BODY = MAX_INLINE_PAYLOAD + MAX_HEADER_BYTES + (64 << 10)
#: Buffers inside a shared-memory slot start on this boundary, so any dtype can view them.
ALIGN = 64


class Msg(enum.IntEnum):
    """Message types (the envelope's type byte)."""

    HELLO = 1
    WELCOME = 2
    REFUSED = 3
    FRAME = 4
    POOL = 5
    SHM_FRAME = 6
    READY = 7
    ABORT = 8
    IPC_FRAME = 9
    ACK = 10
    NACK = 11
    RELEASE = 12
    ERROR = 13


#: Message types by their byte (a dict lookup is cheaper than calling the enum on every message).
_BY_VALUE = {int(msg): msg for msg in Msg}
SENDER_MESSAGES = frozenset({Msg.HELLO, Msg.FRAME, Msg.POOL, Msg.SHM_FRAME, Msg.READY, Msg.ABORT, Msg.IPC_FRAME})
RECEIVER_MESSAGES = frozenset({Msg.WELCOME, Msg.REFUSED, Msg.ACK, Msg.NACK, Msg.RELEASE, Msg.ERROR})


class ProtocolError(FrameError):
    """The control socket carried something that is not this protocol; the connection is closed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_ModelT = TypeVar("_ModelT", bound=_Strict)


class Hello(_Strict):
    """What a connecting sidecar says first."""

    version: int
    rank: Annotated[int, Field(ge=0)]
    pid: int
    token: str | None = None


class Welcome(_Strict):
    """The listening sidecar's answer to an accepted ``HELLO``."""

    version: int
    rank: Annotated[int, Field(ge=0)]
    pid: int
    #: Whether CUDA frames may be sent as CUDA IPC handles (the receiver lands tensors on a GPU).
    cuda_ipc: bool = False
    #: Whether the receiver page-locks the sender's pool to copy from it to a GPU: the sender must
    #: then never trim the pool, or the locked pages would part from the ones it writes.
    pins_pool: bool = False


class Problem(_Strict):
    """Why a frame or connection was refused: the error's type name and its message."""

    error: Annotated[str, Field(max_length=200)]
    message: Annotated[str, Field(max_length=1 << 16)]


class IpcBuffer(_Strict):
    """The CUDA IPC fields of one buffer's storage, as ``torch.UntypedStorage._share_cuda_`` gives them."""

    device: Annotated[int, Field(ge=0)]
    handle: str
    storage_bytes: Annotated[int, Field(ge=0)]
    storage_offset: Annotated[int, Field(ge=0)]
    ref_counter: str
    ref_counter_offset: Annotated[int, Field(ge=0)]
    event: str | None
    event_sync_required: bool
    #: Where the buffer starts inside the storage, and its length.
    view_offset: Annotated[int, Field(ge=0)]
    nbytes: Annotated[int, Field(ge=0)]


class IpcBuffers(_Strict):
    """The CUDA IPC descriptors of a frame's buffers, in order."""

    buffers: list[IpcBuffer]


def envelope(kind: Msg, body_len: int = 0, arg: int = 0) -> bytes:
    """Pack a message envelope."""
    return ENVELOPE.pack(MAGIC, kind, body_len, arg)


def problem_body(error: BaseException | str, message: str = "") -> bytes:
    """A JSON :class:`Problem` body for an exception (or an error name and message)."""
    if isinstance(error, BaseException):
        name, text = type(error).__name__, str(error)
    else:
        name, text = error, message
    return Problem(error=name[:200], message=text[: 1 << 16]).model_dump_json().encode()


def parse_envelope(data: bytes | bytearray | memoryview, offset: int, allowed: frozenset[Msg]) -> tuple[Msg, int, int]:
    """Unpack and check the envelope at ``data[offset:]``.

    Returns:
        The message type, its body length and its ``arg``.

    Raises:
        ProtocolError: Wrong magic, a type this side does not accept, or an oversized body.
    """
    magic, kind, length, arg = ENVELOPE.unpack_from(data, offset)
    if magic != MAGIC:
        raise ProtocolError(
            f"bad message magic {bytes(magic)!r} (expected {MAGIC!r}): the peer is not a localhost sidecar "
            "or speaks another version"
        )
    msg = _BY_VALUE.get(kind)
    if msg is None:
        raise ProtocolError(f"unknown message type {kind}")
    if msg not in allowed:
        raise ProtocolError(f"message type {msg.name} is not valid in this direction")
    if length > MAX_BODY:
        raise ProtocolError(f"{msg.name} message of {length} bytes exceeds the {MAX_BODY}-byte limit")
    return msg, int(length), int(arg)


def parse_json(model: type[_ModelT], body: bytes | bytearray | memoryview, what: str) -> _ModelT:
    """Validate a JSON body against ``model``.

    Raises:
        ProtocolError: The body is not valid JSON for ``model``.
    """
    try:
        return model.model_validate_json(bytes(body))
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or what}: {e['msg']}" for e in exc.errors())
        raise ProtocolError(f"malformed {what}: {problems}") from None


def split_frame(body: memoryview, *, inline: bool) -> tuple[Header, memoryview]:
    """Parse a core frame (``SCF1`` prefix and JSON header) from a message body.

    Args:
        body: The frame's bytes.
        inline: The buffers follow the header in ``body`` (else nothing may follow it).

    Returns:
        The validated header and the bytes after it (the inline buffers, back to back).

    Raises:
        FrameError: Truncated, bad magic, oversized or malformed header, or the bytes after the
            header do not match the sizes the header lists.
    """
    if len(body) < PREFIX.size:
        raise FrameError(f"truncated frame: {len(body)} bytes, shorter than the {PREFIX.size}-byte frame prefix")
    length = header_length(bytes(body[: PREFIX.size]))
    end = PREFIX.size + length
    if end > len(body):
        raise FrameError(f"truncated frame: the header claims {length} bytes but only {len(body) - PREFIX.size} follow")
    header = decode_header(bytes(body[PREFIX.size : end]))
    rest = body[end:]
    expected = header.frame_bytes if inline else 0
    if len(rest) != expected:
        raise FrameError(
            f"{header.describe()}: the header lists {len(header.sizes)} buffers of {header.frame_bytes} bytes in "
            f"all, but {len(rest)} bytes {'follow it' if inline else 'follow a shared-memory frame header'}"
        )
    return header, rest


def slot_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Where each buffer of a frame sits in a shared-memory slot.

    Returns:
        The buffers' offsets from the slot's start and the slot's span in bytes.
    """
    offsets = []
    pos = 0
    for size in sizes:
        offsets.append(pos)
        pos = -(-(pos + size) // ALIGN) * ALIGN
    return offsets, pos


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a Unix socket, as the kernel saw them at ``connect``."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid
