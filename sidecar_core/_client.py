"""The public client: :class:`Sidecar` and :class:`SidecarConfig`.

Each ``Sidecar`` owns one event loop on a background thread. The transport and its network I/O live
on that loop; the public methods hand work to it, so they can be called from any thread and from any
asyncio loop. Small sends and all receive bookkeeping skip the hop to the loop where they can, as a
round trip through it costs tens of microseconds:

- ``send`` of a one-frame message to one rank first offers it to the transport's
  :meth:`~sidecar_core.Transport.send_nowait`, on the caller's thread; :class:`_SendDeadlines`
  enforces the send timeout of such sends.
- ``recv`` registers with, gives up on, and ``mark_done`` releases through the thread-safe
  :class:`~sidecar_core._store.ReceiveStore` directly.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import numbers
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sidecar_core._codec import Codec
from sidecar_core._errors import PluginError, SendTimeoutError, SidecarClosedError, SidecarError
from sidecar_core._frame import MAX_ID_CHARS, Frame, Header
from sidecar_core._plugins import Registry, get_registry
from sidecar_core._settings import SidecarSettings, check_recv_device, load_settings
from sidecar_core._store import ReceiveStore, Waiter, settle_waiter
from sidecar_core._transport import Transport, TransportContext

logger = logging.getLogger("sidecar")

#: Seconds ``shutdown_sync`` waits for the transport's ``close`` before it stops the loop anyway.
_CLOSE_LIMIT = 30.0

#: Every Sidecar made in this process, so that a forked child can mark them all as its parent's.
_made: weakref.WeakSet[Sidecar] = weakref.WeakSet()
#: How many forks lie between this process and the one that imported the package.
_generation = 0


def _after_fork_in_child() -> None:
    """A forked child has the parent's sidecars without their threads, sharing their connections."""
    global _generation
    _generation += 1  # every sidecar and send future made before now is the parent's
    for sidecar in list(_made):
        if sidecar._closed:  # its transport let go of everything; numbers it held may be another's now
            continue
        try:
            sidecar._transport.after_fork()
        except Exception:  # a plugin's bug must not break the child; the parent's connections stay as they are
            logger.exception("%s transport: closing what a forked child inherited failed", sidecar.transport_name)


os.register_at_fork(after_in_child=_after_fork_in_child)

#: How long past its timeout a receive waits for a pull-based transport's lookup to start, in seconds.
_PULL_GRACE_SECONDS = 1.0
#: How long shutting down the sidecars left open at exit may take, in seconds (all of them together).
_EXIT_CLOSE_SECONDS = 5.0


@functools.cache
def _at_exit_once() -> None:
    """Register :func:`_shut_down_at_exit`, once a transport is loaded: handlers run last registered first."""
    atexit.register(_shut_down_at_exit)


def _shut_down_at_exit() -> None:
    """Shut down the sidecars a process leaves open, so that their connections, sockets and files go with it."""
    deadline = time.monotonic() + _EXIT_CLOSE_SECONDS  # for all of them together
    for sidecar in list(_made):
        if not sidecar._closed and not sidecar._forked and not sidecar._loop_thread.is_current():
            try:
                sidecar._shutdown(max(deadline - time.monotonic(), 0.0))
            except Exception:  # exiting anyway: what is left is swept by the next sidecar of the rank
                logger.exception("shutting down sidecar rank %d at exit failed", sidecar.sidecar_rank)


T = TypeVar("T")
Ranks = int | Sequence[int] | Sequence[Sequence[int]]
#: Takes a fast-path send's outcome (see :meth:`Transport.send_nowait`).
Outcome = Callable[[Exception | None], None]


@dataclass
class SidecarConfig:
    """Per-process configuration; accepts the fields of Cornserve's ``SidecarConfig``.

    Args:
        sidecar_rank: This process's rank.
        group: The tensor-parallel group this rank belongs to (defaults to ``[sidecar_rank]``).
        max_workers: Accepted for compatibility; the sidecar uses one event-loop thread.
        send_tensor_dtype: Accepted for compatibility (Cornserve's slot sizing hint); unused.
        send_tensor_shape: Accepted for compatibility; unused.
        recv_tensor_dtype: Accepted for compatibility; unused.
        recv_tensor_shape: Accepted for compatibility; unused.
        concurrent_copy: Accepted for compatibility; unused.
        transport: Overrides ``SIDECAR_TRANSPORT`` (and Cornserve's ``CORNSERVE_MOCK_SIDECAR`` switch).
        settings: Overrides for any :class:`SidecarSettings` field (e.g. ``{"recv_timeout": 5}``).

    Raises:
        ValueError: ``sidecar_rank`` is negative or not in ``group``, or ``settings`` gives another rank
            or transport than ``sidecar_rank`` and ``transport`` do.
    """

    sidecar_rank: int
    group: list[int] | None = None
    max_workers: int = 8
    send_tensor_dtype: Any = None
    send_tensor_shape: tuple[int, ...] | None = None
    recv_tensor_dtype: Any = None
    recv_tensor_shape: tuple[int, ...] | None = None
    concurrent_copy: bool = True
    transport: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sidecar_rank < 0:
            raise ValueError(f"sidecar_rank must be >= 0, got {self.sidecar_rank}")
        self.group = sorted(self.group) if self.group is not None else [self.sidecar_rank]
        if self.sidecar_rank not in self.group:
            raise ValueError(f"sidecar_rank {self.sidecar_rank} is not in its group {self.group}")
        for key, value in (("rank", self.sidecar_rank), ("transport", self.transport)):
            given = self.settings.get(key)
            if value is not None and given is not None and given != value:
                raise ValueError(
                    f"settings[{key!r}]={given!r} contradicts {'sidecar_rank' if key == 'rank' else key}={value!r}; "
                    "give it once"
                )


