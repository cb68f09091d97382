"""Runs the peers, each in its own worker processes, in alternating rounds, and turns timings into rows.

Machines drift: a shared or throttled machine can run 1.5 times slower a minute later. Measuring the
peers one after another would fold that drift into their ratios. So every peer's workers stay up
for the whole run, and each measurement (a size, or a small object) is cut into rounds: round 1 of
every peer, then round 2 of every peer, and so on. A drift then slows every peer alike. Only one
peer moves data at any moment; the others wait, idle, for their next command.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy

from sidecar_core._bench._endpoint import SMALL_OBJECTS
from sidecar_core._bench._options import Options, format_size
from sidecar_core._bench._peers import PeerSpec, baseline_for
from sidecar_core._bench._worker import Worker, WorkerError, gather

_START_TIMEOUT = 120.0
_SLOWEST_BYTES_PER_S = 25e6
_SLOWEST_ROUND_TRIP_S = 0.01
#: How many rounds a measurement is cut into (fewer when it has fewer timed transfers).
ROUNDS = 4

Row = dict[str, Any]


def split_rounds(warmup: int, count: int) -> list[tuple[int, int]]:
    """``(warm-up, timed)`` per round for a measurement of ``warmup`` + ``count`` transfers or round trips.

    The timed ones are spread evenly over at most :data:`ROUNDS` rounds. The first round has the whole
    warm-up (connections, pools and page faults settle); each later round re-warms with a quarter of
    it, at least one, since another peer ran in between.
    """
    rounds = max(1, min(ROUNDS, count))
    base, extra = divmod(count, rounds)
    rewarm = max(1, warmup // ROUNDS)
    return [(warmup if i == 0 else rewarm, base + (1 if i < extra else 0)) for i in range(rounds)]


@dataclass
class _Tally:
    """What the rounds of one peer's measurement added up to."""

    warmup: int = 0
    seconds: list[float] = field(default_factory=list)
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)  # key -> role -> bytes
    error: WorkerError | None = None

    def add(self, warmup: int, results: list[dict[str, Any]], roles: list[str]) -> None:
        self.warmup += warmup
        self.seconds.extend(results[0]["seconds"])
        for key in ("peak_rss_bytes", "peak_cuda_bytes"):
            for role, result in zip(roles, results, strict=True):
                if result[key] is not None:
                    held = self.peaks.setdefault(key, {})
                    held[role] = max(held.get(role, 0), result[key])


class Progress:
    """Prints one line per measurement to stderr: ``[ 3/31  12s] peer  what  result``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.start = time.monotonic()

    def line(self, peer: str, what: str, result: str) -> None:
        """Print the next measurement's line (with the seconds since the run started)."""
        self.done += 1
        width = len(str(self.total))
        elapsed = time.monotonic() - self.start
        print(
            f"[{self.done:>{width}}/{self.total} {elapsed:4.0f}s] {peer:<18} {what:<22} {result}",
            file=sys.stderr,
            flush=True,
        )

    def note(self, text: str) -> None:
        """Print a line that is not a measurement (a failure's details)."""
        print("    " + text.replace("\n", "\n    "), file=sys.stderr, flush=True)


def count_measurements(opts: Options, peers: list[PeerSpec]) -> int:
    """How many progress lines a run prints."""
    pairs = len(device_pairs(opts))
    per_peer = len(opts.sizes)
    latency = len(SMALL_OBJECTS) if opts.device == "cpu" else 0
    return sum(pairs * per_peer + (0 if p.is_ceiling else latency) for p in peers)


def device_pairs(opts: Options) -> list[tuple[str, str]]:
    """``(sender device, receiver device)`` pairs: cpu→cpu, or GPU ``gpus[0]`` to each GPU listed."""
    if opts.device == "cpu":
        return [("cpu", "cpu")]
    return [(f"cuda:{opts.gpus[0]}", f"cuda:{g}") for g in opts.gpus]


