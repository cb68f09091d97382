"""Raw ucxx and the sidecar ucx transport side by side, in one run.

Each (size, progress mode) pair runs raw ucxx and the transport alternately ``--repeats`` times
(fresh processes each time) and reports the median over all timed iterations::

    python benchmarks/ucx_probe.py --sizes 64MiB                      # host memory, CPU
    python benchmarks/ucx_probe.py --device cuda --sizes 1MiB,64MiB,1GiB
    python benchmarks/ucx_probe.py --device cuda --dst-device cuda:1  # GPU 0 -> GPU 1
    python benchmarks/ucx_probe.py --modes blocking,thread,polling    # compare progress modes

UCX reads its usual environment (``UCX_TLS`` ...), inherited by the child processes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transports.ucx._raw import Bandwidth, raw_ucxx_bandwidth, sidecar_ucx_bandwidth

_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(text: str) -> int:
    for unit, factor in _UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _median_gbps(nbytes: int, runs: list[Bandwidth]) -> float | None:
    seconds = [s for run in runs for s in run.seconds]
    return nbytes / statistics.median(seconds) / 1e9 if seconds else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64MiB", help="comma-separated sizes, e.g. 1MiB,64MiB,1GiB")
    parser.add_argument("--device", default="cpu", help="source device: cpu or cuda[:N]")
    parser.add_argument("--dst-device", default=None, help="destination device (default: same as --device)")
    parser.add_argument("--modes", default="blocking", help="comma-separated progress modes")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each peer")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    dst = args.dst_device or args.device
    rows = []
    print(f"# {platform.node()}: {args.device} -> {dst}; median of {args.repeats} alternating runs per peer")
    print(f"{'size':>8} {'mode':>14} {'iters':>6} {'raw ucxx GB/s':>14} {'sidecar GB/s':>13} {'ratio':>6}")
    for size_text in args.sizes.split(","):
        nbytes = parse_size(size_text)
        iterations = max(args.iterations, min(200, (2 << 30) // nbytes))
        for mode in args.modes.split(","):
            common = {
                "iterations": iterations,
                "warmup": args.warmup,
                "src_device": args.device,
                "dst_device": dst,
                "progress_mode": mode,
            }
            results: dict[str, list[Bandwidth]] = {"raw": [], "sidecar": []}
            errors = []
            for _ in range(args.repeats):
                for name, measure in (("raw", raw_ucxx_bandwidth), ("sidecar", sidecar_ucx_bandwidth)):
                    try:
                        results[name].append(measure(nbytes, **common))  # type: ignore[operator]
                    except Exception as exc:  # report and go on with the other rows
                        errors.append(f"{name}: {exc}")
            gbps = {name: _median_gbps(nbytes, runs) for name, runs in results.items()}
            ratio = gbps["sidecar"] / gbps["raw"] if gbps["raw"] and gbps["sidecar"] else float("nan")
            rows.append({"size": size_text, "bytes": nbytes, "mode": mode, "src": args.device, "dst": dst,
                         "iterations": iterations, "raw_ucxx_gbps": gbps["raw"], "sidecar_gbps": gbps["sidecar"],
                         "ratio": ratio, "errors": errors})  # fmt: skip
            print(
                f"{size_text:>8} {mode:>14} {iterations:>6} {gbps['raw'] or float('nan'):14.3f} "
                f"{gbps['sidecar'] or float('nan'):13.3f} {ratio:6.2f}",
                flush=True,
            )
            for error in errors:
                print(f"    error: {error}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
