"""The ``mock-file`` transport: no peers; ``"{id}-{chunk_id}"`` maps to a file (Cornserve's mock mode).

Select it with ``SIDECAR_TRANSPORT=mock-file`` or Cornserve's ``CORNSERVE_MOCK_SIDECAR=1``. Sending
writes the object to a file, receiving reads it back, in this process or any other that sees the
same files. Destination ranks are not used: data is stored once, for whoever reads it.

Where a key's file is:

- **Mapping** (``SIDECAR_MOCK_FILE__MAPPING``, or Cornserve's ``CORNSERVE_MOCK_SIDECAR_MAPPING``): a
  JSON object from ``"{id}-{chunk_id}"`` to a path, e.g. ``{"req1-0": "/data/code0.pt"}``. As in
  Cornserve, ``recv`` of a mapped key whose file does not exist returns ``None`` (the end of the
  stream; the receiver then treats every later chunk of that id as past the end, too), and
  ``close_stream`` writes nothing.
- **Directory** (``SIDECAR_MOCK_FILE__DIR``): keys not in the mapping live in this directory, as
  ``<key>.json`` when JSON holds the object exactly (dicts and lists of JSON values, None, bool, int,
  str, finite floats), ``<key>.bin`` for bytes and ``<key>.pt`` otherwise (tensors, lists and
  tuples of tensors, nan and ±inf); ``<key>`` is the key percent-encoded to a file name (shortened
  with a hash when long). Receiving behaves like a real transport: ``recv`` waits for the file to
  appear (looking every few milliseconds, for as long as that ``recv`` waits; a file that
  cannot be read fails it); ``close_stream``, and any send that knows ``num_chunks``, writes
  ``<id>.end.json`` so that ``recv`` past the end returns ``None``. Files outlive the run: a
  directory used again still holds the last run's data files and end markers, which a ``recv`` of
  the same key reads, so give each run a directory of its own (or empty it first).
- A key in neither raises :class:`~sidecar_core.UnknownKeyError`.

File formats, chosen by the suffix of the path: ``.pt``/``.pth`` through ``torch.save`` and
``torch.load(weights_only=True, map_location="cpu")`` (never a full unpickle), for everything but
bytes (``weights_only`` cannot read ``b""`` back); ``.safetensors`` holds one tensor; ``.json``
holds JSON text; ``.bin`` holds bytes as they are. Files that Cornserve's mock mode wrote
(``torch.save(tensor, path)``, ``path.write_text(json.dumps(obj))``) load unchanged. Writes are
atomic: the data goes to a temporary file in the same directory, which then replaces the target,
so a reader never sees part of a file (no fsync: a machine crash may lose the latest writes).
Messages that ``SIDECAR_CHUNK_SIZE`` splits into parts are joined in memory before the file is
written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar
from urllib.parse import quote

import safetensors.torch
import torch
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import serializers.json as json_serializer
import serializers.tensor as tensor_serializer
from sidecar_core import (
    Buffer,
    CapacityError,
    Frame,
    FrameError,
    Header,
    SerializationError,
    SettingsError,
    Transport,
    TransportContext,
    UnknownKeyError,
    load_settings,
)

logger = logging.getLogger(__name__)

Key = tuple[str, int]

MAPPING_VAR = "SIDECAR_MOCK_FILE__MAPPING"
DIR_VAR = "SIDECAR_MOCK_FILE__DIR"
SUFFIXES = (".pt", ".pth", ".safetensors", ".json", ".bin")
#: The formats of directory mode, in the order a reader looks for them.
DIR_SUFFIXES = (".pt", ".json", ".bin")
#: How many delivered keys are remembered, so that a ``recv`` after ``mark_done`` does not read again.
_REMEMBERED = 1 << 16
#: Longest file-name stem made from an id; longer ids are shortened and made unique with a hash.
_MAX_STEM = 160


class MockFileSettings(BaseSettings):
    """Settings of the ``mock-file`` transport (prefix ``SIDECAR_MOCK_FILE__``)."""

    # An empty variable counts as unset: SIDECAR_MOCK_FILE__DIR="" must not mean the working directory.
    model_config = SettingsConfigDict(
        env_prefix="SIDECAR_MOCK_FILE__", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    mapping: dict[str, Path] = Field(
        default_factory=dict,
        validation_alias=AliasChoices(MAPPING_VAR, "CORNSERVE_MOCK_SIDECAR_MAPPING"),
        description='JSON object from `"{id}-{chunk_id}"` to a `.pt`, `.pth`, `.safetensors`, `.json` or `.bin` path, '
        'e.g. `{"req1-0": "/data/code0.pt"}`.',
    )
    dir: Path | None = Field(None, description="Directory for the keys the mapping does not name.")
    poll_interval: float = Field(
        0.05, gt=0, description="Longest pause, in seconds, between looks for a file in the directory."
    )

    @field_validator("mapping")
    @classmethod
    def _known_suffixes(cls, mapping: dict[str, Path]) -> dict[str, Path]:
        """Refuse a path whose suffix names no format, when the settings load rather than when its key is used."""
        for name, path in mapping.items():
            if path.suffix.lower() not in SUFFIXES:
                raise ValueError(
                    f"it maps {name!r} to {str(path)!r}, whose suffix {path.suffix!r} is not one of "
                    f"{', '.join(SUFFIXES)}; rename the file (.pt holds everything but bytes, .bin holds bytes)"
                )
        return mapping


@dataclass(slots=True)
class _Assembly:
    """A message whose parts are being joined before it is written."""

    header: Header
    data: bytearray
    parts: set[int] = field(default_factory=set)


class MockFileTransport(Transport):
    """Stores messages in files instead of moving them (see the module docstring)."""

    name: ClassVar[str] = "mock-file"
    peerless: ClassVar[bool] = True

    @classmethod
    def test_environment(cls, workdir: Path) -> dict[str, str]:
        """A private directory for the test's files.

        Args:
            workdir: An empty directory that lives as long as the test.
        """
        return {DIR_VAR: str(workdir / "mock-files")}

    def __init__(self, ctx: TransportContext) -> None:
        """Read the transport's settings.

        Raises:
            SettingsError: ``SIDECAR_MOCK_FILE__MAPPING`` (or ``CORNSERVE_MOCK_SIDECAR_MAPPING``) is not
                a JSON object of paths with known suffixes, or another ``SIDECAR_MOCK_FILE__`` setting is
                invalid.
        """
        super().__init__(ctx)
        self.settings = load_settings(MockFileSettings)
        self._assembling: dict[Key, _Assembly] = {}
        self._delivered: OrderedDict[Key, None] = OrderedDict()
        self._loading: dict[Key, asyncio.Task[bool]] = {}
        #: The tasks looking for a file in ``want`` right now (closing cancels them).
        self._looking: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Create the directory of directory mode.

        Raises:
            SettingsError: The directory cannot be created.
        """
        directory = self.settings.dir
        if directory is not None:
            try:
                await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
            except OSError as exc:
                raise SettingsError(f"{DIR_VAR}={str(directory)!r} cannot be created: {exc}") from None

    # -- sending ------------------------------------------------------------------------------

    async def send(self, dst: int, frame: Frame) -> None:
        """Write the message to its key's file (``dst`` is not used).

        Raises:
            UnknownKeyError: The key is neither mapped nor covered by a directory.
            SerializationError: The file format cannot hold the object.
            OSError: The file cannot be written.
        """
        header = frame.header
        if header.kind == "close":
            if self.settings.dir is not None:
                assert header.num_chunks is not None  # enforced by Header validation
                await self._record_end(self.settings.dir, header.id, header.num_chunks)
            return
        buffers: Sequence[Buffer] = frame.buffers
        if header.num_parts > 1:
            joined = self._join(frame)
            if joined is None:
                return
            header, buffers = joined
        obj = self.ctx.codec.decode(header, buffers, "cpu")
        name = _name(header.id, header.chunk_id)
        path = self.settings.mapping.get(name)
        if path is not None:
            await asyncio.to_thread(_write, name, path, obj)
            return
        if self.settings.dir is None:
            raise self._unknown(name)
        stem = self.settings.dir / f"{_stem(header.id)}-{header.chunk_id}"
        suffix = ".bin" if type(obj) is bytes else ".json" if _json_exact(obj) else ".pt"
        for stale in DIR_SUFFIXES:
            if stale != suffix:
                await asyncio.to_thread(_remove, stem.with_name(stem.name + stale))
        await asyncio.to_thread(_write, name, stem.with_name(stem.name + suffix), obj)
        if header.num_chunks is not None:
            await self._record_end(self.settings.dir, header.id, header.num_chunks)

    @staticmethod
    async def _record_end(directory: Path, id: str, num_chunks: int) -> None:
        """Write the end-of-stream marker that makes ``recv`` past ``num_chunks`` return ``None``."""
        data = json.dumps({"num_chunks": num_chunks}).encode()
        await asyncio.to_thread(_atomic_write, directory / f"{_stem(id)}.end.json", lambda f: f.write(data))

    def _join(self, frame: Frame) -> tuple[Header, list[Buffer]] | None:
        """Add a part to its message; return the whole message once every part is in."""
        h = frame.header
        key = (h.id, h.chunk_id)
        assembly = self._assembling.get(key)
        shape = (h.num_parts, h.layout)
        if assembly is None or h.part in assembly.parts or shape != (assembly.header.num_parts, assembly.header.layout):
            # A new message (or a resend after a cancelled one) starts over.
            assembly = self._assembling[key] = _Assembly(h, bytearray(h.total_bytes))
        view = memoryview(assembly.data)
        pos = h.offset
        for buf, size in zip(frame.buffers, h.sizes, strict=True):
            view[pos : pos + size] = buf if isinstance(buf, memoryview) else buf.detach().cpu().numpy().data
            pos += size
        assembly.parts.add(h.part)
        if len(assembly.parts) < h.num_parts:
            return None
        del self._assembling[key]
        buffers: list[Buffer] = []
        pos = 0
        for size in h.layout:
            buffers.append(view[pos : pos + size])
            pos += size
        return assembly.header, buffers

    # -- receiving ----------------------------------------------------------------------------

    async def want(self, id: str, chunk_id: int, timeout: float) -> None:
        """Deliver ``(id, chunk_id)``'s file to this rank's store (see :meth:`Transport.want`).

        In directory mode, a file that is not there yet is looked for for up to ``timeout`` seconds.

        Raises:
            UnknownKeyError: The key is neither mapped nor covered by a directory.
            FrameError: The file cannot be read, or holds something no serializer can deliver.
        """
        key = (id, chunk_id)
        if key in self._delivered:
            return
        name = _name(id, chunk_id)
        path = self.settings.mapping.get(name)
        if path is not None:
            await self._once(key, lambda: self._fetch_mapped(key, path))
            return
        if self.settings.dir is None:
            raise self._unknown(name)
        task = asyncio.current_task()
        assert task is not None  # called in the sidecar's task
        self._looking.add(task)
        try:
            await self._look(key, asyncio.get_running_loop().time() + timeout)
        finally:
            self._looking.discard(task)

    async def _look(self, key: Key, deadline: float) -> None:
        """Look for a key's file until it is delivered or ``deadline`` (the loop's clock) passes.

        Raises:
            FrameError: The file cannot be read, or holds something no serializer can deliver.
        """
        loop = asyncio.get_running_loop()
        delay = 0.001
        while not await self._once(key, lambda: self._fetch_from_dir(key)):
            if loop.time() >= deadline:
                return
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, self.settings.poll_interval)

    async def _once(self, key: Key, fetch: Callable[[], Coroutine[Any, Any, bool]]) -> bool:
        """Run one fetch of ``key`` at a time; concurrent callers share its outcome."""
        task = self._loading.get(key)
        if task is None:
            task = self._loading[key] = asyncio.create_task(fetch())
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _fetch_mapped(self, key: Key, path: Path) -> bool:
        obj = await asyncio.to_thread(_load, _name(*key), path)
        if obj is _MISSING:
            # Cornserve's convention: a mapped file that is not there ends the stream.
            self._deliver_close(key[0], key[1])
            return True
        self._deliver(key, obj, path)
        return True

    async def _fetch_from_dir(self, key: Key) -> bool:
        if key in self._delivered:
            return True
        assert self.settings.dir is not None
        id, chunk_id = key
        stem = f"{_stem(id)}-{chunk_id}"
        for suffix in DIR_SUFFIXES:
            path = self.settings.dir / (stem + suffix)
            obj = await asyncio.to_thread(_load, _name(id, chunk_id), path)
            if obj is not _MISSING:
                self._deliver(key, obj, path)
                return True
        marker = self.settings.dir / f"{_stem(id)}.end.json"
        end = await asyncio.to_thread(_read_end, marker)
        if end is not None and chunk_id >= end:
            self._deliver_close(id, end)
            return True
        return False

    def _deliver(self, key: Key, obj: object, path: Path) -> None:
        id, chunk_id = key
        limit = self.ctx.settings.max_buffered_bytes
        nbytes = _tensor_bytes(obj)
        if nbytes > limit:
            # Checked before encoding, which makes every tensor contiguous: a small file may hold a
            # view (expanded, strided) of far more bytes than it stores.
            raise CapacityError(
                f"mock-file: {_name(id, chunk_id)!r} in {path} holds {nbytes} bytes of tensors, more than "
                f"SIDECAR_MAX_BUFFERED_BYTES={limit}; raise it, or store less per chunk"
            )
        try:
            frames = self.ctx.codec.frames(
                obj, id=id, chunk_id=chunk_id, num_chunks=None, src=self.ctx.rank, max_part_bytes=None
            )
        except SerializationError as exc:
            raise FrameError(
                f"mock-file: {_name(id, chunk_id)!r} in {path} holds what no serializer takes: {exc}"
            ) from None
        for frame in frames:
            self.ctx.inbox.deliver(frame)
        self._delivered[key] = None
        if len(self._delivered) > _REMEMBERED:
            self._delivered.popitem(last=False)

    def _deliver_close(self, id: str, num_chunks: int) -> None:
        self.ctx.inbox.deliver(Frame(Header(kind="close", id=id, num_chunks=num_chunks, src=self.ctx.rank)))

    def _unknown(self, name: str) -> UnknownKeyError:
        return UnknownKeyError(
            f"mock-file: key {name!r} is not in the mapping ({MAPPING_VAR} or CORNSERVE_MOCK_SIDECAR_MAPPING, "
            f"{len(self.settings.mapping)} keys) and {DIR_VAR} is not set; map {name!r} to a file, or set "
            f"{DIR_VAR} to a directory for unmapped keys"
        )

    async def close(self) -> None:
        """Stop looking for files and drop parts of unfinished messages."""
        tasks = [*self._looking, *self._loading.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._assembling.clear()

    def describe_peer(self, rank: int) -> str:
        """Where data goes: files, whichever rank reads them."""
        where = [f"{len(self.settings.mapping)} mapped files"]
        if self.settings.dir is not None:
            where.append(f"directory {self.settings.dir}")
        return f"mock-file storage ({', '.join(where)})"


class _Missing:
    """The marker :func:`_load` returns for a file that does not exist."""


_MISSING = _Missing()


def _name(id: str, chunk_id: int) -> str:
    """The key of a chunk, as Cornserve spells it."""
    return f"{id}-{chunk_id}"


def _stem(id: str) -> str:
    """A file-name stem for ``id``: percent-encoded, shortened with a hash when it is long."""
    stem = quote(id.encode("utf-8", "surrogatepass"), safe="")
    if len(stem) > _MAX_STEM:
        digest = hashlib.sha256(id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        stem = f"{stem[:100]}~{digest}"
    return stem


def _json_exact(obj: object) -> bool:
    """Whether JSON text holds ``obj`` exactly."""
    if type(obj) is float:
        return math.isfinite(obj)
    if type(obj) is int:
        return obj.bit_length() <= json_serializer.MAX_INT_BITS
    return type(obj) in (str, bool, type(None)) or json_serializer.accepts(obj)


def _write(name: str, path: Path, obj: object) -> None:
    """Write ``obj`` to ``path`` in the format its suffix names, atomically.

    Raises:
        SerializationError: The format cannot hold ``obj``.
        OSError: The file cannot be written.
    """
    suffix = path.suffix.lower()
    write: Callable[[IO[bytes]], object]
    if suffix in (".pt", ".pth"):
        if type(obj) is bytes:
            # torch.load(weights_only=True) cannot read b"" back; bytes have their own format.
            raise _cannot_hold(name, path, obj, "tensors and JSON values")
        bits = _longest_int_bits(obj)
        if bits >= _PT_INT_BITS:
            raise SerializationError(
                f"mock-file: cannot write {name!r} to {path}: an int of {bits} bits cannot be read back from a "
                f"{suffix} file (torch.load reads ints of under {_PT_INT_BITS} bits); send it as a str"
            )

        def write(f: IO[bytes]) -> None:
            torch.save(obj, f)

    elif suffix == ".bin":
        if type(obj) is not bytes:
            raise _cannot_hold(name, path, obj, "raw bytes")
        data = obj

        def write(f: IO[bytes]) -> None:
            f.write(data)

    elif suffix == ".safetensors":
        if not isinstance(obj, torch.Tensor):
            raise _cannot_hold(name, path, obj, "one tensor")
        encoded = tensor_serializer.encode(obj)
        head = tensor_serializer.safetensors_bytes(encoded.meta)

        def write(f: IO[bytes]) -> None:
            f.write(head)
            for buf in encoded.buffers:
                f.write(buf if isinstance(buf, memoryview) else buf.cpu().numpy().data)

    else:
        if not _json_exact(obj):
            raise _cannot_hold(name, path, obj, "JSON values (dicts, lists, str, int, finite float, bool, None)")
        data = json.dumps(obj, allow_nan=False).encode()

        def write(f: IO[bytes]) -> None:
            f.write(data)

    _atomic_write(path, write)


#: Ints of this many bits or more are pickled with an opcode ``torch.load(weights_only=True)`` refuses.
_PT_INT_BITS = 2040


def _longest_int_bits(obj: object) -> int:
    """The bit length of the longest int in ``obj``, in dicts, lists and tuples at any depth (0 if none)."""
    longest, stack = 0, [obj]
    while stack:
        item = stack.pop()
        if type(item) is int:
            longest = max(longest, item.bit_length())
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return longest


def _cannot_hold(name: str, path: Path, obj: object, holds: str) -> SerializationError:
    instead = ".bin" if type(obj) is bytes else ".pt"  # .pt holds everything but bytes
    return SerializationError(
        f"mock-file: cannot write {name!r} to {path}: a {path.suffix} file holds {holds}, not a "
        f"{type(obj).__qualname__}; map {name!r} to a {instead} file instead"
    )


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write a file so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it: mkstemp's 0600 keeps other readers out
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for every thread)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _remove(path: Path) -> None:
    """Remove a key's file of the other format, so that a reader never finds an outdated one."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _load(name: str, path: Path) -> object:
    """Read the object in ``path`` by its suffix; :data:`_MISSING` if the file does not exist.

    Raises:
        FrameError: The file cannot be read or parsed.
    """
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            return torch.load(path, weights_only=True, map_location="cpu")
        if suffix == ".safetensors":
            tensors = safetensors.torch.load_file(path, device="cpu")
            if len(tensors) != 1:
                raise FrameError(
                    f"mock-file: {name!r} maps to {path}, which holds {len(tensors)} tensors; a .safetensors "
                    "file must hold exactly one"
                )
            return next(iter(tensors.values()))
        if suffix == ".bin":
            return path.read_bytes()
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _MISSING
    except FrameError:
        raise
    except Exception as exc:
        raise FrameError(
            f"mock-file: cannot read {name!r} from {path} ({type(exc).__name__}: {exc}); rewrite the file "
            "with torch.save (.pt/.pth), safetensors (.safetensors) or json (.json), or as raw bytes (.bin)"
        ) from exc


def _tensor_bytes(obj: object) -> int:
    """The bytes of every tensor in ``obj`` and the lists, tuples and dicts it holds, once contiguous.

    Each container is walked once: a loaded file may hold one that contains itself.
    """
    total, pending, seen = 0, [obj], set()
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, list | tuple | dict) and id(item) not in seen:
            seen.add(id(item))
            pending.extend(item.values() if isinstance(item, dict) else item)
    return total


def _read_end(marker: Path) -> int | None:
    """The ``num_chunks`` a ``close_stream`` recorded, or ``None``.

    Raises:
        FrameError: The marker file is malformed or cannot be read.
    """
    try:
        end = json.loads(marker.read_bytes())["num_chunks"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise FrameError(f"mock-file: end-of-stream marker {marker} is malformed ({exc}); delete it") from None
    except OSError as exc:  # a directory, or not readable
        raise FrameError(f"mock-file: end-of-stream marker {marker} cannot be read ({exc}); remove it") from None
    if type(end) is not int or end < 0:
        raise FrameError(f"mock-file: end-of-stream marker {marker} has num_chunks={end!r}; delete it")
    return end
