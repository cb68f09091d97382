"""The ``sidecar`` command: ``plugins``, ``doctor``, ``demo`` and ``bench``.

Each subcommand prints a readable table, or JSON with ``--json``, and exits non-zero when something
it checks is broken.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from typing import Any

from sidecar_core._errors import PluginError, PluginUnavailableError, SidecarError
from sidecar_core._plugins import PluginEntry, Registry, build_registry
from sidecar_core._settings import MAX_RANK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sidecar`` command line and return its exit status."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.run(args, rest))
    except SidecarError as exc:
        print(f"sidecar {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="Inspect, check and try out sidecar.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list transports and serializers and whether they load here")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument("--load", action="store_true", help="import every plugin to prove it loads (slower)")
    plugins.set_defaults(run=_run_plugins)
    doctor = sub.add_parser("doctor", help="check settings, transport, shared memory, CUDA and peers")
    doctor.add_argument("--json", action="store_true", help="print JSON")
    doctor.add_argument(
        "--ranks",
        type=_ranks,
        default=None,
        help="comma-separated peer ranks to probe (default: the ranks of SIDECAR_PEERS)",
    )
    doctor.add_argument(
        "--load-ucx", action="store_true", help="import ucxx to prove it loads (done anyway with SIDECAR_TRANSPORT=ucx)"
    )
    doctor.set_defaults(run=_run_doctor)
    demo = sub.add_parser("demo", help="send a tensor, a dict and a stream between two processes")
    demo.add_argument("--transport", default=None, help="transport to use (default: SIDECAR_TRANSPORT)")
    demo.add_argument("--size-mib", type=int, default=64, help="size of the throughput tensor (default: 64)")
    demo.set_defaults(run=_run_demo)
    bench = sub.add_parser("bench", help="run the benchmarks (`sidecar bench --help` lists options)", add_help=False)
    bench.set_defaults(run=_run_bench)
    return parser


def _run_plugins(args: argparse.Namespace, rest: list[str]) -> int:
    report = plugin_report(build_registry(), args.load)
    # An entry point that does not load, or a plugin a sidecar would refuse, is a broken install; a
    # plugin that lacks an optional dependency here is not.
    status = 1 if report["broken"] or any(p["invalid"] for p in report["plugins"]) else 0
    if args.json:
        print(json.dumps(report, indent=2))
        return status
    rows = [
        [p["kind"], p["name"], p["source"], "yes" if p["available"] else f"no: {p['reason']}", p["description"]]
        for p in report["plugins"]
    ]
    print(table(["kind", "name", "from", "available", "description"], rows))
    for b in report["broken"]:
        print(f"\nbroken entry point {b['name']!r} from {b['source']}: {b['reason']}")
    return status


def _run_doctor(args: argparse.Namespace, rest: list[str]) -> int:
    from sidecar_core import _doctor

    report = _doctor.diagnose(build_registry(), ranks=args.ranks, load_ucx=args.load_ucx)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        settings = [[s.env, _value_text(s.value), s.source] for s in report.settings]
        checks = [[c.name, c.status.upper(), c.detail] for c in report.checks]
        verdict = "all required checks passed" if report.ok else "some required checks FAILED (see above)"
        print(f"{table(['setting', 'value', 'source'], settings)}\n\n{table(['check', 'status', 'detail'], checks)}")
        print(f"\n{verdict}")
    return 0 if report.ok else 1


def _value_text(value: object) -> str:
    if value is None:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value)


def _run_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from sidecar_core import _demo

    return _demo.main(transport=args.transport, size_mib=args.size_mib)


def _run_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from sidecar_core import _bench  # imported here: only `sidecar bench` needs it

    return _bench.main(rest)


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ranks like 0,1,2, got {text!r}") from None
    if any(not 0 <= rank <= MAX_RANK for rank in ranks):
        raise argparse.ArgumentTypeError(f"ranks must be from 0 to {MAX_RANK}, got {text!r:.100}")
    return ranks


def plugin_status(registry: Registry, entry: PluginEntry, load: bool) -> tuple[str | None, bool]:
    """Why ``entry`` cannot be used here (``None`` if it can), and whether it is invalid.

    Without ``load`` this checks that the plugin's requirements and module can be found, without
    importing them; with ``load`` it loads the plugin as a sidecar would. Invalid: it loads but is
    not what it must be (a transport not a ``Transport``, a serializer without the serializer names).
    """
    reason = entry.unavailable_reason()
    if reason is not None:
        return reason, False
    if load:
        try:
            if entry.kind == "transport":
                registry.load_transport(entry.name)
            else:
                registry.load_serializer(entry.name)
        except PluginUnavailableError as exc:
            return str(exc.__cause__ or exc), False
        except PluginError as exc:
            return str(exc), True
        return None, False
    module = entry.target.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception as exc:  # finding a submodule imports its package, which may raise anything
        return f"module {module} cannot be found: {exc!r}", False
    return (None if found else f"module {module} is not installed"), False


def plugin_report(registry: Registry, load: bool = False) -> dict[str, Any]:
    """Every registered plugin with its availability, and the entry points that failed to load."""
    entries = [*registry.transports.values(), *registry.serializers.values()]
    plugins = []
    for entry in entries:
        reason, invalid = plugin_status(registry, entry, load)
        plugins.append(
            {
                "kind": entry.kind,
                "name": entry.name,
                "source": entry.source,
                "target": entry.target,
                "available": reason is None,
                "reason": reason,
                "invalid": invalid,
                "description": entry.description,
            }
        )
    broken = [{"name": b.name, "source": b.source, "reason": b.reason} for b in registry.broken]
    return {"plugins": plugins, "broken": broken}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Format rows as a plain-text table with aligned columns."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