def flatten_ranks(dst: Ranks) -> list[int]:
    """Turn ``3``, ``[3, 4]`` or ``[[3, 4], [5]]`` into the unique ranks ``[3, 4, 5]``.

    Raises:
        ValueError: A rank is negative or not an int, or no rank is given.
    """
    items: list[Any] = [dst] if isinstance(dst, int) else list(dst)
    ranks: list[int] = []
    for item in items:
        for rank in [item] if isinstance(item, int) else item:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise ValueError(f"destination ranks must be ints >= 0, got {rank!r} in {dst!r}")
            if rank not in ranks:
                ranks.append(rank)
    if not ranks:
        raise ValueError("dst_sidecar_ranks is empty; name at least one destination rank")
    return ranks


def _check_id(id: object, *, text: bool) -> None:
    """Check that ``id`` can name a message (a frame header would refuse it otherwise).

    Args:
        id: What the caller gave.
        text: Whether the id must also encode as UTF-8, as frame headers carry it to peers; only a
            peerless transport (mock-file) stores ids with surrogate code points, as file names.

    Raises:
        ValueError: It is not a str of 1 to ``MAX_ID_CHARS`` characters, or (``text``) it holds a
            surrogate code point.
    """
    if type(id) is not str or not 1 <= len(id) <= MAX_ID_CHARS:
        raise ValueError(f"id must be a str of 1 to {MAX_ID_CHARS} characters, got {id!r:.80}")
    if text and not id.isascii():
        try:
            id.encode()
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"id must be valid Unicode text, got {id!r:.80}: character {exc.start} is a surrogate code point, "
                "which a frame header cannot carry to a peer (decode such names with errors='replace', or use only "
                "the mock-file transport, which stores them)"
            ) from None


def _check_count(name: str, value: object) -> None:
    """Raises ValueError unless ``value`` is an int (not a bool, which JSON would write as true/false)."""
    if type(value) is not int:
        raise ValueError(f"{name} must be an int, got {value!r:.80}")


def _check_key(id: object, chunk_id: object, *, text: bool) -> None:
    """Raises ValueError unless ``(id, chunk_id)`` can name a chunk that a peer sends (as ``send`` checks)."""
    _check_id(id, text=text)
    if type(chunk_id) is not int or chunk_id < 0:
        raise ValueError(f"chunk_id must be an int >= 0, got {chunk_id!r:.80}")


#: States of a ``concurrent.futures.Future`` whose outcome is in.
_SETTLED = frozenset({"FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED"})


class SendFuture(concurrent.futures.Future[T]):
    """The future ``send`` and ``close_stream`` return.

    A ``concurrent.futures.Future`` (use ``result()``, or ``await asyncio.wrap_future(f)``) that logs
    its error when it is garbage-collected without anyone having looked at it.
    """

    def __init__(self, what: str, loop_thread: _LoopThread | None = None) -> None:
        super().__init__()
        self._what = what
        #: The sidecar's thread, which settles this future: waiting on it there would never end.
        self._loop_thread = loop_thread
        self._retrieved = False
        #: Whether callbacks were attached: then the outcome is set on the sidecar's thread (see the guide).
        self.has_callbacks = False
        #: Held while callbacks are attached and while another thread sets the outcome (``_settle_unless_callbacks``).
        self._attaching = threading.Lock()
        #: Reads the transport on the waiting thread until the outcome is in (``None``: nothing to read).
        self.poll: Callable[[Callable[[], bool]], None] | None = None
        self._generation = _generation

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[T]], object]) -> None:
        """Call ``fn(future)`` once it is done, on the sidecar's thread (at once, here, if it is done already)."""
        with self._attaching:
            self.has_callbacks = True
        super().add_done_callback(fn)

    def _settle_unless_callbacks(self, settle: Callable[[], None]) -> bool:
        """Run ``settle`` here, unless callbacks are attached (for a thread other than the sidecar's).

        Attaching a callback waits until ``settle`` is done, so a callback runs either on the
        sidecar's thread (this returned ``False`` and the caller hands the outcome there) or at once
        on the thread attaching it (the outcome was in), never on this thread.

        Args:
            settle: Sets this future's outcome; it must not attach callbacks to it.

        Returns:
            Whether ``settle`` ran.
        """
        with self._attaching:
            if self.has_callbacks:
                return False
            settle()
            return True

    def result(self, timeout: float | None = None) -> T:
        """Wait for completion; raise the send's error if it failed (see ``Sidecar.send``).

        Raises:
            SidecarClosedError: This is a forked child, and the send its parent started is not done.
            RuntimeError: Called on the sidecar's own thread (in a callback) before the send is done.
        """
        self._retrieved = True
        self._check_process()
        self._check_thread()
        self._poll_first()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for completion and return the send's error, or ``None``.

        Raises:
            SidecarClosedError: This is a forked child, and the send its parent started is not done.
            RuntimeError: Called on the sidecar's own thread (in a callback) before the send is done.
        """
        self._retrieved = True
        self._check_process()
        self._check_thread()
        self._poll_first()
        return super().exception(timeout)

    def _check_process(self) -> None:
        """Refuse to wait, in a forked child, for a send its parent started: only the parent can finish it.

        Waiting would never end, and reading the parent's connections for the outcome would take
        messages meant for the parent. The state is read without the future's lock, which a parent's
        thread may have held at the fork.
        """
        if self._generation != _generation and self._state not in _SETTLED:
            raise SidecarClosedError(
                f"{self._what} was started by the process that forked this one; this child (pid {os.getpid()}) "
                "cannot wait for it, only that process can"
            )

    def _check_thread(self) -> None:
        """Refuse to wait on the sidecar's own thread, which is the one that would settle this future."""
        if self._loop_thread is not None and self._loop_thread.is_current() and not self.done():
            raise RuntimeError(
                f"{self._what}: result() or exception() was called on the sidecar's own thread (in a callback) "
                "before the send finished; that thread finishes it, so the wait would never end. Attach a callback "
                "with add_done_callback instead, or wait on another thread"
            )

    def _poll_first(self) -> None:
        """Let the transport read the acknowledgement on this thread before it sleeps (as ``recv_sync`` does)."""
        if self.poll is not None and not self.done():
            self.poll(self.done)

    def __del__(self) -> None:
        if not self._retrieved and self.done() and not self.cancelled():
            error = super().exception(0)
            if error is not None:
                logger.error(
                    "%s failed and nobody retrieved the error: %s: %s", self._what, type(error).__name__, error
                )


