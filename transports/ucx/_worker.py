"""One UCX context and worker, driven from one asyncio event loop: the only module that touches ucxx.

Each ucx transport owns a :class:`UcxWorker`. ucxx's low-level bindings are used directly (rather
than its process-wide ``ucxx.init`` context) so that every transport has its own worker bound to its
sidecar's event loop: several sidecars in one process, one after another or at once, never share
or outlive a loop.

Progress modes (``SIDECAR_UCX__PROGRESS_MODE``):

* ``blocking`` (default): no threads; the loop watches the worker's event file descriptor and
  progresses the worker itself, so a completion reaches its waiter without a thread hop. While a
  CUDA payload is in flight it keeps progressing (yielding to other callbacks between passes):
  the wake-up event of a finished CUDA copy comes later than a pass finds it (1 GiB on one GPU
  measured 0.37-0.40x of raw ucxx waiting for events, 0.52-0.56x progressing). Idle, it sleeps
  (about 1% of a core, UCX's own thread).
* ``polling``: like ``blocking``, but the loop progresses continuously, even when idle.
* ``thread``: a UCX progress thread sleeps on the worker's event file descriptor; completions reach
  the loop as asyncio futures (ucxx's request notifier, run by a small notifier thread): two thread
  hops per completion. Idle, about 3% of a core.
* ``thread-polling``: the same, but the progress thread spins (one core busy).

Concurrency: every method is called on the loop's thread, except :meth:`UcxWorker.watch_from_thread`
and :meth:`UcxWorker.call_on_loop` (any thread). Requests are submitted in call order
(ordering on a tag follows it). Cancellation: cancelling a future returned by :meth:`UcxWorker.track`
stops the wait only; the owner must close the endpoint, which cancels its requests. Closing:
:meth:`UcxWorker.close` stops the threads and frees the worker; close endpoints and listeners first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeAlias

from sidecar_core import settle

logger = logging.getLogger(__name__)

ProgressMode: TypeAlias = Literal["thread", "thread-polling", "blocking", "polling"]
PROGRESS_MODES: tuple[ProgressMode, ...] = ("thread", "thread-polling", "blocking", "polling")

#: How long the progress thread sleeps on the event file descriptor between checks, in ms.
_EPOLL_TIMEOUT_MS = 1
#: Progress passes made while closing (blocking modes), so UCX finishes closing endpoints and listeners.
_FINAL_PROGRESS_PASSES = 20
#: How long the notifier thread waits for requests before checking whether it must stop, in ns.
_NOTIFIER_PERIOD_NS = 100_000_000


def _make_cuda_current(device: int) -> None:
    """Progress-thread start hook: UCX's CUDA transports need a current CUDA context there."""
    try:
        import torch

        torch.cuda.set_device(device)
    except Exception:  # the thread keeps running; CUDA transfers then fail with UCX's error
        logger.exception("could not make CUDA device %d current in the UCX progress thread", device)


#: UCX settings the transport changes from UCX's defaults; a ``UCX_<NAME>`` environment variable wins.
_CONTEXT_DEFAULTS = {
    # A restarted sidecar must be able to listen on its port again while connections of the
    # previous one linger in TIME_WAIT.
    "TCP_CM_REUSEADDR": "y",
    # Callers' threads submit sends while the loop progresses the worker: with UCX's default
    # spinlock, a thread could spin through a whole time slice while the lock's holder was
    # preempted (2 cores: echo p99 1.1 to 3.5 ms with the spinlock, 0.86 to 1.3 ms with a mutex).
    "USE_MT_MUTEX": "y",
}


def _context_config() -> dict[str, str]:
    """The UCX context settings: the transport's defaults, less any set in the environment."""
    return {name: value for name, value in _CONTEXT_DEFAULTS.items() if f"UCX_{name}" not in os.environ}


#: ucxx's own log level unless ``UCXX_LOG_LEVEL`` is set. ucxx logs an ERROR line for every endpoint
#: that fails, including each refused attempt while a peer is still starting; the transport reports
#: every failure itself (as exceptions and this package's log records), so ucxx keeps its fatal lines.
_UCXX_LOG_LEVEL = "FATAL"


@contextlib.contextmanager
def _ucxx_log_level() -> Iterator[None]:
    """Give ucxx :data:`_UCXX_LOG_LEVEL` while it reads its level (making the first context), unless set.

    ucxx reads ``UCXX_LOG_LEVEL`` once per process; the variable is removed again afterwards, so the
    environment of this process and of its children stays as the user left it.
    """
    if "UCXX_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["UCXX_LOG_LEVEL"] = _UCXX_LOG_LEVEL
    try:
        yield
    finally:
        os.environ.pop("UCXX_LOG_LEVEL", None)


