"""What the ucx transport puts on the wire besides payload bytes, and the checks on what it reads.

Connection set-up uses UCX's stream API (ordered bytes on one endpoint); everything after it uses
tagged messages, whose tags the two sides agree on in the handshake (random, and told only to a
peer that proved it holds the auth token):

1. Connection set-up proves, both ways, that each side holds the auth token, without sending it
   (challenge and response, HMAC-SHA256 keyed with the token over a :class:`Transcript`): the
   connecting sidecar sends :class:`Hello` (its rank, a fresh nonce, its incarnation); the listening sidecar answers
   :class:`Challenge` (its rank and its own nonce), or a refusing :class:`Reply` if it speaks
   another version; the connecting sidecar, having checked that the rank is the one it dialled,
   sends :class:`Response` (its proof); the listening sidecar checks it and answers :class:`Reply`:
   accepted, with the tag base for this connection's frames and its own proof, or refused with the
   reason (it then closes). The connecting sidecar checks that proof before it sends a frame: a
   listener that cannot give it is anyone who took the address. The tag acknowledgements go to is
   worked out by both sides (:meth:`Transcript.ack_tag`), never sent. The connecting side proves
   first, so a peer without the token learns nothing from a listener, not even a proof to guess
   the token against offline. Both nonces are fresh, so a proof holds for one connection only, and
   the two sides prove under different labels, so neither proof can be replayed as the other's.
   (Whoever reads the traffic sees the tag base, and can aim frames at it from a connection of its
   own; a man in the middle relaying between two real sidecars is not stopped either: nothing here
   is encrypted.)
2. Each frame is one *header message* on ``base | HEADER`` (the sender's sequence number and the
   size of an inline payload, then the core's ``SCF1`` prefix and JSON header) followed by one
   message per non-empty payload buffer on ``base | PAYLOAD``. Messages on one tag match in the
   order they were sent, so the receiver posts the payload receives of each header, in header
   order, into memory it allocated after validating that header. A host payload of at most
   :data:`INLINE_MAX` bytes rides inline at the end of the header message instead (UCX copies
   messages that small anyway; one message instead of several).
3. The receiver answers every frame with an *ack message* on the sender's ack tag: the sequence
   number, a status byte and, on refusal, a JSON :class:`Problem`. A frame whose header cannot be
   read is refused with :data:`REFUSED_CLOSING`: the receiver cannot find the next header, so it
   closes the connection and the sender drops it at once.

Stream messages are ``b"SCU1" | body length (u32, little endian) | JSON body``. Everything read here
is validated before anything is allocated for it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from sidecar_core import FrameError, Header, decode_header, encode_header, header_length
from sidecar_core._frame import MAX_HEADER_BYTES, PREFIX

MAGIC = b"SCU1"
#: Spoken in the handshake; peers of another version refuse each other with a clear error. 2: frame
#: headers carry ``message`` (parts of one send). 3: both sides prove they hold the auth token
#: instead of the connecting side sending it. 4: the hello names the connecting process (its
#: ``incarnation``), so that a peer that connected again is told from one that was restarted.
VERSION = 4
STREAM_PREFIX = struct.Struct("<4sI")
SEQ = struct.Struct("<Q")
HEAD = struct.Struct("<QI")
ACK = struct.Struct("<QBI")

#: Largest host payload sent inline in its header message.
INLINE_MAX = 8 << 10

#: Largest handshake body accepted.
MAX_STREAM_BODY = 64 << 10
#: Largest problem text carried by an ack.
MAX_PROBLEM = 16 << 10
#: Bytes before a header message's JSON: sequence number and inline size, then the frame prefix.
HEADER_PREFIXES = HEAD.size + PREFIX.size
#: Size of the buffer a header message is received into.
HEADER_MESSAGE_BYTES = HEADER_PREFIXES + MAX_HEADER_BYTES + INLINE_MAX
#: Size of the buffer an ack message is received into.
ACK_MESSAGE_BYTES = ACK.size + MAX_PROBLEM + 1024

#: Low bits of a tag: which message kind it carries on a connection.
HEADER = 0
PAYLOAD = 1
ACKNOWLEDGE = 2
TAG_KINDS = 4

ACCEPTED = 0
REFUSED = 1
#: Refused, and the receiver closes the connection (it cannot read past this frame).
REFUSED_CLOSING = 2


class ProtocolError(FrameError):
    """The peer sent something that is not this protocol; the connection is closed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Tag = Annotated[int, Field(ge=0, lt=1 << 64)]