class _Pair:
    """The worker processes of one peer (sender and receiver, or one for a ceiling), started on demand."""

    def __init__(self, spec: PeerSpec, workdir: Path, src: str, dst: str, scale: float) -> None:
        self.spec, self.workdir, self.src, self.dst, self.scale = spec, workdir, src, dst, scale
        self.workers: list[Worker] = []
        self.start_error: WorkerError | None = None

    def get(self) -> list[Worker]:
        """The running workers, started (with a fresh setup) if there are none.

        Raises:
            WorkerError: The workers could not start (then every later call raises the same error).
        """
        if self.workers:
            return self.workers
        if self.start_error is not None:
            raise WorkerError(f"not run: {self.start_error}")
        try:
            return self._start()
        except WorkerError as exc:
            self.start_error = exc
            self.kill()
            raise

    def _start(self) -> list[Worker]:
        try:
            setup = self.spec.setup(self.workdir)
        except Exception as exc:
            raise WorkerError(f"{self.spec.name}: setup failed: {exc!r}") from exc
        env = {**self.spec.env, **setup.get("env", {})}
        if self.spec.is_ceiling:
            self.workers = [Worker(self.spec.name, "solo", setup, self.src, env)]
            gather(self.workers, _START_TIMEOUT * self.scale)
            return self.workers
        self.workers = [
            Worker(self.spec.name, "send", setup, self.src, env),
            Worker(self.spec.name, "recv", setup, self.dst, env),
        ]
        _, address = gather(self.workers, _START_TIMEOUT * self.scale)
        self.workers[1].submit(("connect", {}))
        self.workers[0].submit(("connect", address))
        gather(self.workers, _START_TIMEOUT * self.scale)
        return self.workers

    def run(self, command: tuple[Any, ...], timeout: float) -> list[dict[str, Any]]:
        """Run a command on every worker (receiver first); restart the workers next time if it fails."""
        try:
            workers = self.get()
            for worker in reversed(workers):
                worker.submit(command)
            return gather(workers, timeout * self.scale)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.workers = []

    def close(self) -> None:
        for worker in self.workers:
            worker.request_exit()
        for worker in self.workers:
            worker.close()
        self.workers = []


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.0f}"