def _ignore(error: Exception | None) -> None:
    """The completion callback of a request whose outcome nobody waits for."""


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _error_of(future: asyncio.Future[None]) -> Exception | None:
    """A finished future's failure as an exception (a cancelled one reads as a closed connection)."""
    if future.cancelled():
        return ConnectionError("the request was cancelled: the connection is closing")
    error = future.exception()
    return error if error is None or isinstance(error, Exception) else ConnectionError(str(error))


class UcxWorker:
    """A UCX context and worker whose completions resolve asyncio futures on ``loop``.

    Args:
        loop: The event loop every method is called on (the sidecar's).
        mode: The progress mode (see the module docstring).
        cuda_device: CUDA device to make current in UCX's threads, or ``None`` without CUDA.

    Raises:
        ImportError: ucxx is not installed.
        RuntimeError: ucxx was built without the Python request notifier (``thread`` modes).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, mode: ProgressMode, cuda_device: int | None) -> None:
        import ucxx._lib.libucxx as ucx_api  # imported only when the transport runs

        self.api: Any = ucx_api
        self.loop = loop
        self.mode = mode
        self.threaded = mode.startswith("thread")
        flags = (ucx_api.Feature.TAG, ucx_api.Feature.STREAM, ucx_api.Feature.WAKEUP)
        with _ucxx_log_level():
            self._context = ucx_api.UCXContext(_context_config(), feature_flags=flags)
            self.worker: Any = ucx_api.UCXWorker(
                self._context, enable_delayed_submission=self.threaded, enable_python_future=self.threaded
            )
        self._inflight: dict[int, tuple[Any, object]] = {}
        self._closed = False
        # blocking / polling state
        self._pending: list[tuple[Any, Callable[[Exception | None], None], bool, object]] = []
        self._busy = 0
        self._scheduled = False
        self._efd = -1
        # thread state
        self._stop = threading.Event()
        self._notifier: threading.Thread | None = None
        if self.threaded:
            if not self.worker.enable_python_future:
                raise RuntimeError(
                    "this ucxx build has no Python request notifier; use SIDECAR_UCX__PROGRESS_MODE=blocking"
                )
            if cuda_device is not None:
                self.worker.set_progress_thread_start_callback(_make_cuda_current, (cuda_device,))
            self.worker.start_progress_thread(polling_mode=mode == "thread-polling", epoll_timeout=_EPOLL_TIMEOUT_MS)
            self._notifier = threading.Thread(target=self._notify, name="sidecar-ucx-notifier", daemon=True)
            self._notifier.start()
        else:
            self.worker.init_blocking_progress_mode()
            if mode == "blocking":
                self._efd = self.worker.epoll_file_descriptor
                loop.add_reader(self._efd, self._progress)
            self._kick()

    # -- requests -----------------------------------------------------------------------------

    def track(self, request: Any, keep: object, *, busy: bool = True) -> asyncio.Future[None]:
        """Return a future that completes with ``request`` (raising its UCX error if it failed).

        Args:
            request: A submitted ``UCXRequest``.
            keep: The buffer the request reads or writes; it and the request are kept alive until
                the request completes.
            busy: Whether the ``blocking`` mode must keep progressing until this request is done,
                instead of sleeping on the worker's events (CUDA transfers, whose events come late).
        """
        if self.threaded:
            future: asyncio.Future[None] = request.future
            key = id(request)
            self._inflight[key] = (request, keep)
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        else:
            future = self.loop.create_future()
            if request.completed:  # e.g. a receive matched a message that was already there
                settle(future, self._outcome(request))
            else:
                self._add(request, functools.partial(settle, future), busy, keep)
        # A failure nobody waits for any more (its connection is being closed anyway) is not an
        # "exception never retrieved": callers that care await the future.
        future.add_done_callback(_retrieve)
        return future

    def watch(self, request: Any, keep: object, on_done: Callable[[Exception | None], None], *, busy: bool) -> None:
        """Call ``on_done`` on the loop once ``request`` completes: with ``None``, or with its UCX error.

        Lighter than :meth:`track` for receives that run one after another (no future, no task
        wake-up). ``on_done`` is never called from inside this method, so it may submit and watch
        the next request itself; it must not raise. Arguments as for :meth:`track`.
        """
        if self.threaded:
            future = self.track(request, keep, busy=busy)
            future.add_done_callback(lambda done: on_done(_error_of(done)))
        elif request.completed:
            self.loop.call_soon(on_done, self._outcome(request))
        else:
            self._add(request, on_done, busy, keep)

    def keep_until_done(self, request: Any, keep: object) -> None:
        """Keep ``keep`` alive until ``request`` completes, and report nothing (loop thread).

        For sends of host memory whose failure the endpoint's close callback reports (a failed
        request breaks its connection). In the ``blocking`` and ``polling`` modes a request that
        completed already costs nothing more; the thread modes track it as :meth:`track` does.

        Args:
            request: A submitted ``UCXRequest``.
            keep: The buffer the request reads.
        """
        if self.threaded:
            self.track(request, keep, busy=False)
        elif not request.completed:
            self._add(request, _ignore, False, keep)

    def watch_from_thread(
        self, request: Any, keep: object, on_done: Callable[[Exception | None], None], *, busy: bool
    ) -> None:
        """:meth:`watch` for a request submitted on another thread (call it from that thread).

        A request that already completed successfully is not reported: small sends usually leave
        at once, and then the loop is not woken. Any other outcome reaches ``on_done`` on the loop,
        as with :meth:`watch`. Once the worker is closed nothing is reported: closing fails the
        request's endpoint, whose owner reports that.
        """
        if not self.threaded and request.completed and self._outcome(request) is None:
            return
        self.call_on_loop(functools.partial(self.watch, request, keep, on_done, busy=busy))

    def _add(self, request: Any, on_done: Callable[[Exception | None], None], busy: bool, keep: object) -> None:
        self._pending.append((request, on_done, busy, keep))
        if busy:
            self._busy += 1
        self._kick()

    def reap_soon(self) -> None:
        """Report requests that finished without a wake-up event (loop thread; blocking modes).

        Closing an endpoint cancels its requests inside UCX's own progress, which raises no event:
        without this, their waiters would only hear of it at the worker's next event.
        """
        if not self.threaded:
            self._kick()

    def _kick(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._progress)

    def _progress(self) -> None:
        """Progress the worker, complete finished requests, then spin or re-arm (blocking modes)."""
        self._scheduled = False
        if self._closed:
            return
        self.worker.progress()
        if self._pending:
            self._reap()
        if self._busy or self.mode == "polling" or not self.worker.arm():
            self._kick()

    def _reap(self) -> None:
        """Report the finished requests to their callbacks."""
        still: list[tuple[Any, Callable[[Exception | None], None], bool, object]] = []
        done: list[tuple[Any, Callable[[Exception | None], None]]] = []
        for entry in self._pending:
            request, on_done, busy, _ = entry
            if not request.completed:
                still.append(entry)
                continue
            if busy:
                self._busy -= 1
            done.append((request, on_done))
        self._pending = still
        for request, on_done in done:
            try:
                on_done(self._outcome(request))
            except Exception:
                logger.exception("a UCX completion callback failed")

    @staticmethod
    def _outcome(request: Any) -> Exception | None:
        """A completed request's UCX error, or ``None``."""
        try:
            request.check_error()
        except Exception as exc:
            # Without the traceback: its frames would keep the request, and with it the UCX
            # endpoint (and listener), alive until a garbage collection.
            return exc.with_traceback(None)
        return None

    # -- the notifier thread (thread modes) ---------------------------------------------------

    def _notify(self) -> None:
        """Resolve the asyncio futures of completed requests on the loop (runs on its own thread)."""
        asyncio.set_event_loop(self.loop)  # futures ucxx creates here belong to the transport's loop
        ready = self.api.PythonRequestNotifierWaitState
        while not self._stop.is_set():
            self.worker.populate_python_futures_pool()
            state = self.worker.wait_request_notifier(period_ns=_NOTIFIER_PERIOD_NS)
            if state == ready.Shutdown:
                break
            if state != ready.Ready:
                continue
            done = threading.Event()
            try:
                self.loop.call_soon_threadsafe(self._run_notifier, done)
            except RuntimeError:  # the loop is closed
                break
            while not done.wait(0.1):
                if self._stop.is_set():
                    return

    def _run_notifier(self, done: threading.Event) -> None:
        try:
            self.worker.run_request_notifier()
        finally:
            done.set()

    # -- life cycle ---------------------------------------------------------------------------

    def call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop; safe from UCX's threads and callbacks. Dropped once closed."""
        if self._closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self.loop.call_soon_threadsafe(fn, *args)

    async def close(self) -> None:
        """Stop progress and release the worker and context. Idempotent; never raises.

        Close endpoints and drop the listener first: UCX finishes tearing them down in the last
        progress passes made here, then the worker (and with it the listening socket) is freed.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self.threaded:
                self._stop.set()
                self.worker.stop_request_notifier_thread()
                if self._notifier is not None:
                    await asyncio.to_thread(self._notifier.join, 5)
                self.worker.stop_progress_thread()
                self.worker.clear_python_futures_pool()
            else:
                if self._efd >= 0:
                    self.loop.remove_reader(self._efd)
                pending, self._pending = self._pending, []  # dropping a request cancels it; progress completes that
                for _, on_done, _, _ in pending:
                    with contextlib.suppress(Exception):
                        on_done(ConnectionError("the UCX worker is closing"))
                for _ in range(_FINAL_PROGRESS_PASSES):
                    self.worker.progress()
                    await asyncio.sleep(0.001)  # UCX's async thread handles socket events in between
        except Exception:
            logger.exception("stopping the UCX worker failed")
        self._inflight.clear()
        self.worker = None
        self._context = None
