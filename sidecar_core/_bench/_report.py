"""Writes a run's JSON and PNG and prints its summary table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sidecar_core._bench._options import format_size

SCHEMA = "sidecar-bench/1"


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write the report (see ``benchmarks/README.md`` for the schema)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def plot(path: Path, report: dict[str, Any]) -> bool:
    """Plot GB/s against size per peer (log-log), one panel per device pair; return whether it was written.

    Prints why to stderr and returns ``False`` when matplotlib is missing.
    """
    try:
        import matplotlib  # optional (dev extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sidecar bench: no plot: matplotlib is not installed (pip install 'sidecar[dev]')", file=sys.stderr)
        return False
    rows = [r for r in report["rows"] if r["kind"] == "throughput" and r["status"] == "ok"]
    pairs = sorted({(r["src_device"], r["dst_device"]) for r in rows}) or [("cpu", "cpu")]
    fig, axes = plt.subplots(1, len(pairs), figsize=(7 * len(pairs), 5), squeeze=False)
    baseline = report["settings"]["baseline"]
    for ax, (src, dst) in zip(axes[0], pairs, strict=True):
        peers = dict.fromkeys(r["peer"] for r in rows if (r["src_device"], r["dst_device"]) == (src, dst))
        for peer in peers:
            points = sorted(
                (r["size_bytes"], r["gbps"])
                for r in rows
                if (r["peer"], r["src_device"], r["dst_device"]) == (peer, src, dst)
            )
            style = "--" if peer == baseline else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=peer)
        sizes = sorted({r["size_bytes"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [format_size(s) for s in sizes])
        ax.set_xlabel("tensor size")
        ax.set_ylabel("GB/s (median, higher is better)")
        ax.set_title(f"{src} -> {dst}")
        ax.grid(True, which="both", alpha=0.3)
        if peers:
            ax.legend(fontsize="small")
    machine = report["machine"]
    load = machine.get("load_average")
    load_text = f", load {load[0]:g} at start" if load else ""
    fig.suptitle(
        f"sidecar bench, {machine['cpu_model']}, {machine['cpu_cores']} cores{load_text}, {machine['date'][:10]}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary(report: dict[str, Any]) -> str:
    """A plain-text table of every row."""
    lines = []
    baseline = report["settings"]["baseline"]
    lines.append(f"{'peer':<18} {'size':>7} {'src->dst':<14} {'GB/s':>9} {'x ' + baseline:>12}  status")
    for r in report["rows"]:
        if r["kind"] != "throughput":
            continue
        gbps = f"{r['gbps']:.3f}" if r["gbps"] is not None else "-"
        ratio = f"{r['ratio']:.3g}" if r["ratio"] is not None else "-"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        pair = f"{r['src_device']}->{r['dst_device']}"
        lines.append(f"{r['peer']:<18} {r['size']:>7} {pair:<14} {gbps:>9} {ratio:>12}  {status}")
    latency = [r for r in report["rows"] if r["kind"] == "latency"]
    if latency:
        lines.append("")
        lines.append(f"{'peer':<18} {'object':<8} {'p50 us':>9} {'p99 us':>9}  status")
        for r in latency:
            p50 = f"{r['p50_us']:.1f}" if r["p50_us"] is not None else "-"
            p99 = f"{r['p99_us']:.1f}" if r["p99_us"] is not None else "-"
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            lines.append(f"{r['peer']:<18} {r['object']:<8} {p50:>9} {p99:>9}  {status}")
    return "\n".join(lines)