class Runner:
    """Measures peers for one run and collects the rows."""

    def __init__(self, opts: Options, progress: Progress) -> None:
        self.opts = opts
        self.progress = progress
        self.rows: list[Row] = []
        self.baseline = baseline_for(opts.device)

    def run(self, peers: list[PeerSpec]) -> list[Row]:
        """Measure every peer on every device pair, in alternating rounds (see the module docstring)."""
        order = {spec.name: i for i, spec in enumerate(peers)}
        objects = list(SMALL_OBJECTS)
        for src, dst in device_pairs(self.opts):
            first = len(self.rows)
            self._run_pair(peers, src, dst)
            self.rows[first:] = sorted(
                self.rows[first:],
                key=lambda r: (
                    order[r["peer"]],
                    r["kind"] != "throughput",
                    r["size_bytes"] if r["kind"] == "throughput" else objects.index(r["object"]),
                ),
            )
        return self.rows

    def _baseline_gbps(self, src: str, dst: str, nbytes: int) -> float | None:
        for row in self.rows:
            if (row["kind"], row["peer"], row["src_device"], row["dst_device"], row["size_bytes"]) == (
                "throughput",
                self.baseline,
                src,
                dst,
                nbytes,
            ) and row["status"] == "ok":
                return float(row["gbps"])
        return None

    def _run_pair(self, peers: list[PeerSpec], src: str, dst: str) -> None:
        live: list[PeerSpec] = []
        for spec in peers:
            reason = spec.unavailable_reason()
            if reason is None:
                live.append(spec)
            else:
                self._skip_all(spec, src, dst, reason)
        # The baseline's rows come first in each round's results, so every ratio has its denominator.
        live.sort(key=lambda spec: spec.name != self.baseline)
        with contextlib.ExitStack() as stack:
            pairs: dict[str, _Pair] = {}
            for spec in live:
                workdir = stack.enter_context(_workdir(spec.name))
                pairs[spec.name] = _Pair(spec, workdir, src, dst, self.opts.timeout_scale)
                stack.callback(pairs[spec.name].close)
            for nbytes in self.opts.sizes:
                self._throughput(pairs, live, src, dst, nbytes)
            if self.opts.device == "cpu":
                for name in SMALL_OBJECTS:
                    self._latency(pairs, [spec for spec in live if not spec.is_ceiling], name)

    def _skip_all(self, spec: PeerSpec, src: str, dst: str, reason: str) -> None:
        for nbytes in self.opts.sizes:
            self.rows.append(self._throughput_row(spec, src, dst, nbytes, 0, 0, status="skipped", reason=reason))
            self.progress.line(spec.name, self._what(nbytes, src, dst), f"SKIPPED: {reason}")
        if not spec.is_ceiling and self.opts.device == "cpu":
            for name in SMALL_OBJECTS:
                self.rows.append(self._latency_row(spec, name, 0, 0, status="skipped", reason=reason))
                self.progress.line(spec.name, f"latency {name}", f"SKIPPED: {reason}")

    def _what(self, nbytes: int, src: str, dst: str) -> str:
        return f"{format_size(nbytes)} {src}->{dst}" if self.opts.device == "cuda" else format_size(nbytes)

    def _throughput_row(
        self, spec: PeerSpec, src: str, dst: str, nbytes: int, warmup: int, count: int, **fields: Any
    ) -> Row:
        row: Row = {
            "kind": "throughput",
            "peer": spec.name,
            "src_device": src,
            "dst_device": dst,
            "size_bytes": nbytes,
            "size": format_size(nbytes),
            "warmup": warmup,
            "transfers": count,
            "seconds": None,
            "median_s": None,
            "gbps": None,
            "baseline": self.baseline,
            "ratio": None,
            "peak_rss_bytes": None,
            "peak_cuda_bytes": None,
            "status": "ok",
            "reason": None,
        }
        row.update(fields)
        return row

    def _throughput(self, pairs: dict[str, _Pair], specs: list[PeerSpec], src: str, dst: str, nbytes: int) -> None:
        warmup, count = self.opts.transfers(nbytes)
        what = self._what(nbytes, src, dst)

        def command(spec: PeerSpec, warm: int, timed: int) -> tuple[Any, ...]:
            ceiling = (src, dst) if spec.is_ceiling else ()
            return ("throughput", nbytes, warm, timed, *ceiling)

        def timeout(warm: int, timed: int) -> float:
            return 60 + (warm + timed) * nbytes / _SLOWEST_BYTES_PER_S

        tallies = self._rounds(pairs, specs, split_rounds(warmup, count), command, timeout, what)
        for spec in specs:
            self._throughput_done(spec, src, dst, nbytes, tallies[spec.name], count)

    def _rounds(
        self,
        pairs: dict[str, _Pair],
        specs: list[PeerSpec],
        plan: list[tuple[int, int]],
        command: Callable[[PeerSpec, int, int], tuple[Any, ...]],
        timeout: Callable[[int, int], float],
        what: str,
    ) -> dict[str, _Tally]:
        """Run one measurement's rounds, every peer in turn in each; a peer that fails sits out the rest."""
        tallies = {spec.name: _Tally() for spec in specs}
        for number, (warm, timed) in enumerate(plan, 1):
            if len(plan) > 1:
                self.progress.note(f"{what}: round {number} of {len(plan)}")
            for spec in specs:
                tally = tallies[spec.name]
                if tally.error is not None:
                    continue
                roles = ["solo"] if spec.is_ceiling else ["send", "recv"]
                try:
                    tally.add(warm, pairs[spec.name].run(command(spec, warm, timed), timeout(warm, timed)), roles)
                except WorkerError as exc:
                    tally.error = exc
        return tallies

    def _throughput_done(self, spec: PeerSpec, src: str, dst: str, nbytes: int, tally: _Tally, count: int) -> None:
        what = self._what(nbytes, src, dst)
        if tally.error is not None:
            self.rows.append(
                self._throughput_row(
                    spec, src, dst, nbytes, tally.warmup, count, status="failed", reason=str(tally.error)
                )
            )
            self.progress.line(spec.name, what, f"FAILED: {tally.error}")
            if tally.error.detail:
                self.progress.note(tally.error.detail.strip())
            return
        median = statistics.median(tally.seconds)
        gbps = nbytes / median / 1e9
        base = gbps if spec.name == self.baseline else self._baseline_gbps(src, dst, nbytes)
        ratio = gbps / base if base else None
        rss = tally.peaks.get("peak_rss_bytes")
        self.rows.append(
            self._throughput_row(
                spec,
                src,
                dst,
                nbytes,
                tally.warmup,
                count,
                seconds=tally.seconds,
                median_s=median,
                gbps=gbps,
                ratio=ratio,
                peak_rss_bytes=rss,
                peak_cuda_bytes=tally.peaks.get("peak_cuda_bytes"),
            )
        )
        ratio_text = f" ({ratio:.3g}x {self.baseline})" if ratio is not None else ""
        rss_text = " ".join(f"{role} {_mib(v)}" for role, v in (rss or {}).items())
        self.progress.line(spec.name, what, f"{gbps:8.3f} GB/s{ratio_text}  x{count}  peak RSS MiB: {rss_text}")

    def _latency_row(self, spec: PeerSpec, name: str, warmup: int, count: int, **fields: Any) -> Row:
        row: Row = {
            "kind": "latency",
            "peer": spec.name,
            "object": name,
            "warmup": warmup,
            "round_trips": count,
            "p50_us": None,
            "p99_us": None,
            "mean_us": None,
            "peak_rss_bytes": None,
            "status": "ok",
            "reason": None,
        }
        row.update(fields)
        return row

    def _latency(self, pairs: dict[str, _Pair], specs: list[PeerSpec], name: str) -> None:
        count = self.opts.round_trips
        tallies = self._rounds(
            pairs,
            specs,
            split_rounds(max(5, count // 10), count),
            lambda spec, warm, timed: ("latency", name, warm, timed),
            lambda warm, timed: 60 + (warm + timed) * _SLOWEST_ROUND_TRIP_S,
            f"latency {name}",
        )
        for spec in specs:
            self._latency_done(spec, name, tallies[spec.name], count)

    def _latency_done(self, spec: PeerSpec, name: str, tally: _Tally, count: int) -> None:
        if tally.error is not None:
            self.rows.append(
                self._latency_row(spec, name, tally.warmup, count, status="failed", reason=str(tally.error))
            )
            self.progress.line(spec.name, f"latency {name}", f"FAILED: {tally.error}")
            if tally.error.detail:
                self.progress.note(tally.error.detail.strip())
            return
        micros = [s * 1e6 for s in tally.seconds]
        p50, p99 = (float(p) for p in numpy.percentile(micros, [50, 99]))
        self.rows.append(
            self._latency_row(
                spec,
                name,
                tally.warmup,
                count,
                p50_us=p50,
                p99_us=p99,
                mean_us=statistics.fmean(micros),
                peak_rss_bytes=tally.peaks.get("peak_rss_bytes"),
            )
        )
        self.progress.line(spec.name, f"latency {name}", f"p50 {p50:8.1f} us  p99 {p99:8.1f} us  x{count}")


@contextmanager
def _workdir(peer: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"sidecar-bench-{peer}-") as path:
        yield Path(path)
