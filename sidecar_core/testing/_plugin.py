"""The pytest plugin: transport parametrization, deployments, GPU skips and the strict switch.

Enable it with ``pytest -p sidecar_core.testing`` or ``pytest_plugins = ["sidecar_core.testing"]``
in a top-level ``conftest.py``.

* ``sidecar_transport`` is parametrized over the installed transports (the plugin registry), so
  installing a transport plugin adds it to the run. ``--sidecar-transports=a,b`` or
  ``SIDECAR_TEST_TRANSPORTS=a,b`` restricts the run; a test class or module may restrict itself
  with a ``sidecar_transports = ("name", ...)`` attribute. Transports whose requirements are
  missing are skipped with the reason; tests marked ``sidecar_needs_peer`` are not generated for
  peerless transports.
* ``sidecar_deployment`` is a :class:`~sidecar_core.testing.Deployment` of that transport, shared by
  the tests of one module.
* Tests marked ``gpu`` are skipped with the reason "no CUDA device" where CUDA is absent.
* ``SIDECAR_TEST_STRICT=1`` turns the skip of a test that exercises a built-in transport into a
  failure (``gpu`` tests skipped for lack of a CUDA device, and ``host_capability`` tests skipped
  for want of root or network namespaces, excepted), and so does a test module skipped whole.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from sidecar_core._errors import PluginError, PluginUnavailableError
from sidecar_core._plugins import get_registry
from sidecar_core.testing._deployment import BUILTIN_TRANSPORTS, Deployment

SELECT_ENV = "SIDECAR_TEST_TRANSPORTS"
STRICT_ENV = "SIDECAR_TEST_STRICT"
NO_CUDA = "no CUDA device"
NEEDS_PEER = "sidecar_needs_peer"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--sidecar-transports``."""
    parser.getgroup("sidecar").addoption(
        "--sidecar-transports",
        default=None,
        metavar="NAMES",
        help=f"comma-separated transports for the conformance suite (default: ${SELECT_ENV}, else all installed)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Declare the plugin's markers."""
    config.addinivalue_line("markers", f"{NEEDS_PEER}: needs a live peer; not generated for peerless transports")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped with the reason where none is present)")
    config.addinivalue_line("markers", "transport(name): exercises this transport (strict mode fails its skips)")
    config.addinivalue_line(
        "markers",
        "host_capability: needs something of the host no package provides, such as root or network namespaces "
        "(its skip stands in strict mode, with the reason)",
    )


