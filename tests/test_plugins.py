"""The plugin registry: lazy registration, broken and unavailable plugins, duplicate names."""

from __future__ import annotations

import enum
import logging
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from sidecar_core import (
    PluginError,
    PluginUnavailableError,
    Sidecar,
    SidecarConfig,
    Transport,
    TransportNotFoundError,
    build_registry,
    get_registry,
    hookimpl,
)
from sidecar_core._hooks import Register


def make_plugin(
    name: str,
    transports: dict[str, tuple[str, tuple[str, ...], str]] | None = None,
    serializers: dict[str, tuple[str, tuple[str, ...], str]] | None = None,
) -> types.ModuleType:
    """An in-process plugin module registering ``{name: (target, requires, install_hint)}``."""
    module = types.ModuleType(name)

    def register_all(register: Register, table: dict[str, tuple[str, tuple[str, ...], str]] | None) -> None:
        for entry, (target, requires, hint) in (table or {}).items():
            register(entry, target, requires=requires, install_hint=hint, description=f"{entry} from {name}")

    if transports is not None:

        @hookimpl
        def sidecar_register_transports(register: Register) -> None:
            register_all(register, transports)

        module.sidecar_register_transports = sidecar_register_transports  # type: ignore[attr-defined]
    if serializers is not None:

        @hookimpl
        def sidecar_register_serializers(register: Register) -> None:
            register_all(register, serializers)

        module.sidecar_register_serializers = sidecar_register_serializers  # type: ignore[attr-defined]
    return module


