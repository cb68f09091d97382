"""Hook specifications: what a plugin may implement.

A plugin is a module (or object) listed in the ``sidecar`` entry-point group whose functions are
decorated with :data:`hookimpl`. Registration hooks receive a ``register`` callback and must stay
cheap: they name an import target, they do not import it (``import sidecar_core`` must never import
ucxx or CUDA). Observability hooks are called on the sidecar's event-loop thread and must not block.
"""

from __future__ import annotations

from typing import Protocol

import pluggy

PROJECT = "sidecar"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callback a registration hook receives."""

    def __call__(
        self,
        name: str,
        target: str,
        *,
        requires: tuple[str, ...] = (),
        install_hint: str = "",
        description: str = "",
    ) -> None:
        """Register ``name`` as a lazily imported plugin.

        Args:
            name: The name users select it by (``SIDECAR_TRANSPORT=name``).
            target: ``"package.module:Class"`` for a transport, ``"package.module"`` for a
                serializer; imported only when first used.
            requires: Importable modules it needs; if one is missing the plugin is listed as
                unavailable instead of failing.
            install_hint: What to run to make it available (e.g. ``pip install 'sidecar[ucx]'``).
            description: One line shown by ``sidecar plugins``.

        Raises:
            PluginError: ``name`` is already registered (the message names both sources).
        """


class HookSpecs:
    """The hooks a sidecar plugin can implement."""

    @hookspec
    def sidecar_register_transports(self, register: Register) -> None:
        """Register transports by calling ``register(name, "module:Class", ...)``."""

    @hookspec
    def sidecar_register_serializers(self, register: Register) -> None:
        """Register serializers by calling ``register(name, "module", ...)``."""

    @hookspec
    def sidecar_on_send(
        self, id: str, chunk_id: int, dst_rank: int, nbytes: int, seconds: float, transport: str
    ) -> None:
        """Called when a destination has acknowledged a whole message."""

    @hookspec
    def sidecar_on_recv(self, id: str, chunk_id: int, src_rank: int, nbytes: int, transport: str) -> None:
        """Called when a whole message has arrived and was stored."""

    @hookspec
    def sidecar_on_error(self, operation: str, error: BaseException, transport: str) -> None:
        """Called when a send, receive or incoming frame fails (after the error is reported)."""