def _split(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def selected_transports(config: pytest.Config) -> list[str] | None:
    """The names chosen with ``--sidecar-transports`` or ``SIDECAR_TEST_TRANSPORTS`` (``None``: all)."""
    option = config.getoption("sidecar_transports", default=None)
    value = option if option is not None else os.environ.get(SELECT_ENV)
    return None if value is None else _split(str(value))


def strict(config: pytest.Config) -> bool:
    """Whether ``SIDECAR_TEST_STRICT`` is on."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Show which transports the conformance suite can run against."""
    registry = get_registry()
    parts = []
    for name, entry in registry.transports.items():
        reason = entry.unavailable_reason()
        parts.append(name if reason is None else f"{name} (unavailable: {reason})")
    chosen = selected_transports(config)
    lines = [f"sidecar transports: {', '.join(parts) or 'none'}"]
    if chosen is not None:
        lines.append(f"sidecar transports selected: {', '.join(chosen) or 'none'}")
    if strict(config):
        lines.append(f"sidecar strict mode ({STRICT_ENV}=1): skips of built-in transports fail")
    return lines


def _directly_parametrized(metafunc: pytest.Metafunc) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = _split(names)
        if "sidecar_transport" in names:
            return True
    return False


def _transport_params(metafunc: pytest.Metafunc) -> list[Any]:
    registry = get_registry()
    installed = list(registry.transports)
    chosen = selected_transports(metafunc.config)
    restricted = getattr(metafunc.cls, "sidecar_transports", None) or getattr(
        metafunc.module, "sidecar_transports", None
    )
    for label, names in (("--sidecar-transports / " + SELECT_ENV, chosen), ("sidecar_transports", restricted)):
        unknown = [name for name in names or () if name not in registry.transports]
        if unknown:
            pytest.fail(
                f"{label} names transports that are not installed: {', '.join(unknown)}; "
                f"installed: {', '.join(installed) or 'none'}",
                pytrace=False,
            )
    names = [n for n in installed if (chosen is None or n in chosen) and (restricted is None or n in restricted)]
    needs_peer = metafunc.definition.get_closest_marker(NEEDS_PEER) is not None
    params: list[Any] = []
    for name in names:
        reason = registry.transports[name].unavailable_reason()
        if reason is not None:
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"{name} unavailable: {reason}")))
            continue
        if needs_peer:
            try:
                if registry.load_transport(name).peerless:
                    continue  # not generated: the test has no meaning without a live peer
            except (PluginError, PluginUnavailableError):
                pass  # generated anyway: the fixture reports the import error
        params.append(pytest.param(name, id=name))
    if not params:
        if names:
            why = f"needs a live peer, and the selected transports ({', '.join(names)}) are peerless"
        else:
            why = (
                f"no transport to run against: selected {chosen or 'all'}, restricted to {restricted or 'all'}, "
                f"installed {installed or 'none'}"
            )
        params.append(pytest.param(None, id="none", marks=pytest.mark.skip(reason=why)))
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``sidecar_transport`` over the selected, installed transports."""
    if "sidecar_transport" not in metafunc.fixturenames or _directly_parametrized(metafunc):
        return
    metafunc.parametrize("sidecar_transport", _transport_params(metafunc), indirect=True, scope="module")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is present."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=NO_CUDA))


def _builtin_transport_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    names = [marker.args[0] for marker in item.iter_markers("transport") if marker.args]
    if callspec is not None:
        names += [value for key, value in callspec.params.items() if "transport" in key and isinstance(value, str)]
    return next((name for name in names if name in BUILTIN_TRANSPORTS), None)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under ``SIDECAR_TEST_STRICT=1``, fail skips of tests that exercise a built-in transport."""
    report: pytest.TestReport = yield
    if not report.skipped or hasattr(report, "wasxfail") or not strict(item.config):
        return report
    transport = _builtin_transport_of(item)
    reason = _skip_reason(report)
    if transport is None or (item.get_closest_marker("gpu") is not None and NO_CUDA in reason):
        return report
    if item.get_closest_marker("host_capability") is not None:
        return report
    report.outcome = "failed"
    report.longrepr = (
        f"{STRICT_ENV}=1: this test of the built-in transport {transport!r} was skipped ({reason}). "
        "Built-in transports must run in strict mode: install what the reason names, or unset "
        f"{STRICT_ENV} for a local run."
    )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Under ``SIDECAR_TEST_STRICT=1``, fail a test module skipped whole while it was collected.

    A module-level skip (``pytest.importorskip`` of a transport's library, say) hides every test
    in it before any could be seen as a test of a built-in transport.
    """
    report: pytest.CollectReport = yield
    if report.skipped and isinstance(collector, pytest.Module) and strict(collector.config):
        report.outcome = "failed"
        report.longrepr = (
            f"{STRICT_ENV}=1: the module {collector.nodeid} was skipped whole ({_skip_reason(report)}). "
            f"Install what the reason names, or unset {STRICT_ENV} for a local run."
        )
    return report


@pytest.fixture(scope="module")
def sidecar_transport(request: pytest.FixtureRequest) -> str:
    """The name of the transport under test (parametrized by this plugin)."""
    name = getattr(request, "param", None)
    if not isinstance(name, str):
        pytest.fail(
            "sidecar_transport is parametrized by the sidecar_core.testing plugin; enable it with "
            "'pytest -p sidecar_core.testing' or pytest_plugins = ['sidecar_core.testing']",
            pytrace=False,
        )
    reason = get_registry().transport(name).unavailable_reason()
    if reason is not None:
        pytest.skip(f"{name} unavailable: {reason}")
    return name


@pytest.fixture(scope="module")
def sidecar_deployment(sidecar_transport: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A :class:`Deployment` of the transport under test: rank 0 here, peers started on first use."""
    deployment = Deployment(sidecar_transport, tmp_path_factory.mktemp(f"sidecar-{sidecar_transport}"))
    try:
        yield deployment
    finally:
        deployment.close()


def plugin_active(config: pytest.Config) -> bool:
    """Whether this plugin is registered in ``config``."""
    module = sys.modules.get(__name__)
    return module is not None and config.pluginmanager.is_registered(module)
