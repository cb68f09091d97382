"""The peers a run can measure: the ceilings, the sidecar transports and the tools users pick today."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar_core._plugins import get_registry
from sidecar_core._settings import load_settings

Setup = Callable[[Path], dict[str, Any]]


def _no_setup(workdir: Path) -> dict[str, Any]:
    return {"dir": str(workdir)}


@dataclass(frozen=True)
class PeerSpec:
    """How to measure one peer.

    Attributes:
        name: What ``--peers`` and the results call it.
        devices: The ``--device`` values it runs on.
        description: One line for the README and the plot legend.
        endpoint: ``module:Class`` of its :class:`~sidecar_core._bench._endpoint.Endpoint`
            (empty for ceilings, which run in one process).
        requires: Modules that must be importable.
        install_hint: How to install what is missing.
        transport: The sidecar transport it measures, if any.
        env: Environment for both of its processes.
        setup: Prepares what both processes share (called in the parent with a private folder).
    """

    name: str
    devices: tuple[str, ...]
    description: str
    endpoint: str = ""
    requires: tuple[str, ...] = ()
    install_hint: str = ""
    transport: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: Setup = _no_setup

    @property
    def is_ceiling(self) -> bool:
        """Whether this is a one-process copy rather than two processes talking."""
        return not self.endpoint

    def unavailable_reason(self) -> str | None:
        """Why this peer cannot run here, or ``None``."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"missing module {', '.join(missing)}; install it with: {self.install_hint}"
        if self.transport is not None:
            try:
                get_registry().load_transport(self.transport)
            except Exception as exc:
                return f"sidecar transport {self.transport!r} cannot load: {exc}"
        return None

    def endpoint_class(self) -> Any:
        """Import and return the endpoint class."""
        module, _, name = self.endpoint.partition(":")
        return getattr(importlib.import_module(module), name)


def _sidecar_setup(transport: str) -> Setup:
    def setup(workdir: Path) -> dict[str, Any]:
        cls = get_registry().load_transport(transport)
        env = {"SIDECAR_TRANSPORT": transport, **cls.test_environment(workdir)}
        return {"dir": str(workdir), "env": env}

    return setup


def _mpqueue_setup(workdir: Path) -> dict[str, Any]:
    from sidecar_core._bench._mpqueue import make_queues  # imports torch.multiprocessing

    return {"dir": str(workdir), "queues": make_queues()}


def _ucxx_setup(workdir: Path) -> dict[str, Any]:
    """Raw ucxx runs with the ucx transport's progress mode (``SIDECAR_UCX__PROGRESS_MODE``)."""
    from transports.ucx import UcxSettings

    return {"dir": str(workdir), "progress_mode": load_settings(UcxSettings).progress_mode}


_UCX_QUIET = {"UCX_WARN_UNUSED_ENV_VARS": "n"}
_UCXX_HINT = "pip install 'sidecar[ucx]'"

PEERS: dict[str, PeerSpec] = {
    spec.name: spec
    for spec in (
        PeerSpec("memcpy", ("cpu",), "single-thread memcpy in one process (numpy.copyto): the ceiling"),
        PeerSpec("cuda-d2d", ("cuda",), "device-to-device copy_ in one process: the ceiling"),
        PeerSpec("cuda-h2d-pinned", ("cuda",), "pinned host-to-device copy_ in one process"),
        PeerSpec(
            "sidecar-localhost",
            ("cpu", "cuda"),
            "sidecar, localhost transport (send, recv_sync, mark_done); CUDA tensors staged through host memory",
            endpoint="sidecar_core._bench._sidecar:SidecarEndpoint",
            transport="localhost",
            env={"SIDECAR_LOCALHOST__CUDA_IPC": "0"},
            setup=_sidecar_setup("localhost"),
        ),
        PeerSpec(
            "sidecar-localhost-ipc",
            ("cuda",),
            "sidecar, localhost transport with SIDECAR_LOCALHOST__CUDA_IPC=1 (CUDA IPC handles)",
            endpoint="sidecar_core._bench._sidecar:SidecarEndpoint",
            transport="localhost",
            env={"SIDECAR_LOCALHOST__CUDA_IPC": "1"},
            setup=_sidecar_setup("localhost"),
        ),
        PeerSpec(
            "sidecar-ucx",
            ("cpu", "cuda"),
            "sidecar, ucx transport (send, recv_sync, mark_done)",
            endpoint="sidecar_core._bench._sidecar:SidecarEndpoint",
            requires=("ucxx",),
            install_hint=_UCXX_HINT,
            transport="ucx",
            env=_UCX_QUIET,
            setup=_sidecar_setup("ucx"),
        ),
        PeerSpec(
            "ucxx",
            ("cpu", "cuda"),
            "raw ucxx: one tagged send into a preallocated buffer",
            endpoint="sidecar_core._bench._ucxx:UcxxEndpoint",
            requires=("ucxx",),
            install_hint=_UCXX_HINT,
            env=_UCX_QUIET,
            setup=_ucxx_setup,
        ),
        PeerSpec(
            "tcp",
            ("cpu",),
            "raw loopback TCP socket: sendall, recv_into a preallocated buffer",
            endpoint="sidecar_core._bench._tcp:TcpEndpoint",
        ),
        PeerSpec(
            "zmq",
            ("cpu",),
            "pyzmq PAIR over ipc://, pickle protocol 5 with out-of-band buffers",
            endpoint="sidecar_core._bench._zmq:ZmqEndpoint",
            requires=("zmq",),
            install_hint="pip install pyzmq",
        ),
        PeerSpec(
            "mp-queue",
            ("cpu", "cuda"),
            "torch.multiprocessing queue (shared memory on CPU, CUDA IPC on GPU)",
            endpoint="sidecar_core._bench._mpqueue:MpQueueEndpoint",
            setup=_mpqueue_setup,
        ),
    )
}


def baseline_for(device: str) -> str:
    """The ceiling that ratios are taken against."""
    return "memcpy" if device == "cpu" else "cuda-d2d"


def select_peers(device: str, names: list[str] | None) -> list[PeerSpec]:
    """The peers to run, ceilings first; the baseline ceiling always runs.

    Raises:
        ValueError: A name is unknown or does not run on ``device``.
    """
    on_device = [p for p in PEERS.values() if device in p.devices]
    if names is None:
        return on_device
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    wrong = [n for n in names if device not in PEERS[n].devices]
    if wrong:
        valid = ", ".join(p.name for p in on_device)
        raise ValueError(f"peer(s) {', '.join(wrong)} do not run with --device {device}; choose from {valid}")
    wanted = {baseline_for(device), *names}
    return [p for p in on_device if p.name in wanted]
