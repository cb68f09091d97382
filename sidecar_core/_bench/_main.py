"""``sidecar bench``: the entry point."""

from __future__ import annotations

import datetime
import shlex
import sys
from typing import Any

from sidecar_core._bench._machine import machine_info
from sidecar_core._bench._options import Options, parse_options
from sidecar_core._bench._peers import baseline_for, select_peers
from sidecar_core._bench._report import SCHEMA, plot, summary, write_json
from sidecar_core._bench._runner import Progress, Runner, count_measurements

TIMING = (
    "throughput: one transfer is timed on the sender from its send call on a freshly made tensor (made "
    "before the clock starts) until it holds the receiver's acknowledgement, a small int sent over the "
    "same peer once the receiver holds the whole tensor on its device, has checked its first and last "
    "byte and has released it; gbps = size_bytes / median_s / 1e9. Ceilings time one copy_/copyto into "
    "a preallocated buffer in one process. latency: one round trip of a small object, echoed back by "
    "the receiver over the same peer."
)


def _cuda_problem(opts: Options) -> str | None:
    """Why ``--device cuda`` cannot run here, or ``None``."""
    import torch

    if not torch.cuda.is_available():
        return (
            f"--device cuda needs a CUDA device, but torch.cuda.is_available() is False here (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}); run on a GPU machine or drop --device cuda"
        )
    count = torch.cuda.device_count()
    missing = [g for g in opts.gpus if g >= count]
    if missing:
        return f"--gpus names GPU {missing[0]}, but this machine has {count} CUDA device(s) (indices 0 to {count - 1})"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 when every measurement ran, 1 when one failed, 2 on bad options.

    Args:
        argv: The arguments after ``sidecar bench`` (``None``: ``sys.argv[1:]``).
    """
    opts = parse_options(argv)
    try:
        peers = select_peers(opts.device, opts.peers)
    except ValueError as exc:
        print(f"sidecar bench: {exc}", file=sys.stderr)
        return 2
    if opts.device == "cuda":
        problem = _cuda_problem(opts)
        if problem is not None:
            print(f"sidecar bench: {problem}", file=sys.stderr)
            return 2
    started = datetime.datetime.now(datetime.UTC)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "machine": machine_info(opts.device, opts.gpus),
        "settings": {
            "command": shlex.join(["sidecar", "bench", *(sys.argv[1:] if argv is None else argv)]),
            "device": opts.device,
            "gpus": opts.gpus if opts.device == "cuda" else None,
            "sizes": opts.sizes,
            "repeats": opts.repeats,
            "round_trips": opts.round_trips,
            "peers": [p.name for p in peers],
            "baseline": baseline_for(opts.device),
            "timing": TIMING,
        },
        "rows": [],
    }
    progress = Progress(count_measurements(opts, peers))
    print(f"sidecar bench: {progress.total} measurements, peers: {', '.join(p.name for p in peers)}", file=sys.stderr)
    report["rows"] = Runner(opts, progress).run(peers)
    report["elapsed_s"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1)
    stem = opts.out / f"bench-{opts.device}-{started:%Y%m%d-%H%M%S}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    report["plot"] = png_path.name if plot(png_path, report) else None
    write_json(json_path, report)
    print(summary(report))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if report["plot"] else ""))
    failed = [r for r in report["rows"] if r["status"] == "failed"]
    skipped = [r for r in report["rows"] if r["status"] == "skipped"]
    if skipped:
        print(f"{len(skipped)} measurement(s) skipped (see the reasons above)", file=sys.stderr)
    if failed:
        print(f"{len(failed)} measurement(s) failed (see the errors above)", file=sys.stderr)
        return 1
    return 0