def test_importing_the_packages_imports_no_transport_ucxx_or_torch() -> None:
    """Listing plugins (``sidecar plugins``) must stay fast: no transport, no ucxx, not even torch."""
    code = textwrap.dedent(
        """
        import sys
        import sidecar_core, transports, serializers
        registry = sidecar_core.get_registry()
        assert {"localhost", "ucx", "mock-file"} <= set(registry.transports), registry.transports
        assert {"tensor", "chunked_tensor", "primitives", "json"} <= set(registry.serializers)
        loaded = sorted(m for m in sys.modules if m.startswith(("ucxx", "transports.", "serializers.", "torch")))
        assert loaded == [], loaded
        import torch
        assert not torch.cuda.is_initialized()
        print("lazy")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lazy"


def test_builtins_come_from_the_sidecar_distribution() -> None:
    registry = get_registry()
    for name in ("localhost", "ucx", "mock-file"):
        assert registry.transports[name].source.startswith("sidecar ")
        assert registry.transports[name].description
    assert registry.transports["ucx"].install_hint == "pip install 'sidecar[ucx]'"
    assert registry.broken == []


def write_distribution(root: Path, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    dist = root / "broken_sidecar_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-sidecar-plugin\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[sidecar]\n{lines}")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_broken_plugins_are_listed_and_break_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_distribution(
        tmp_path,
        {
            "missing": "sidecar_test_no_such_module",
            "raising": "sidecar_test_raising",
            "bad-hook": "sidecar_test_bad_hook",
            "buggy-hook": "sidecar_test_buggy_hook",
            "unmarked": "sidecar_test_unmarked",
            # The built-ins' entry-point name: names need only be unique within a distribution.
            "builtin-serializers": "sidecar_test_same_name",
        },
        {
            "sidecar_test_raising": "raise RuntimeError('plugin import exploded')\n",
            "sidecar_test_unmarked": """
                def sidecar_register_transports(register):  # no @hookimpl: pluggy never calls it
                    register("unmarked", "sidecar_test_unmarked:Nothing")
            """,
            "sidecar_test_buggy_hook": """
                from sidecar_core import hookimpl

                @hookimpl
                def sidecar_register_transports(register):
                    raise AttributeError("a bug in the plugin")
            """,
            "sidecar_test_same_name": """
                from sidecar_core import hookimpl

                @hookimpl
                def sidecar_register_transports(register):
                    register("same-name", "sidecar_test_same_name:Nothing", requires=("sidecar_test_absent.sub",))
            """,
            "sidecar_test_bad_hook": """
                from sidecar_core import hookimpl

                @hookimpl
                def sidecar_register_transports(register, unexpected):
                    register("never", "nowhere:Nothing")
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sidecar_core._plugins"):
        registry = build_registry()
    broken = {plugin.name: plugin for plugin in registry.broken}
    assert set(broken) == {"missing", "raising", "bad-hook", "buggy-hook", "unmarked"}
    assert "mark its sidecar_register_* functions with @sidecar_core.hookimpl" in broken["unmarked"].reason
    assert "registering its transports raised AttributeError('a bug in the plugin')" in broken["buggy-hook"].reason
    # Registered beside the built-ins of the same entry-point name; its requirement's parent
    # package is missing, which makes it unavailable rather than breaking the registry.
    assert registry.transports["same-name"].unavailable_reason() == "missing module sidecar_test_absent.sub"
    assert {plugin.source for plugin in broken.values()} == {"broken-sidecar-plugin 0.1"}
    assert "ModuleNotFoundError" in broken["missing"].reason
    assert "sidecar_test_no_such_module" in broken["missing"].reason
    assert "plugin import exploded" in broken["raising"].reason
    assert "invalid hook implementation" in broken["bad-hook"].reason
    assert "unexpected" in broken["bad-hook"].reason
    assert len([r for r in caplog.records if "broken-sidecar-plugin 0.1" in r.getMessage()]) == 5
    assert {"localhost", "ucx", "mock-file"} <= set(registry.transports)
    assert "never" not in registry.transports
    assert {"tensor", "json"} <= {s.NAME for s in registry.load_serializers()}
    # A transport that one of them would have registered is unknown: the error says why it may be.
    with pytest.raises(TransportNotFoundError) as info:
        registry.transport("theirs")
    assert "Plugin 'missing' from broken-sidecar-plugin 0.1 failed to load: ModuleNotFoundError" in str(info.value)


def test_transport_with_a_missing_requirement_is_unavailable_with_a_hint() -> None:
    plugin = make_plugin(
        "needs_plugin",
        transports={"needs-missing": ("sidecar_test_missing:Transport", ("sidecar_test_missing",), "pip install x")},
    )
    registry = build_registry(extra_plugins=(plugin,))
    entry = registry.transports["needs-missing"]
    assert entry.source == "in-process plugin needs_plugin"
    assert entry.unavailable_reason() == "missing module sidecar_test_missing; install it with: pip install x"
    with pytest.raises(PluginUnavailableError) as info:
        Sidecar(SidecarConfig(sidecar_rank=0, transport="needs-missing"), registry=registry)
    assert str(info.value) == (
        "transport 'needs-missing' from in-process plugin needs_plugin is unavailable: "
        "missing module sidecar_test_missing; install it with: pip install x"
    )
    assert isinstance(info.value, ImportError)
    assert registry.load_transport("mock-file").__name__ == "MockFileTransport"  # the rest still loads


def test_transport_whose_import_fails_or_is_no_transport() -> None:
    plugin = make_plugin(
        "odd_plugin",
        transports={
            "no-module": ("sidecar_test_absent_module:Thing", (), "pip install sidecar-absent"),
            "no-class": ("sidecar_core:NoSuchClass", (), ""),
            "not-a-transport": ("sidecar_core:Header", (), ""),
        },
    )
    registry = build_registry(extra_plugins=(plugin,))
    assert registry.transports["no-module"].unavailable_reason() is None  # no declared requirement
    with pytest.raises(PluginUnavailableError, match=r"failed to import sidecar_test_absent_module:Thing.*pip install"):
        registry.load_transport("no-module")
    with pytest.raises(PluginUnavailableError, match="NoSuchClass"):
        registry.load_transport("no-class")
    with pytest.raises(PluginError, match="sidecar_core:Header is not a Transport subclass"):
        registry.load_transport("not-a-transport")
    assert issubclass(registry.load_transport("mock-file"), Transport)


def test_unavailable_serializer_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    plugin = make_plugin(
        "ser_plugin", serializers={"needs-missing": ("sidecar_test_missing", ("sidecar_test_missing",), "")}
    )
    registry = build_registry(extra_plugins=(plugin,))
    with caplog.at_level(logging.WARNING, logger="sidecar_core._plugins"):
        names = [s.NAME for s in registry.load_serializers()]
    assert "needs-missing" not in names
    assert {"tensor", "chunked_tensor", "primitives", "json"} <= set(names)
    assert any("needs-missing" in r.getMessage() and "missing module" in r.getMessage() for r in caplog.records)


def test_a_serializer_named_otherwise_than_registered_is_a_plugin_error_saying_so() -> None:
    # Frames name their serializer by NAME; the error used to list nothing as missing.
    plugin = make_plugin("renamed_plugin", serializers={"not-json": ("serializers.json", (), "")})
    registry = build_registry(extra_plugins=(plugin,))
    with pytest.raises(PluginError, match="has NAME='json'; it must be the name it is registered under, 'not-json'"):
        registry.load_serializers()


def test_serializer_module_without_the_protocol_is_a_plugin_error() -> None:
    plugin = make_plugin("hollow_plugin", serializers={"hollow": ("sidecar_core._errors", (), "")})
    registry = build_registry(extra_plugins=(plugin,))
    with pytest.raises(
        PluginError, match=r"must define NAME='hollow'.*missing: NAME, PRIORITY, accepts, encode, decode"
    ):
        registry.load_serializers()


def test_a_serializer_whose_priority_is_not_a_number_is_a_plugin_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Serializers are sorted by PRIORITY: a str there broke every Sidecar() with a bare TypeError.
    module = types.ModuleType("sidecar_test_str_priority")
    module.NAME, module.PRIORITY = "str-priority", "5"  # type: ignore[attr-defined]
    module.accepts = module.encode = module.decode = print  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    plugin = make_plugin("priority_plugin", serializers={"str-priority": (module.__name__, (), "")})
    registry = build_registry(extra_plugins=(plugin,))
    with pytest.raises(PluginError, match=r"serializer 'str-priority' .* has PRIORITY='5'; it must be a number"):
        registry.load_serializers()
    for number in (15.0, enum.IntEnum("Order", "EARLY LATE").EARLY):  # numbers sort: they stay welcome
        monkeypatch.setattr(module, "PRIORITY", number)
        assert "str-priority" in [s.NAME for s in registry.load_serializers()]


def test_a_requirement_whose_package_fails_to_import_makes_only_its_plugin_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Finding "pkg.mod" imports pkg, which may raise anything: that plugin is unavailable, nothing else breaks.
    package = tmp_path / "sidecar_test_broken_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('the package is broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    target = "sidecar_test_broken_pkg.mod"
    plugin = make_plugin("broken_requirement", serializers={"needs-broken": (target, (target,), "")})
    registry = build_registry(extra_plugins=(plugin,))
    names = [s.NAME for s in registry.load_serializers()]
    assert "needs-broken" not in names
    assert {"tensor", "primitives", "json"} <= set(names)


def test_duplicate_names_name_both_sources() -> None:
    first = make_plugin("dup_first", transports={"twin": ("a:A", (), "")})
    second = make_plugin("dup_second", transports={"twin": ("b:B", (), "")})
    with pytest.raises(PluginError) as info:
        build_registry(extra_plugins=(first, second))
    message = str(info.value)
    assert "transport 'twin' is registered twice" in message
    assert "in-process plugin dup_first" in message
    assert "in-process plugin dup_second" in message
    assert "Uninstall one of these distributions" in message


def test_duplicate_of_a_builtin_names_the_distribution() -> None:
    shadow = make_plugin("shadow", serializers={"json": ("shadow_json", (), "")})
    with pytest.raises(
        PluginError, match=r"serializer 'json' is registered twice: by sidecar [\d.]+ and by in-process"
    ):
        build_registry(extra_plugins=(shadow,))


def test_invalid_in_process_plugins_are_plugin_errors() -> None:
    typo = types.ModuleType("typo")

    @hookimpl
    def sidecar_register_transport(register: Register) -> None:  # one letter short of the hook name
        raise AssertionError("never called")

    typo.sidecar_register_transport = sidecar_register_transport  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match="unknown hook 'sidecar_register_transport'"):
        build_registry(extra_plugins=(typo,))

    bad = types.ModuleType("bad_signature")

    @hookimpl
    def sidecar_on_send(id: str, colour: str) -> None:
        raise AssertionError("never called")

    bad.sidecar_on_send = sidecar_on_send  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match=r"(?s)invalid sidecar plugin.*colour"):
        build_registry(extra_plugins=(bad,))


def test_registry_lookup_errors() -> None:
    registry = get_registry()
    with pytest.raises(TransportNotFoundError, match="Did you mean 'mock-file'"):
        registry.transport("mockfile")
    assert get_registry() is registry  # one registry per process
