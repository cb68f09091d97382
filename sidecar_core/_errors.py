"""Every error the sidecar raises.

Each error subclasses :class:`SidecarError` and the built-in exception it semantically is, so
``except TimeoutError`` and ``except SidecarError`` both work. Messages say what was wrong and how
to fix it.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base class of every error raised by the sidecar framework."""


class SettingsError(SidecarError, ValueError):
    """A setting (usually an environment variable) has a value that cannot be used.

    The message names the environment variable. Fix the variable's value, or unset it to get the
    default.
    """


class PluginError(SidecarError, RuntimeError):
    """A plugin is broken: it registered a name twice or registered something invalid.

    Uninstall one of the conflicting distributions, or rename what one of them registers.
    """


class TransportNotFoundError(SidecarError, LookupError):
    """No installed plugin registers the transport that was asked for.

    The message lists the installed transports. Fix ``SIDECAR_TRANSPORT`` or install the plugin.
    """


class PluginUnavailableError(SidecarError, ImportError):
    """A plugin is installed but cannot be loaded here (for example, ucxx is missing).

    The message gives the import error and an install hint.
    """


class SerializationError(SidecarError, TypeError):
    """No serializer accepts the object passed to ``send``.

    Send a tensor, a list or tuple of tensors, a JSON-compatible dict or list, or a primitive (None,
    bool, int, float, str, bytes); or install a serializer plugin for the type.
    """


class FrameError(SidecarError, ValueError):
    """A frame is malformed or inconsistent (sizes, dtype, shape, id), or too large to send.

    A frame that arrived is rejected and the sender's ``send`` future raises :class:`RemoteError`;
    the receiving sidecar keeps serving. This usually means mismatched sidecar versions or a peer
    that is not a sidecar. ``send`` raises it itself for an object whose frame header would exceed
    the receivers' limit: send fewer tensors per message, or less serializer metadata.
    """


class RemoteError(SidecarError, RuntimeError):
    """The destination sidecar refused a frame; the message carries the peer's reason."""


class CapacityError(SidecarError, MemoryError):
    """Accepting more data would exceed a memory bound (``SIDECAR_MAX_BUFFERED_BYTES`` or a pool).

    Call ``mark_done`` on chunks you no longer need, or raise the bound.
    """


class RecvTimeoutError(SidecarError, TimeoutError):
    """``recv`` waited longer than its timeout; the message names id, chunk, transport and rank."""


class SendTimeoutError(SidecarError, TimeoutError):
    """``send`` did not complete within ``SIDECAR_SEND_TIMEOUT``; the message names the peer."""


class PeerUnreachableError(SidecarError, ConnectionError):
    """A peer could not be connected to; the message names its rank and address.

    Check that the peer process is running, that ``SIDECAR_RANK`` and the peer addressing settings
    agree on both sides, and that no firewall is in the way.
    """


class PeerLostError(SidecarError, ConnectionError):
    """A peer's connection broke while data from or to it was still expected."""


class AuthenticationError(SidecarError, PermissionError):
    """A peer presented no auth token or the wrong one. Set the same ``SIDECAR_AUTH_TOKEN`` on both."""


class AlreadyDoneError(SidecarError, LookupError):
    """The chunk was already released with ``mark_done``; it cannot be received again."""


class UnknownKeyError(SidecarError, KeyError):
    """A peerless transport has no place for an ``(id, chunk_id)``: the key is not in its mapping.

    The message names the key and the setting that maps keys; add the key there.
    """

    def __str__(self) -> str:
        # KeyError would show the message quoted, as if it were the key itself.
        return str(self.args[0]) if self.args else ""


class DuplicateChunkError(SidecarError, ValueError):
    """A chunk arrived for an ``(id, chunk_id)`` that is already held or was marked done.

    Use a fresh id for every message (a uuid works), or ``mark_done`` before reusing one.
    """


class SidecarClosedError(SidecarError, RuntimeError):
    """The sidecar was shut down; create a new one."""
