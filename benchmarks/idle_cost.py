"""What waiting costs the next message: one sidecar step timed hot, and again after the thread waited.

A sidecar process spends most of a round trip waiting for its peer. This times one step of the send
path (encoding an int into its frame, ``Codec.frames``) in one thread of one process, nothing else
running: back to back, then right after the thread slept or polled for a while. Where the figures
after a wait are several times the back-to-back one, every step of a message pays that on this
machine, which a tight-loop profile of the same code does not show::

    python benchmarks/idle_cost.py [SAMPLES]

Each figure is the median of ``SAMPLES`` timings (default 300).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from sidecar_core import Codec, get_registry

WAITS = (0.0001, 0.001, 0.01)


def poll(seconds: float) -> None:
    """Wait without sleeping: the CPU stays busy with this thread."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def median_us(step: Callable[[], object], wait: Callable[[float], None] | None, seconds: float, samples: int) -> float:
    """Median time of ``step`` in µs, each run right after ``wait(seconds)`` (none: back to back)."""
    times = []
    for _ in range(samples):
        if wait is not None:
            wait(seconds)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    codec = Codec(get_registry().load_serializers())

    def step() -> object:
        return codec.frames(7, id="idle", chunk_id=0, num_chunks=1, src=0, max_part_bytes=None)

    median_us(step, None, 0, 1000)  # warm up
    print(f"Codec.frames of an int, median of {samples}:")
    print(f"  back to back: {median_us(step, None, 0, samples):7.1f} µs")
    for name, wait in (("slept", time.sleep), ("polled", poll)):
        for seconds in WAITS:
            print(f"  after it {name} {seconds * 1e3:4g} ms: {median_us(step, wait, seconds, samples):7.1f} µs")


if __name__ == "__main__":
    main()
