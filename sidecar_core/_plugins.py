"""The plugin manager: loads the ``sidecar`` entry-point group and keeps the registry.

Built-in transports and serializers register through the same entry points as third-party ones.
Registration is lazy: an entry names an import target, which is imported only when first used,
so a plugin whose dependencies are missing is listed as unavailable and breaks nothing else.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal, cast

import pluggy

from sidecar_core._errors import PluginError, PluginUnavailableError, TransportNotFoundError
from sidecar_core._hooks import PROJECT, HookSpecs, Register
from sidecar_core._serializer import Serializer
from sidecar_core._transport import Transport

logger = logging.getLogger(__name__)

Kind = Literal["transport", "serializer"]


@dataclass(frozen=True, slots=True)
class PluginEntry:
    """One registered transport or serializer."""

    kind: Kind
    name: str
    target: str
    source: str
    requires: tuple[str, ...] = ()
    install_hint: str = ""
    description: str = ""

    def unavailable_reason(self) -> str | None:
        """Why the entry cannot be loaded here, or ``None`` if its requirements are importable."""
        missing = [mod for mod in self.requires if not _importable(mod)]
        if not missing:
            return None
        hint = f"; install it with: {self.install_hint}" if self.install_hint else ""
        return f"missing module {', '.join(missing)}{hint}"

    def load(self) -> Any:
        """Import the target and return it.

        Raises:
            PluginUnavailableError: A requirement is missing or the import failed.
        """
        reason = self.unavailable_reason()
        if reason is not None:
            raise PluginUnavailableError(f"{self.kind} {self.name!r} from {self.source} is unavailable: {reason}")
        module_name, _, attr = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
        except Exception as exc:
            hint = f"; try: {self.install_hint}" if self.install_hint else ""
            raise PluginUnavailableError(
                f"{self.kind} {self.name!r} from {self.source} failed to import {self.target}: {exc!r}{hint}"
            ) from exc
        return obj


@dataclass(frozen=True, slots=True)
class BrokenPlugin:
    """An entry point that could not be imported at all."""

    name: str
    source: str
    reason: str


@dataclass
class Registry:
    """Every transport and serializer the installed plugins register."""

    manager: pluggy.PluginManager
    transports: dict[str, PluginEntry] = field(default_factory=dict)
    serializers: dict[str, PluginEntry] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)

    def transport(self, name: str) -> PluginEntry:
        """Look up a transport by name.

        Raises:
            TransportNotFoundError: No such transport; the message lists the installed ones and the
                closest match.
        """
        try:
            return self.transports[name]
        except KeyError:
            known = sorted(self.transports)
            close = difflib.get_close_matches(name, known, n=1)
            guess = f" Did you mean {close[0]!r}?" if close else ""
            # A plugin that failed to load registered nothing: the transport may be its.
            broken = "".join(f" Plugin {b.name!r} from {b.source} failed to load: {b.reason}." for b in self.broken)
            raise TransportNotFoundError(
                f"unknown transport {name!r}.{guess} Installed transports: {', '.join(known) or 'none'} "
                f"(chosen with SIDECAR_TRANSPORT, SidecarConfig(transport=...) or a command's --transport).{broken}"
            ) from None

    def load_transport(self, name: str) -> type[Transport]:
        """Import and return the transport class registered as ``name``.

        Raises:
            TransportNotFoundError: No such transport.
            PluginUnavailableError: It is registered but cannot be imported here.
            PluginError: The target is not a :class:`Transport` subclass.
        """
        entry = self.transport(name)
        cls = entry.load()
        if not (isinstance(cls, type) and issubclass(cls, Transport)):
            raise PluginError(f"transport {name!r} from {entry.source}: {entry.target} is not a Transport subclass")
        return cls

    def load_serializers(self) -> list[Serializer]:
        """Import every available serializer, in priority order (unavailable ones are skipped).

        Raises:
            PluginError: A serializer module lacks one of the required names.
        """
        loaded: list[Serializer] = []
        for name in self.serializers:
            try:
                loaded.append(self.load_serializer(name))
            except PluginUnavailableError as exc:
                logger.warning("%s", exc)
        return sorted(loaded, key=lambda s: (s.PRIORITY, s.NAME))

    def load_serializer(self, name: str) -> Serializer:
        """Import and check the serializer module registered as ``name``.

        Raises:
            KeyError: No such serializer.
            PluginUnavailableError: It is registered but cannot be imported here.
            PluginError: The module lacks one of the required names.
        """
        entry = self.serializers[name]
        module = entry.load()
        missing = [n for n in ("NAME", "PRIORITY", "accepts", "encode", "decode") if not hasattr(module, n)]
        if missing:
            raise PluginError(
                f"serializer {entry.name!r} from {entry.source}: {entry.target} must define NAME="
                f"{entry.name!r}, PRIORITY, accepts, encode and decode (missing: {', '.join(missing)})"
            )
        if entry.name != module.NAME:  # frames name their serializer by NAME: the receiver looks it up by that
            raise PluginError(
                f"serializer {entry.name!r} from {entry.source}: {entry.target} has NAME={module.NAME!r}; it must be "
                f"the name it is registered under, {entry.name!r}"
            )
        priority = module.PRIORITY
        # Serializers are sorted by it: a str breaks every sidecar, a NaN sorts anywhere.
        if isinstance(priority, bool) or not isinstance(priority, int | float) or priority != priority:
            raise PluginError(
                f"serializer {entry.name!r} from {entry.source}: {entry.target} has PRIORITY={priority!r}; it must be "
                "a number (lower is tried first)"
            )
        return cast(Serializer, module)

    def _register(self, kind: Kind, source: str) -> Register:
        table = self.transports if kind == "transport" else self.serializers

        def register(
            name: str,
            target: str,
            *,
            requires: tuple[str, ...] = (),
            install_hint: str = "",
            description: str = "",
        ) -> None:
            if name in table:
                raise PluginError(
                    f"{kind} {name!r} is registered twice: by {table[name].source} and by {source}. "
                    "Uninstall one of these distributions."
                )
            table[name] = PluginEntry(kind, name, target, source, tuple(requires), install_hint, description)

        return register


def _source_of(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = entry_point.dist
    if dist is None:
        return entry_point.value
    return f"{dist.metadata['Name']} {dist.version}"


def build_registry(extra_plugins: tuple[ModuleType | object, ...] = ()) -> Registry:
    """Load every plugin of the ``sidecar`` entry-point group (plus ``extra_plugins``).

    Args:
        extra_plugins: Objects with hook implementations registered in-process (tests use this).

    Returns:
        A new registry.

    Raises:
        PluginError: Two plugins register the same name, or a hook implementation is invalid.
    """
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(HookSpecs)
    registry = Registry(manager)
    sources: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=PROJECT):
        source = _source_of(ep)
        try:
            plugin = ep.load()
        except Exception as exc:
            registry.broken.append(BrokenPlugin(ep.name, source, f"{exc!r}"))
            logger.warning("sidecar plugin %r from %s failed to load: %r", ep.name, source, exc)
            continue
        if manager.is_registered(plugin):
            continue
        # Entry-point names need only be unique within a distribution: two may share one.
        name = ep.name if not manager.has_plugin(ep.name) else f"{ep.name} ({source})"
        try:
            manager.register(plugin, name=name)
            _check_hook_names(manager, plugin)
        except pluggy.PluginValidationError as exc:
            if manager.is_registered(plugin):
                manager.unregister(plugin)
            registry.broken.append(BrokenPlugin(ep.name, source, f"invalid hook implementation: {exc}"))
            logger.warning("sidecar plugin %r from %s has an invalid hook implementation: %s", ep.name, source, exc)
            continue
        if not manager.get_hookcallers(plugin):  # its functions lack @hookimpl: pluggy sees nothing to call
            reason = "it implements no hook: mark its sidecar_register_* functions with @sidecar_core.hookimpl"
            registry.broken.append(BrokenPlugin(ep.name, source, reason))
            logger.warning("sidecar plugin %r from %s: %s", ep.name, source, reason)
        sources[name] = source
    for plugin in extra_plugins:
        try:
            registered = manager.register(plugin)
        except (pluggy.PluginValidationError, ValueError) as exc:  # ValueError: its name is taken
            raise PluginError(f"invalid sidecar plugin: {exc}") from None
        if registered is not None:
            sources[registered] = f"in-process plugin {registered}"
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"invalid sidecar plugin: {exc}") from None

    for hook, kind in (
        (manager.hook.sidecar_register_transports, "transport"),
        (manager.hook.sidecar_register_serializers, "serializer"),
    ):
        for impl in hook.get_hookimpls():
            source = sources.get(impl.plugin_name, impl.plugin_name)
            try:
                impl.function(register=registry._register(cast(Kind, kind), source))
            except PluginError:
                raise
            except Exception as exc:  # a bug in the plugin: it is broken, the others still load
                reason = f"registering its {kind}s raised {exc!r}"
                registry.broken.append(BrokenPlugin(impl.plugin_name, source, reason))
                logger.warning("sidecar plugin %r from %s: %s", impl.plugin_name, source, reason)
    return registry


def _importable(module: str) -> bool:
    """Whether ``module`` can be found (a dotted name whose parent package is missing cannot)."""
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # finding a submodule imports its package, which may raise anything
        return False


def _check_hook_names(manager: pluggy.PluginManager, plugin: object) -> None:
    """Refuse a plugin that implements a hook no spec defines (usually a misspelt name).

    Raises:
        pluggy.PluginValidationError: The plugin implements an unknown hook.
    """
    for attr in dir(plugin):
        if manager.parse_hookimpl_opts(plugin, attr) is not None and not hasattr(HookSpecs, attr):
            known = ", ".join(name for name in dir(HookSpecs) if name.startswith(f"{PROJECT}_"))
            raise pluggy.PluginValidationError(plugin, f"unknown hook {attr!r}; the hooks are: {known}")


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    return build_registry()