#: 32 random bytes (a nonce) or an HMAC-SHA256 digest (a proof), in lowercase hex.
Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Hello(_Strict):
    """What a connecting sidecar says first."""

    version: int
    rank: Annotated[int, Field(ge=0)]
    nonce: Hex32
    #: Drawn once per transport: the same in every connection the process makes, new after a restart.
    incarnation: Hex32


class Challenge(_Strict):
    """The listening sidecar's answer to a :class:`Hello` of its version."""

    version: int
    rank: Annotated[int, Field(ge=0)]
    nonce: Hex32


class Response(_Strict):
    """The connecting sidecar's answer to a :class:`Challenge`."""

    #: :meth:`Transcript.proof` as the connector (``None``: it has no auth token).
    proof: Hex32 | None = None


class _Versioned(BaseModel):
    """The fields every version's first handshake messages share, read from any of them."""

    model_config = ConfigDict(extra="ignore", strict=True)

    version: int
    rank: int | None = None
    #: What a refusal of any version says.
    message: Annotated[str, Field(max_length=MAX_PROBLEM)] = ""


Role = Literal["listener", "connector"]


def new_nonce() -> str:
    """A fresh nonce for one handshake."""
    return secrets.token_hex(32)


@dataclass(frozen=True)
class Transcript:
    """What both sides of one handshake know: both ranks and both nonces.

    Everything secret about a connection is an HMAC-SHA256 of it keyed with the auth token: each
    side's proof, under its own label, and the tag acknowledgements go to, which is therefore never
    sent (a listener impostor that read it could otherwise aim acknowledgements at the link the
    connecting sidecar then opens to the real peer).
    """

    connector_rank: int
    listener_rank: int
    connector_nonce: str
    listener_nonce: str

    def _mac(self, token: str | None, label: str, *extra: str) -> bytes:
        fields = (
            MAGIC.decode(),
            str(VERSION),
            label,
            str(self.connector_rank),
            str(self.listener_rank),
            self.connector_nonce,
            self.listener_nonce,
            *extra,
        )
        key = b"" if token is None else token.encode()
        return hmac.new(key, "|".join(fields).encode(), hashlib.sha256).digest()

    def proof(self, token: str, role: Role, tag_base: int = 0) -> str:
        """What a side holding ``token`` answers (the listener's covers the tag base it gives)."""
        return self._mac(token, role, str(tag_base)).hex()

    def ack_tag(self, token: str | None) -> int:
        """The tag on the connecting sidecar's worker that this connection's acknowledgements go to.

        Without a token anyone can work it out, as anyone may then connect at all.
        """
        base = int.from_bytes(self._mac(token, "ack-tag")[:8], "little") >> 2  # 62 bits, as tag bases
        return base * TAG_KINDS | ACKNOWLEDGE


def proof_matches(given: str | None, expected: str) -> bool:
    """Constant-time check of a peer's proof."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Reply(_Strict):
    """The listening sidecar's last handshake message: accepted or refused (its first, refusing another version)."""

    version: int
    rank: Annotated[int, Field(ge=0)]
    accepted: bool
    #: Tag base (on the listening sidecar's worker) for this connection's frames.
    tag_base: Tag = 0
    #: Why the connection was refused (an error type name and a message).
    error: Annotated[str, Field(max_length=200)] = ""
    message: Annotated[str, Field(max_length=MAX_PROBLEM)] = ""
    #: With an acceptance: :meth:`Transcript.proof` as the listener (``None``: it has no auth token).
    proof: Hex32 | None = None


class Problem(_Strict):
    """Why a frame was refused: the error's type name and its message."""

    error: Annotated[str, Field(max_length=200)]
    message: Annotated[str, Field(max_length=MAX_PROBLEM)]


_ModelT = TypeVar("_ModelT", bound=BaseModel)


def stream_message(model: _Strict) -> bytes:
    """Encode a handshake message (prefix and JSON body).

    Fields left ``None`` are left out: a refusal then reads the same as one of version 2, so a
    sidecar of that version names both versions.
    """
    body = model.model_dump_json(exclude_none=True).encode()
    return STREAM_PREFIX.pack(MAGIC, len(body)) + body


def stream_body_length(prefix: bytes | bytearray) -> int:
    """Validate a handshake message prefix and return its body length.

    Raises:
        ProtocolError: Wrong magic (not a sidecar, or another version) or an oversized body.
    """
    magic, length = STREAM_PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(
            f"bad handshake magic {bytes(magic)!r}: the peer is not a sidecar ucx transport of this version"
        )
    if length > MAX_STREAM_BODY:
        raise ProtocolError(f"handshake message of {length} bytes exceeds the {MAX_STREAM_BODY}-byte limit")
    return int(length)