class _Lookup(concurrent.futures.Future[object]):
    """A receive's waiter that a pull-based transport's lookup settles; ``started`` is set once it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.started: concurrent.futures.Future[None] = concurrent.futures.Future()

    @staticmethod
    def start_within(timeout: float) -> float:
        """How long the receive waits for the lookup to start: its timeout and a grace, for a loop held up."""
        return min(timeout + _PULL_GRACE_SECONDS, threading.TIMEOUT_MAX)


class _LoopThread:
    """An asyncio loop running on a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        #: Set once the loop has run for the last time; :meth:`call_soon` then refuses (under the lock).
        self._finished = False
        self._handing = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Let work in flight finish (receives failed by the shutdown), cancel what is stuck, and run
        # the callbacks that hand results to callers: no caller may wait on a stopped loop.
        pending = asyncio.all_tasks(self.loop)
        if pending:
            _, stuck = self.loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
            for task in stuck:
                task.cancel()
            if stuck:
                self.loop.run_until_complete(asyncio.wait(stuck, timeout=1.0))
        self.loop.run_until_complete(asyncio.sleep(0))
        with self._handing:
            self._finished = True
        self.loop.run_until_complete(asyncio.sleep(0))  # what was handed over before that
        late = asyncio.all_tasks(self.loop)  # coroutines handed over after the first look: they end here too
        for task in late:
            task.cancel()
        if late:
            self.loop.run_until_complete(asyncio.wait(late, timeout=1.0))

    def _hand_over(self, hand: Callable[[], T]) -> T:
        """``hand()``, which gives the loop work, unless the loop has run for the last time (any thread).

        Raises:
            SidecarClosedError: The loop will not run again (the work would never be done).
        """
        with self._handing:
            if not self._finished:
                with contextlib.suppress(RuntimeError):  # closed: refused below
                    return hand()
        raise SidecarClosedError("the sidecar was shut down; create a new Sidecar")

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop (any thread).

        Raises:
            SidecarClosedError: The loop has run for the last time (the coroutine would never run).
        """
        try:
            return self._hand_over(lambda: asyncio.run_coroutine_threadsafe(coro, self.loop))
        except SidecarClosedError:
            coro.close()
            raise

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop (any thread).

        Raises:
            SidecarClosedError: The loop has run for the last time (the callback would never run).
        """
        self._hand_over(lambda: self.loop.call_soon_threadsafe(callback, *args))

    def is_current(self) -> bool:
        """Whether the calling thread is the loop's."""
        return threading.current_thread() is self.thread

    def check_not_on_loop(self) -> None:
        if self.is_current():
            raise RuntimeError("a blocking sidecar call was made on the sidecar's own thread; use the async form")

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            self.check_not_on_loop()
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait up to ``timeout`` seconds for its thread (it closes the loop once ended)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


