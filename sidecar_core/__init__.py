"""sidecar: move tensors and small Python objects between the processes of an ML serving system.

Public API::

    from sidecar_core import Sidecar, SidecarConfig

    with Sidecar(SidecarConfig(sidecar_rank=0)) as sidecar:
        sidecar.send(torch.ones(4), id="req-1", dst_sidecar_ranks=[[1]]).result()

Transports and serializers are plugins (entry-point group ``sidecar``); see ``docs/``.
"""

from sidecar_core._client import SendFuture, Sidecar, SidecarConfig
from sidecar_core._codec import Codec
from sidecar_core._errors import (
    AlreadyDoneError,
    AuthenticationError,
    CapacityError,
    DuplicateChunkError,
    FrameError,
    PeerLostError,
    PeerUnreachableError,
    PluginError,
    PluginUnavailableError,
    RecvTimeoutError,
    RemoteError,
    SendTimeoutError,
    SerializationError,
    SettingsError,
    SidecarClosedError,
    SidecarError,
    TransportNotFoundError,
    UnknownKeyError,
)
from sidecar_core._frame import (
    PREFIX_BYTES,
    Buffer,
    Frame,
    Header,
    buffer_nbytes,
    buffer_tensor,
    check_sender,
    decode_header,
    encode_header,
    header_length,
)
from sidecar_core._hooks import Register, hookimpl, hookspec
from sidecar_core._plugins import PluginEntry, Registry, build_registry, get_registry
from sidecar_core._serializer import Encoded, Serializer
from sidecar_core._settings import SidecarSettings, load_settings
from sidecar_core._transport import ArrivingParts, Inbox, PartRoutes, Transport, TransportContext, settle

__version__ = "0.1.0"

__all__ = [
    "PREFIX_BYTES",
    "AlreadyDoneError",
    "ArrivingParts",
    "AuthenticationError",
    "Buffer",
    "CapacityError",
    "Codec",
    "DuplicateChunkError",
    "Encoded",
    "Frame",
    "FrameError",
    "Header",
    "Inbox",
    "PartRoutes",
    "PeerLostError",
    "PeerUnreachableError",
    "PluginEntry",
    "PluginError",
    "PluginUnavailableError",
    "RecvTimeoutError",
    "Register",
    "Registry",
    "RemoteError",
    "SendFuture",
    "SendTimeoutError",
    "SerializationError",
    "Serializer",
    "SettingsError",
    "Sidecar",
    "SidecarClosedError",
    "SidecarConfig",
    "SidecarError",
    "SidecarSettings",
    "Transport",
    "TransportContext",
    "TransportNotFoundError",
    "UnknownKeyError",
    "__version__",
    "buffer_nbytes",
    "buffer_tensor",
    "build_registry",
    "check_sender",
    "decode_header",
    "encode_header",
    "get_registry",
    "header_length",
    "hookimpl",
    "hookspec",
    "load_settings",
    "settle",
]