def version_of(body: bytes | bytearray, what: str) -> tuple[int, int | None, str]:
    """The protocol version, rank and refusal message a handshake message of any version states.

    Raises:
        ProtocolError: The body is not a JSON object with an integer ``version``.
    """
    stated = parse_model(_Versioned, body, what)
    return stated.version, stated.rank, stated.message


def parse_model(cls: type[_ModelT], body: bytes | bytearray, what: str) -> _ModelT:
    """Validate a JSON body as ``cls``.

    Raises:
        ProtocolError: The body is not valid JSON for ``cls`` (the message says what is wrong).
    """
    try:
        return cls.model_validate_json(body)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or what}: {e['msg']}" for e in exc.errors())
        raise ProtocolError(f"malformed {what}: {problems}") from None


def header_message(seq: int, header: Header, inline: Sequence[memoryview] = ()) -> bytes:
    """Encode a frame's header message, with its payload buffers inline when given."""
    size = sum(buf.nbytes for buf in inline)
    return b"".join((HEAD.pack(seq, size), encode_header(header), *inline))


def message_seq(buf: memoryview) -> int:
    """The sequence number at the start of a header or ack message."""
    return int(SEQ.unpack_from(buf)[0])


def claimed_length(buf: memoryview) -> int:
    """How many bytes of ``buf`` a received header message's prefix says it used (at most ``len(buf)``)."""
    inline = HEAD.unpack_from(buf)[1]
    length = PREFIX.unpack_from(buf, HEAD.size)[1]
    return int(min(len(buf), HEADER_PREFIXES + length + inline))


def parse_header_message(buf: memoryview) -> tuple[Header, memoryview | None]:
    """Validate the header carried by a received header message; return it and its inline payload.

    Args:
        buf: The receive buffer (:data:`HEADER_MESSAGE_BYTES` long; the message's own prefix says
            how much of it is used). What the last message used is zeroed before each receive, so
            a message shorter than its prefix says reads zeros, never an earlier message's bytes:
            too short to hold a prefix, it fails the magic check.

    Returns:
        The header, and a view of the inline payload in ``buf`` (``None`` if the payload follows
        as separate messages).

    Raises:
        FrameError: The prefix, the JSON header or the inline payload size is malformed.
    """
    inline = HEAD.unpack_from(buf)[1]
    start = HEADER_PREFIXES
    length = header_length(bytes(buf[HEAD.size : start]))
    header = decode_header(bytes(buf[start : start + length]))
    if not inline:
        return header, None
    if inline != header.frame_bytes or inline > INLINE_MAX:
        raise FrameError(f"{header.describe()}: inline payload of {inline} bytes, header says {header.frame_bytes}")
    return header, buf[start + length : start + length + inline]


def ack_message(seq: int, problem: Problem | None = None, *, closing: bool = False) -> bytes:
    """Encode an acknowledgement: accepted, or refused with ``problem`` (``closing``: and the connection closes)."""
    if problem is None:
        return ACK.pack(seq, ACCEPTED, 0)
    body = problem.model_dump_json().encode()
    while len(body) > ACK_MESSAGE_BYTES - ACK.size:  # escapes and multi-byte characters outgrew the receive buffer
        problem = problem.model_copy(update={"message": problem.message[: len(problem.message) // 2]})
        body = problem.model_dump_json().encode()
    return ACK.pack(seq, REFUSED_CLOSING if closing else REFUSED, len(body)) + body


def parse_ack(buf: memoryview) -> tuple[int, Problem | None, bool]:
    """Decode an acknowledgement: sequence number, refusal (``None``: accepted), whether the receiver closes.

    Raises:
        ProtocolError: Unknown status or malformed problem.
    """
    seq, status, length = ACK.unpack_from(buf)
    if status == ACCEPTED:
        return seq, None, False
    if status not in (REFUSED, REFUSED_CLOSING) or length > MAX_PROBLEM + 1024:
        raise ProtocolError(f"malformed acknowledgement (status {status}, {length} bytes)")
    problem = parse_model(Problem, bytes(buf[ACK.size : ACK.size + length]), "acknowledgement")
    return seq, problem, status == REFUSED_CLOSING


def problem_of(exc: BaseException) -> Problem:
    """Describe an inbox error for the sender (the text is cut to fit an ack)."""
    return Problem(error=type(exc).__name__[:200], message=str(exc)[:MAX_PROBLEM])
