"""The ``json`` serializer: dicts and lists of JSON values.

The JSON text (UTF-8, compact) travels in one buffer, never in the frame header; metadata is ``{}``.

The receiver must get back exactly what was sent, so :func:`accepts` takes only what JSON holds
exactly and refuses everything else (which then goes to another serializer, or ``send`` raises
:class:`~sidecar_core.SerializationError`):

- containers: exact ``dict`` (``str`` keys only) and ``list``; not tuples (they would come back as
  lists), not ``OrderedDict``/``defaultdict`` or other subclasses;
- values: exact ``str``, ``int``, ``float``, ``bool`` and ``None``; not ``nan`` or ``±inf`` (JSON has
  no such numbers; send them with the ``primitives`` serializer or in a tensor), not ``IntEnum`` and
  other subclasses;
- ints of at most :data:`MAX_INT_BITS` bits (Python refuses to parse longer decimal numbers);
- nesting at most :data:`MAX_DEPTH` deep (this also refuses containers that hold themselves).

Strings that are not valid UTF-8 (a lone surrogate) are accepted but make :func:`encode` raise.

msgspec writes and reads the text (about ten times faster than the standard library for a small
dict); a buffer it refuses is read again by the standard library's parser only to name the problem.
Numbers out of the double range (``1e400``) are refused rather than read as infinity.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from serializers._buffers import expect_buffers, expect_keys, host_view
from sidecar_core import Buffer, Encoded, FrameError, SerializationError

NAME = "json"
PRIORITY = 40
#: Deepest nesting of dicts and lists that is accepted.
MAX_DEPTH = 256
#: Largest int accepted, in bits: below Python's default limit of 4300 decimal digits.
MAX_INT_BITS = 14_000

_SCALARS = (str, bool, type(None))
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


def accepts(obj: object) -> bool:
    """Whether ``obj`` is a dict or list that JSON represents exactly (see the module docstring)."""
    if type(obj) is not dict and type(obj) is not list:
        return False
    # Depth first, so that a container holding itself (or a chain of shared ones) reaches the depth
    # limit at once. Pending containers and their depths wait on two plain stacks (a received
    # buffer of 16 MiB may hold millions of them: a (container, depth) pair each took three times
    # the memory and time); empty ones are not pushed. Scalars are checked where they are met, ints
    # first (every send of a dict or list runs this, so it is kept lean: plain loops).
    pending: list[dict[Any, Any] | list[Any]] = [obj]
    depths = [1]
    while pending:
        container = pending.pop()
        depth = depths.pop()
        if depth > MAX_DEPTH:
            return False
        if type(container) is dict:
            for key in container:
                if type(key) is not str:
                    return False
            values: Iterable[object] = container.values()
        else:
            values = container
        for value in values:
            if type(value) is int:
                if value.bit_length() > MAX_INT_BITS:
                    return False
            elif type(value) is dict or type(value) is list:
                if value:
                    pending.append(value)
                    depths.append(depth + 1)
                elif depth == MAX_DEPTH:  # an empty one still counts as a level
                    return False
            elif type(value) is float:
                if not math.isfinite(value):
                    return False
            elif type(value) not in _SCALARS:
                return False
    return True


def encode(obj: dict[str, Any] | list[Any]) -> Encoded:
    """Write ``obj``, which :func:`accepts` took, as compact UTF-8 JSON text into one buffer.

    The core checks :func:`accepts` first (also for ``send(..., serializer="json")``); it is not
    repeated here, since a small dict's send would pay for it twice.

    Raises:
        SerializationError: A str in ``obj`` is not valid UTF-8.
    """
    try:
        data = _ENCODER.encode(obj)
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"a str in the object is not valid UTF-8 ({exc.reason}); send such text as bytes"
        ) from None
    return Encoded(meta={}, buffers=[memoryview(data)])


def decode(meta: Mapping[str, Any], buffers: Sequence[Buffer], device: str) -> dict[str, Any] | list[Any]:
    """Parse the JSON text (``device`` does not apply).

    Raises:
        FrameError: The metadata is not ``{}``, the buffer is not UTF-8 JSON text of a dict or list, or
            the value is one :func:`encode` would not send (too deep, an int too long).
    """
    expect_keys("meta", meta, set())
    expect_buffers(buffers, 1, NAME)
    data = host_view(buffers[0])
    try:
        value = _DECODER.decode(data)
    except RecursionError:
        raise FrameError("json buffer nests too deeply to parse") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _explain(data, exc) from None
    if type(value) is not dict and type(value) is not list:
        raise FrameError(f"json buffer holds a {type(value).__name__}; expected an object or an array")
    # What encode refuses is refused here too, so that whatever arrives can be sent on. Text of at
    # most MAX_DEPTH bytes can neither nest deeper nor hold an int of MAX_INT_BITS bits.
    if len(data) > MAX_DEPTH and not accepts(value):
        raise FrameError(
            f"json buffer nests deeper than {MAX_DEPTH} or holds an int of more than {MAX_INT_BITS} bits, "
            "which this serializer does not send"
        )
    return value


def _explain(data: memoryview, refusal: Exception) -> FrameError:
    """The error for a buffer msgspec refused, naming the problem as precisely as the standard library can."""
    try:
        text = str(data, "utf-8")
    except UnicodeDecodeError as exc:
        return FrameError(f"json buffer is not valid UTF-8: {exc.reason} at byte {exc.start}")
    try:
        json.loads(text, parse_constant=_refuse_constant)
    except FrameError as exc:
        return exc
    except ValueError as exc:  # JSONDecodeError, or an int longer than Python parses
        return FrameError(f"json buffer is not valid JSON: {exc}")
    except RecursionError:
        return FrameError("json buffer nests too deeply to parse")
    return FrameError(f"json buffer is not valid JSON: {refusal}")  # e.g. 1e400, which is no double


def _refuse_constant(name: str) -> Any:
    raise FrameError(f"json buffer holds {name}, which JSON does not allow")