class _SendDeadlines:
    """Fails the sends started with ``Transport.send_nowait`` that outlive ``SIDECAR_SEND_TIMEOUT``.

    Those sends start on the caller's thread, and arming a loop timer for each would cost the very
    hop they avoid. As every send gets the same timeout, the order they start in is the order they
    expire in: :meth:`add` (any thread) files them in an insertion-ordered dict, :meth:`discard`
    removes the finished ones, and one check on the loop thread, repeated every ``tick`` seconds
    while any is filed, expires the oldest ones that are overdue. A send therefore times out between
    ``timeout`` and ``timeout + tick`` seconds after it started.
    """

    def __init__(self, loop_thread: _LoopThread, timeout: float) -> None:
        self._loop_thread = loop_thread
        self._timeout = timeout
        self._tick = min(0.1, timeout / 10)
        self._lock = threading.Lock()
        self._filed: dict[object, tuple[float, Callable[[], None]]] = {}
        self._armed = False

    def add(self, key: object, expire: Callable[[], None]) -> None:
        """Call ``expire`` on the loop thread once the timeout passed, unless ``key`` is discarded first.

        Raises:
            SidecarClosedError: The sidecar's loop has stopped.
        """
        with self._lock:
            self._filed[key] = (time.monotonic() + self._timeout, expire)
            if self._armed:
                return
            self._armed = True
        self._loop_thread.call_soon(self._arm)

    def discard(self, key: object) -> None:
        """Forget ``key`` (its send finished); any thread."""
        with self._lock:
            self._filed.pop(key, None)

    def _arm(self) -> None:
        self._loop_thread.loop.call_later(self._tick, self._check)

    def _check(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = list(itertools.takewhile(lambda item: item[1][0] <= now, self._filed.items()))
            for key, _ in overdue:
                del self._filed[key]
            self._armed = bool(self._filed)
        for _, (_, expire) in overdue:
            expire()
        if self._armed:
            self._arm()


def _call_hook(hook: Any, **kwargs: Any) -> None:
    """Call an observability hook; a plugin that raises is logged, and the send or receive goes on.

    Hooks run inside the data path (a frame is being stored, a send is being settled): an error
    there must not fail, hang or repeat the transfer it reports on.
    """
    try:
        hook(**kwargs)
    except Exception:
        logger.exception("a %s hook raised; the sidecar goes on without it", hook.name)


class Sidecar:
    """Sends and receives ``(id, chunk_id)``-addressed data to and from other sidecar ranks.

    Construction starts the selected transport (it listens for peers) and returns once it is ready.
    Use it as a context manager, or call :meth:`shutdown_sync` / :meth:`shutdown` when done.

    Args:
        config: Rank and overrides; ``None`` reads ``SIDECAR_RANK``.
        registry: Plugin registry (defaults to the process-wide one).

    Raises:
        SettingsError: A setting is invalid (the message names the variable).
        TransportNotFoundError: ``SIDECAR_TRANSPORT`` names no installed transport.
        PluginUnavailableError: The transport is installed but cannot load here.
        PeerUnreachableError: The transport could not start listening.
    """

    def __init__(self, config: SidecarConfig | None = None, *, registry: Registry | None = None) -> None:
        overrides = dict(config.settings) if config is not None else {}
        if config is not None:
            overrides["rank"] = config.sidecar_rank
            if config.transport is not None:  # named in code: it wins over the environment, mock switch too
                overrides["transport"] = config.transport
                overrides["mock_sidecar"] = False
        self.settings = load_settings(SidecarSettings, **overrides)
        check_recv_device(self.settings.recv_device)
        if self.settings.rank is None:
            raise SidecarError("no sidecar rank: pass SidecarConfig(sidecar_rank=N) or set SIDECAR_RANK")
        self.config = config or SidecarConfig(sidecar_rank=self.settings.rank)
        self.sidecar_rank: int = self.settings.rank
        self.group = self.config.group
        self._registry = registry or get_registry()
        self.transport_name = self.settings.transport_name
        transport_cls = self._registry.load_transport(self.transport_name)
        self.codec = Codec(self._registry.load_serializers())
        self._hooks = self._registry.manager.hook
        self._closed = False
        self._pid = os.getpid()
        self._generation = _generation
        self._shutting_down = threading.Lock()  # one shutdown at a time; the others wait for it
        self._loop_thread = _LoopThread(f"sidecar-{self.sidecar_rank}")
        # Pull-based transports (mock-file) fetch on demand; push-based ones leave ``want`` alone.
        self._pulls = transport_cls.want is not Transport.want
        self._store = ReceiveStore(
            self.codec,
            rank=self.sidecar_rank,
            transport=self.transport_name,
            max_bytes=self.settings.max_buffered_bytes,
            device=self.settings.recv_device,
            on_recv=self._report_recv,
            loop=self._loop_thread.loop,
            abandon_after=2 * self.settings.send_timeout,
            ends_learned=self._pulls,
        )
        try:
            self._transport: Transport = self._loop_thread.call(self._start(transport_cls))
        except BaseException:
            self._loop_thread.stop()
            raise
        self._sends_nowait = type(self._transport).send_nowait is not Transport.send_nowait
        self._polls = type(self._transport).poll_while_waiting is not Transport.poll_while_waiting
        # Ids travel in frame headers (UTF-8 JSON) to peers; a peerless transport stores any str.
        self._text_ids = not self._transport.peerless
        hooks = (self._hooks.sidecar_on_send, self._hooks.sidecar_on_error)
        self._reports_sends = any(hook.get_hookimpls() for hook in hooks)
        self._deadlines = _SendDeadlines(self._loop_thread, self.settings.send_timeout)
        limits = [x for x in (self.settings.chunk_size, self._transport.max_part_bytes) if x is not None]
        self._max_part_bytes = min(limits) if limits else None
        _made.add(self)
        _at_exit_once()

    async def _start(self, transport_cls: type[Transport]) -> Transport:
        ctx = TransportContext(
            rank=self.sidecar_rank,
            settings=self.settings,
            inbox=self._store,
            codec=self.codec,
            loop=asyncio.get_running_loop(),
        )
        try:
            transport = transport_cls(ctx)
            await transport.start()
        except Exception as exc:
            raise self._sidecar_error("start", exc)  # noqa: B904 - chained by _sidecar_error
        return transport

    def _sidecar_error(self, method: str, exc: Exception) -> SidecarError:
        """What the caller gets for an exception the transport raised in ``method``.

        A :class:`SidecarError` as it is; anything else as a :class:`PluginError` naming the transport,
        the rank and the method, with ``exc`` as its cause.
        """
        if isinstance(exc, SidecarError):
            return exc
        failure = PluginError(
            f"transport {self.transport_name!r} on rank {self.sidecar_rank} failed in {method}: "
            f"{type(exc).__name__}: {exc}. A transport reports its failures as SidecarErrors; this one escaped it, "
            "a bug of the transport or a failure it does not handle yet: report it to the transport's authors"
        )
        failure.__cause__ = exc
        return failure

    # -- sending ------------------------------------------------------------------------------

    def send(
        self,
        data: Any,
        id: str,
        dst_sidecar_ranks: Ranks,
        chunk_id: int = 0,
        num_chunks: int = 1,
        stream: bool = False,
        *,
        serializer: str | None = None,
    ) -> SendFuture[None]:
        """Send ``data`` as chunk ``chunk_id`` of ``id`` to every rank of every destination group.

        Returns at once. The object is encoded before this returns, but its memory is read until
        the future resolves: do not modify it in place before then.

        Args:
            data: A tensor, list/tuple of tensors, JSON-compatible dict/list, or primitive.
            id: The message id the receivers ``recv`` by.
            dst_sidecar_ranks: ``[[r0, r1], [r2]]`` (tensor-parallel groups), ``[r0, r2]`` or ``r0``.
            chunk_id: Which chunk of ``id`` this is.
            num_chunks: How many chunks ``id`` has (ignored when ``stream``).
            stream: The number of chunks is not known yet; end the stream with :meth:`close_stream`.
            serializer: Force a serializer by name instead of choosing by type.

        Returns:
            A future that resolves to ``None`` once every destination holds the data, or raises
            (:class:`PeerUnreachableError`, :class:`RemoteError`, :class:`SendTimeoutError`, ...).

        Raises:
            ValueError: Bad destination ranks, chunk numbers or id (a str of 1 to 1024 characters, valid
                Unicode text unless the transport is peerless, as mock-file is).
            SerializationError: No serializer accepts ``data``.
            FrameError: ``data`` would need a frame header over the 1 MiB limit (too much metadata).
            SidecarClosedError: The sidecar was shut down, or this is a forked child of the process that made it.
        """
        self._check_open()
        ranks = self._destinations(dst_sidecar_ranks)
        if data is None and (stream or num_chunks > 1):
            raise ValueError(
                f"cannot send None as chunk {chunk_id} of {id!r}: recv returns None for the end of a stream or "
                "of a chunked message, so a None chunk would end it early; send a sentinel such as {} instead"
            )
        _check_id(id, text=self._text_ids)
        _check_count("chunk_id", chunk_id)
        _check_count("num_chunks", num_chunks)
        if chunk_id < 0 or (not stream and not 0 <= chunk_id < num_chunks):
            raise ValueError(f"chunk_id {chunk_id} must be in [0, num_chunks={num_chunks}) for id {id!r}")
        frames = self.codec.frames(
            data,
            id=id,
            chunk_id=chunk_id,
            num_chunks=None if stream else num_chunks,
            src=self.sidecar_rank,
            max_part_bytes=self._max_part_bytes,
            serializer=serializer,
        )
        return self._start_send(ranks, frames, f"send id={id!r} chunk={chunk_id}")

    def close_stream(self, id: str, num_chunks: int, dst_sidecar_ranks: Ranks) -> SendFuture[None]:
        """Tell every destination that stream ``id`` has ``num_chunks`` chunks.

        It may be sent before any chunk; receivers then return ``None`` for ``recv`` of a chunk at or
        past ``num_chunks``.

        Returns:
            A future that resolves once every destination has recorded the end.

        Raises:
            ValueError: Bad destination ranks or id (as for :meth:`send`), or a negative ``num_chunks``.
            SidecarClosedError: The sidecar was shut down, or this is a forked child of the process that made it.
        """
        self._check_open()
        ranks = self._destinations(dst_sidecar_ranks)
        _check_id(id, text=self._text_ids)
        _check_count("num_chunks", num_chunks)
        if num_chunks < 0:
            raise ValueError(f"num_chunks must be >= 0, got {num_chunks}")
        frame = Frame(Header(kind="close", id=id, num_chunks=num_chunks, src=self.sidecar_rank))
        return self._start_send(ranks, [frame], f"close_stream id={id!r}")

    def _destinations(self, dst: Ranks) -> list[int]:
        if self._transport.peerless:
            # Storage, not peers: the data is stored once, whoever reads it back. Destinations are not
            # used (Cornserve's mock mode sends to ``[[]]`` and to the sender's own rank).
            return [self.sidecar_rank]
        ranks = flatten_ranks(dst)
        if self.sidecar_rank in ranks:
            raise ValueError(f"rank {self.sidecar_rank} cannot send to itself (dst_sidecar_ranks={dst!r})")
        return ranks

    def _start_send(self, ranks: list[int], frames: list[Frame], what: str) -> SendFuture[None]:
        """Offer a one-frame, one-rank message to the transport's fast path, else send it on the loop."""
        if self._sends_nowait and len(ranks) == 1 and len(frames) == 1:
            future: SendFuture[None] = SendFuture(what, self._loop_thread)
            # The frame goes out at once and cannot be called back: cancel() returns False from now on.
            future.set_running_or_notify_cancel()
            if self._polls:
                future.poll = self._poll_off_loop
            rank, frame = ranks[0], frames[0]
            done, expire = self._fast_send_outcome(future, rank, frame)
            # Filed first, so that an outcome reported at once (a broken link) also removes it.
            self._deadlines.add(future, expire)
            try:
                taken = self._transport.send_nowait(rank, frame, done)
            except BaseException as exc:
                self._deadlines.discard(future)
                if isinstance(exc, Exception):
                    raise self._sidecar_error("send_nowait", exc)  # noqa: B904 - chained by _sidecar_error
                raise
            if taken:
                return future
            self._deadlines.discard(future)
        return self._track(self._loop_thread.submit(self._send_all(ranks, frames)), what)

    def _fast_send_outcome(
        self, future: SendFuture[None], rank: int, frame: Frame
    ) -> tuple[Outcome, Callable[[], None]]:
        """The callbacks that end a fast-path send: ``done`` takes its outcome, ``expire`` times it out.

        Both report the outcome to the hooks, then settle ``future``. Only the first outcome counts
        (the acknowledgement, or the send timeout). The hooks run first, so the loop thread is done
        with the send by the time the caller wakes. ``expire`` (loop thread) has the transport give
        the frame up before the caller wakes (:meth:`Transport.abandon`): the caller may then reuse
        the frame's memory.
        """
        header = frame.header
        start = time.perf_counter()
        settled = False  # only the first outcome counts (the acknowledgement, or the timeout)

        def settle(error: Exception | None) -> None:
            nonlocal settled
            settled = True
            self._deadlines.discard(future)
            self._report_send(header, rank, start, error)
            try:
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
            except concurrent.futures.InvalidStateError:  # set just now (the acknowledgement raced the timeout)
                pass

        def done(error: Exception | None) -> None:
            if settled:
                return
            if error is not None:
                error = self._sidecar_error("send_nowait", error)
            if self._loop_thread.is_current():
                settle(error)
            elif self._reports_sends or not future._settle_unless_callbacks(lambda: settle(error)):
                # Hooks and callbacks run on the sidecar's thread.
                try:
                    self._loop_thread.call_soon(done, error)
                except SidecarClosedError:  # a stopped loop: settle it here
                    settle(error)

        def expire() -> None:
            nonlocal settled
            if settled:
                return
            settled = True  # an outcome the abandoning causes (a closed connection's error) is not the send's
            try:
                self._transport.abandon(rank, frame)
            except Exception:  # must not raise; the send times out all the same
                logger.exception("%s: the transport failed to give up a send that timed out", self.transport_name)
            settle(self._send_timeout_error(header, rank))

        return done, expire

    def _poll_off_loop(self, ready: Callable[[], bool]) -> None:
        """:meth:`Transport.poll_while_waiting`, unless called on the loop's thread (a callback waiting there)."""
        if not self._loop_thread.is_current():
            self._transport.poll_while_waiting(ready)

    def _send_timeout_error(self, header: Header, rank: int) -> SendTimeoutError:
        timeout = self.settings.send_timeout
        return SendTimeoutError(
            f"send {header.describe()} to {self._transport.describe_peer(rank)} over {self.transport_name} did not "
            f"complete within SIDECAR_SEND_TIMEOUT={timeout:g}s; is the peer running and reading?"
        )

    async def _send_all(self, ranks: list[int], frames: list[Frame]) -> None:
        if len(ranks) == 1:  # the common case, without the task gather would make
            await self._send_one(ranks[0], frames)
            return
        results = await asyncio.gather(*(self._send_one(rank, frames) for rank in ranks), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == 1:
            raise errors[0]
        if errors:
            summary = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
            message = f"{len(errors)} of {len(ranks)} destinations failed: {summary}"
            try:  # the first error's class, if it takes a message alone (every SidecarError does)
                combined: BaseException = type(errors[0])(message)
            except Exception:
                combined = SidecarError(message)
            raise combined from errors[0]

    async def _send_one(self, rank: int, frames: list[Frame]) -> None:
        start = time.perf_counter()
        timeout = self.settings.send_timeout
        try:
            async with asyncio.timeout(timeout):  # one limit for every part; unlike wait_for, sends in this task
                for frame in frames:
                    await self._transport.send(rank, frame)
        except TimeoutError:
            error = self._send_timeout_error(frames[0].header, rank)
            self._report_send(frames[0].header, rank, start, error)
            raise error from None
        except Exception as exc:
            failure = self._sidecar_error("send", exc)
            self._report_send(frames[0].header, rank, start, failure)
            raise failure  # noqa: B904 - chained by _sidecar_error
        self._report_send(frames[0].header, rank, start, None)

    def _report_send(self, header: Header, rank: int, start: float, error: BaseException | None) -> None:
        """Tell the observability hooks how a send to ``rank`` ended (``error`` is ``None`` on success)."""
        # A hook call costs microseconds even when no plugin implements it; most deployments have none.
        if error is not None:
            _call_hook(self._hooks.sidecar_on_error, operation="send", error=error, transport=self.transport_name)
        elif header.kind == "data" and self._hooks.sidecar_on_send.get_hookimpls():
            _call_hook(
                self._hooks.sidecar_on_send,
                id=header.id,
                chunk_id=header.chunk_id,
                dst_rank=rank,
                nbytes=header.total_bytes,
                seconds=time.perf_counter() - start,
                transport=self.transport_name,
            )

    def _report_recv(self, header: Header, nbytes: int) -> None:
        if not self._hooks.sidecar_on_recv.get_hookimpls():
            return
        if not self._loop_thread.is_current():  # a thread polling in recv_sync delivered it: hooks run on the loop
            with contextlib.suppress(SidecarClosedError):
                self._loop_thread.call_soon(self._report_recv, header, nbytes)
            return
        _call_hook(
            self._hooks.sidecar_on_recv,
            id=header.id,
            chunk_id=header.chunk_id,
            src_rank=header.src,
            nbytes=nbytes,
            transport=self.transport_name,
        )

    def _track(self, future: concurrent.futures.Future[T], what: str) -> SendFuture[T]:
        """Wrap a loop future so that an error nobody retrieves is logged, never silent."""
        tracked: SendFuture[T] = SendFuture(what, self._loop_thread)

        def copy(done: concurrent.futures.Future[T]) -> None:
            if tracked.cancelled():
                return
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled just now
                if done.cancelled():  # not by the caller (handled above): the shutdown stopped the send
                    tracked.set_exception(
                        SidecarClosedError(f"{what}: sidecar rank {self.sidecar_rank} was shut down before it finished")
                    )
                elif (error := done.exception()) is not None:
                    tracked.set_exception(error)
                else:
                    tracked.set_result(done.result())

        def propagate_cancel(outer: concurrent.futures.Future[T]) -> None:
            if outer.cancelled():
                future.cancel()

        future.add_done_callback(copy)
        tracked.add_done_callback(propagate_cancel)
        return tracked

    # -- receiving ----------------------------------------------------------------------------

    def _recv_timeout(self, timeout: float | None) -> float:
        """A receive's timeout in seconds: ``timeout``, or ``SIDECAR_RECV_TIMEOUT`` for ``None``.

        Raises:
            ValueError: ``timeout`` is not a number of seconds >= 0.
        """
        if timeout is None:
            return self.settings.recv_timeout
        number = (
            type(timeout) is float
            or type(timeout) is int
            or (  # the ABC check only for other types
                not isinstance(timeout, bool) and isinstance(timeout, numbers.Real)
            )
        )
        if not number or not timeout >= 0:  # NaN fails >= 0
            raise ValueError(
                f"timeout must be a number of seconds >= 0, or None for SIDECAR_RECV_TIMEOUT; got {timeout!r:.80}"
            )
        return min(float(timeout), threading.TIMEOUT_MAX)

    @staticmethod
    def _wait(waiter: Waiter, timeout: float) -> object:
        """The waiter's outcome (or its error), waiting at most ``timeout`` (blocking).

        A pull-based transport's lookup settles the waiter itself after its last look, and loads a
        file it found however long that takes; only its start is bounded (by the timeout and a
        grace, for a loop held up meanwhile).

        Raises:
            TimeoutError: Nothing came in time, or the lookup did not start in time.
        """
        if isinstance(waiter, _Lookup):
            waiter.started.result(waiter.start_within(timeout))
            return waiter.result()
        return waiter.result(timeout)

    @staticmethod
    async def _wait_async(waiter: Waiter, timeout: float) -> object:
        """Async form of :meth:`_wait`."""
        if isinstance(waiter, _Lookup):
            await asyncio.wait_for(asyncio.wrap_future(waiter.started), waiter.start_within(timeout))
            return await asyncio.wrap_future(waiter)
        return await asyncio.wait_for(asyncio.wrap_future(waiter), timeout)

    def _waiter(self, id: str, chunk_id: int, timeout: float) -> Waiter:
        """A thread-safe future for the chunk, registered with the (thread-safe) store right here.

        Only a pull-based transport that does not hold the chunk yet is asked for it on the loop,
        to look for it for up to ``timeout`` seconds; the lookup then settles the waiter, with
        :class:`RecvTimeoutError` if it found nothing (even with ``timeout=0`` it looks once).
        """
        self._check_open()
        _check_key(id, chunk_id, text=self._text_ids)
        if not self._pulls:
            waiter: Waiter = concurrent.futures.Future()
            self._store.add_waiter(id, chunk_id, waiter)
            return waiter
        found, value = self._store.peek(id, chunk_id)
        if found or self._store.past_end(id, chunk_id):  # past the end: nothing to ask the transport for
            done: Waiter = concurrent.futures.Future()
            done.set_result(value)
            return done
        lookup = _Lookup()
        pull = self._loop_thread.submit(self._pull(id, chunk_id, lookup, timeout))
        # A receive that gives up cancels its waiter: stop looking for the chunk then.
        lookup.add_done_callback(lambda w: pull.cancel() if w.cancelled() else None)
        return lookup

    async def _pull(self, id: str, chunk_id: int, waiter: _Lookup, timeout: float) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # the receive stopped waiting for it
            waiter.started.set_result(None)
        try:
            await self._transport.want(id, chunk_id, timeout)
        except Exception as exc:  # a LookupError says it can never provide this key: passed on as it is
            settle_waiter(waiter, error=exc if isinstance(exc, LookupError) else self._sidecar_error("want", exc))
            return
        except asyncio.CancelledError:  # the receive gave up, or the transport closed under it (shutdown)
            settle_waiter(waiter, error=self._store.closed_error(id, chunk_id))
            raise
        if not waiter.done():  # else the receive gave up meanwhile: nobody would drop this waiter
            self._store.add_waiter(id, chunk_id, waiter)
        if not waiter.done():  # not found in time, and only a lookup delivers: the receive times out now
            self._store.drop_waiter(id, chunk_id, waiter)
            settle_waiter(waiter, error=self._store.timeout_error(id, chunk_id, timeout))

    def _give_up(self, id: str, chunk_id: int, waiter: Waiter) -> None:
        waiter.cancel()  # done, so that a pull-based transport answering late does not file it again
        self._store.drop_waiter(id, chunk_id, waiter)

    async def recv(self, id: str, chunk_id: int = 0, timeout: float | None = None) -> Any:
        """Wait for chunk ``chunk_id`` of ``id`` and return it; idempotent until :meth:`mark_done`.

        Args:
            id: The message id.
            chunk_id: The chunk to wait for.
            timeout: Seconds to wait (default ``SIDECAR_RECV_TIMEOUT``).

        Returns:
            The object, or ``None`` if ``chunk_id`` is at or past the end of a closed stream.

        Raises:
            RecvTimeoutError: Nothing arrived in time (the message names id, chunk, transport, peer).
            AlreadyDoneError: The chunk was released with :meth:`mark_done`.
            PeerLostError: The peer sending this id disconnected before sending the chunk.
            SidecarClosedError: The sidecar was shut down, or this is a forked child of the process that made it.
            ValueError: ``id`` is not a str of 1 to 1024 characters (valid Unicode text unless the
                transport is peerless, as mock-file is), ``chunk_id`` not an int >= 0, or ``timeout`` not
                a number >= 0 (``send`` takes the same ids and chunks).
        """
        timeout = self._recv_timeout(timeout)
        waiter = self._waiter(id, chunk_id, timeout)
        if waiter.done():  # held already: no wait (wrap_future would report it only a loop turn later)
            return waiter.result()
        try:  # a pull-based transport's lookup ends the wait itself, after its last look
            return await self._wait_async(waiter, timeout)
        except TimeoutError:
            self._give_up(id, chunk_id, waiter)
            raise self._store.timeout_error(id, chunk_id, timeout) from None
        except asyncio.CancelledError:
            self._give_up(id, chunk_id, waiter)
            raise

    def recv_sync(self, id: str, chunk_id: int = 0, timeout: float | None = None) -> Any:
        """Blocking form of :meth:`recv` (same arguments, result and errors).

        While it waits, a transport that supports it (localhost) lets this thread read its sockets
        for a short budget before it sleeps, so that a prompt reply reaches it sooner (see the
        guide's "Performance").
        """
        self._loop_thread.check_not_on_loop()
        timeout = self._recv_timeout(timeout)
        waiter = self._waiter(id, chunk_id, timeout)
        if self._polls and not waiter.done():
            self._transport.poll_while_waiting(waiter.done)  # not the loop's thread: checked above
        try:  # a pull-based transport's lookup ends the wait itself, after its last look
            return self._wait(waiter, timeout)
        except TimeoutError:
            self._give_up(id, chunk_id, waiter)
            raise self._store.timeout_error(id, chunk_id, timeout) from None
        except BaseException:  # its error, or an interruption (KeyboardInterrupt): nothing stays filed
            self._give_up(id, chunk_id, waiter)
            raise

    async def iter_chunks(self, id: str, start: int = 0, *, mark_done: bool = False) -> AsyncIterator[Any]:
        """Yield the chunks of ``id`` in order until the end of the stream.

        Args:
            id: The stream's id.
            start: First chunk to yield.
            mark_done: Release each chunk once the loop body has processed it and asked for the next.

        Raises:
            RecvTimeoutError: A chunk did not arrive within the receive timeout.
            PeerLostError: The sender disconnected mid-stream.
            ValueError: ``id`` or ``start`` is not one a chunk can have (see :meth:`recv`).
        """
        chunk_id = start
        while True:
            value = await self.recv(id, chunk_id)
            if value is None:
                return
            yield value
            if mark_done:
                await self.mark_done(id, chunk_id)
            chunk_id += 1

    async def mark_done(self, id: str, chunk_id: int = 0) -> None:
        """Release chunk ``chunk_id`` of ``id``: its memory is freed and a later ``recv`` raises.

        Tensors received zero-copy are views of transport memory that may be reused after this
        call: copy what you want to keep first. Marking an unknown chunk does nothing.

        Raises:
            SidecarClosedError: The sidecar was shut down, or this is a forked child of the process that made it.
            ValueError: ``id`` or ``chunk_id`` is not one a chunk can have (see :meth:`recv`).
        """
        self.mark_done_sync(id, chunk_id)

    def mark_done_sync(self, id: str, chunk_id: int = 0) -> None:
        """Form of :meth:`mark_done` for synchronous code (it never waits for the event loop).

        Raises:
            SidecarClosedError: The sidecar was shut down, or this is a forked child of the process that made it.
            ValueError: ``id`` or ``chunk_id`` is not one a chunk can have (see :meth:`recv`).
        """
        self._check_open()
        _check_key(id, chunk_id, text=self._text_ids)
        self._store.mark_done(id, chunk_id)

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def _forked(self) -> bool:
        """Whether this process is a forked child of the one that made this sidecar."""
        return self._generation != _generation

    def _check_open(self) -> None:
        if self._forked:
            raise SidecarClosedError(
                f"sidecar rank {self.sidecar_rank} belongs to process {self._pid}; this forked child (pid "
                f"{os.getpid()}) shares that process's connections and has none of its threads. Create a new "
                "Sidecar in the child, with a rank of its own, or start children with the 'spawn' method"
            )
        if self._closed:
            raise SidecarClosedError(f"sidecar rank {self.sidecar_rank} was shut down; create a new Sidecar")

    async def _close(self) -> None:
        self._store.close()
        try:
            await self._transport.close()
        except Exception:  # it must not raise; the sidecar shuts down all the same
            logger.exception("%s: the transport failed to close; its resources may not be released", self)

    def shutdown_sync(self) -> None:
        """Stop the transport, release received memory and stop the loop thread. Idempotent.

        Several threads may call it at once: one shuts down, the others return once it is done. In a
        forked child it only marks the parent's sidecar closed here: the connections, sockets and
        memory it shares with the parent stay the parent's. A transport whose ``close`` has not
        returned after 30 seconds is left behind (logged as an error): the loop stops without it.

        Raises:
            RuntimeError: Called on the sidecar's own thread (in a send future's callback, say),
                which cannot wait for itself to stop; use ``await shutdown()`` elsewhere.
        """
        if self._forked:  # its lock may have been held by a parent's thread at the fork
            self._closed = True
            return
        self._loop_thread.check_not_on_loop()
        self._shutdown(None)

    def _shutdown(self, timeout: float | None) -> None:
        """Shut down (not on the loop's thread) in about ``timeout`` seconds at most.

        ``None``: the transport's ``close`` gets :data:`_CLOSE_LIMIT` seconds, the loop's thread 10 more.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        close_limit = _CLOSE_LIMIT if timeout is None else timeout
        with self._shutting_down:
            if self._closed:
                return
            self._closed = True
            try:
                self._loop_thread.call(self._close(), close_limit)
            except TimeoutError:
                logger.error(
                    "%s: the transport did not close within %gs; stopping without it (its resources may leak)",
                    self,
                    close_limit,
                )
            except Exception:  # the loop already stopped
                logger.debug("%s: closing the transport failed", self, exc_info=True)
            self._loop_thread.stop(10.0 if deadline is None else max(deadline - time.monotonic(), 0.0))

    async def shutdown(self) -> None:
        """Async form of :meth:`shutdown_sync`."""
        await asyncio.to_thread(self.shutdown_sync)

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown_sync()

    async def __aenter__(self) -> Sidecar:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Sidecar rank={self.sidecar_rank} transport={self.transport_name} {state}>"
