"""Command-line options of ``sidecar bench`` and the measurement plan derived from them."""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sidecar_core._bench._peers import PEERS

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GIB": 1 << 30}
_SIZE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")

CPU_SIZES = "4KiB,1MiB,64MiB,512MiB"
CUDA_SIZES = "1MiB,64MiB,1GiB"
QUICK_SIZES = "4KiB,64KiB,1MiB"
#: Timed transfers per size are ``repeats`` for large sizes, up to 20x more for small ones (see ``transfers``).
_BYTES_PER_SIZE = 1 << 30


def parse_size(text: str) -> int:
    """Parse ``"4KiB"``, ``"64M"``, ``"1GiB"`` or ``"4096"`` into bytes.

    Raises:
        ValueError: The text is not a positive size with a known unit.
    """
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS or int(match.group(1)) <= 0:
        raise ValueError(
            f"bad size {text!r}: give a positive integer with an optional unit B, KiB, MiB or GiB (e.g. 64MiB)"
        )
    return int(match.group(1)) * _UNITS[unit]


def format_size(nbytes: int) -> str:
    """Format a byte count the way sizes are given on the command line (``64MiB``)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


@dataclass(frozen=True)
class Options:
    """What one run measures."""

    device: str
    sizes: list[int]
    repeats: int
    peers: list[str] | None
    out: Path
    round_trips: int
    gpus: list[int]
    timeout_scale: float

    def transfers(self, nbytes: int) -> tuple[int, int]:
        """Return ``(warm-up transfers, timed transfers)`` for one size.

        Large sizes get ``repeats`` timed transfers; smaller ones more, up to ``20 * repeats``, so
        that each size moves about 1 GiB (at least ``repeats`` transfers). One in five is warm-up.
        """
        timed = max(self.repeats, min(20 * self.repeats, _BYTES_PER_SIZE // nbytes))
        return max(1, timed // 5), timed


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _sizes(text: str) -> list[int]:
    try:
        return sorted({parse_size(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gpus(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --gpus {text!r}: give GPU indices such as 0 or 0,1") from None
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"bad --gpus {text!r}: give distinct GPU indices such as 0 or 0,1")
    return gpus


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sidecar bench`` (also used by ``benchmarks/run.py``)."""
    parser = argparse.ArgumentParser(
        prog="sidecar bench",
        description=(
            "Measure sidecar transports side by side with single-thread memcpy and the tools users pick "
            "today (raw TCP, pyzmq with pickle protocol 5, torch.multiprocessing queues, raw ucxx). "
            "Every peer runs in its own spawned processes; the peers take turns in rounds, so that a machine "
            "whose speed drifts slows them alike. Writes JSON and a PNG plot."
        ),
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help=f"comma-separated tensor sizes (default: {CPU_SIZES} on cpu, {CUDA_SIZES} on cuda)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help="timed transfers at the largest sizes; small sizes get more, up to 20x (default: 5, --quick: 1)",
    )
    parser.add_argument(
        "--peers",
        default=None,
        help=(
            f"comma-separated peers to measure, from: {', '.join(PEERS)} (default: all that run on the device; "
            "the baseline, memcpy or cuda-d2d, always runs)"
        ),
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="output folder (default: benchmarks/results)"
    )
    parser.add_argument(
        "--round-trips",
        type=_positive_int,
        default=None,
        help="timed round trips per small object for the latency rows (default: 1000, --quick: 50)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a fast check: sizes {QUICK_SIZES}, 1 repeat, 50 round trips (explicit options still win)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where tensors live (default: cpu)")
    parser.add_argument(
        "--gpus",
        type=_gpus,
        default=[0],
        help="cuda only: sender GPU first; one set of rows per GPU listed as receiver, e.g. 0,1 (default: 0)",
    )
    parser.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help="multiply the per-measurement timeouts (raise it on a slow machine; default: 1)",
    )
    return parser


def parse_options(argv: list[str] | None) -> Options:
    """Parse the command line into :class:`Options` (argparse exits with a message on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sizes: list[int] | None = args.sizes
    if sizes is None:
        sizes = _sizes(QUICK_SIZES if args.quick else CUDA_SIZES if args.device == "cuda" else CPU_SIZES)
    if not math.isfinite(args.timeout_scale) or args.timeout_scale <= 0:
        parser.error("--timeout-scale must be a positive, finite number")
    try:  # now, not after the run: a folder that cannot be written would lose the results
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {args.out}: {exc.strerror or exc}")
    if not os.access(args.out, os.W_OK):
        parser.error(f"--out {args.out}: the folder cannot be written to")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers else None
    return Options(
        device=args.device,
        sizes=sizes,
        repeats=args.repeats or (1 if args.quick else 5),
        peers=peers,
        out=args.out,
        round_trips=args.round_trips or (50 if args.quick else 1000),
        gpus=args.gpus,
        timeout_scale=args.timeout_scale,
    )
