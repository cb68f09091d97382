"""A private deployment of one transport for the conformance suite.

The test process holds rank 0 (a real ``Sidecar``); peers are real processes started on first use.
Every process gets the same environment: the transport's ``test_environment(workdir)``, the suite's
short timeouts and ``SIDECAR_TRANSPORT``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sidecar_core._client import Sidecar, SidecarConfig
from sidecar_core._plugins import build_registry, get_registry
from sidecar_core._settings import UNSET_IN_PRIVATE_RUNS
from sidecar_core._transport import Transport
from sidecar_core.testing._peer import PeerProcess
from sidecar_core.testing._probe import ProbePlugin

#: The transports this distribution ships; ``SIDECAR_TEST_STRICT=1`` fails any skip of them.
BUILTIN_TRANSPORTS = ("localhost", "ucx", "mock-file")

#: Settings every process of a deployment gets (a transport's test environment may override them).
SUITE_ENV = {
    "SIDECAR_CONNECT_TIMEOUT": "3",
    "SIDECAR_SEND_TIMEOUT": "30",
    "SIDECAR_RECV_TIMEOUT": "30",
}


#: Rank 2 splits what it sends into parts of this many bytes (``SIDECAR_CHUNK_SIZE``).
PART_SENDER_RANK = 2
PART_SIZE = 65536

#: A rank that no process of the deployment serves.
UNSERVED_RANK = 9
#: A rank whose sidecar starts only after a send to it began.
LATE_RANK = 4
#: A rank served twice in the test process, one sidecar after the other.
REUSED_RANK = 6
#: A rank started with an auth token of its own, and the rank that sends to it.
TOKEN_RANK = 7
TOKEN_SENDER_RANK = 8


@contextlib.contextmanager
def environment(env: Mapping[str, str], remove: tuple[str, ...] = ()) -> Iterator[None]:
    """Apply ``env`` (and unset ``remove``) in ``os.environ`` for the duration of the block."""
    saved = {key: os.environ.get(key) for key in (*env, *remove)}
    try:
        for key in remove:
            os.environ.pop(key, None)
        os.environ.update(env)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def local_sidecar(
    env: Mapping[str, str], rank: int, remove: tuple[str, ...] = (), **settings: Any
) -> Iterator[Sidecar]:
    """A sidecar of ``rank`` in this process, built under ``env`` (less ``remove``), shut down after.

    Args:
        env: Environment variables to apply while the sidecar is built.
        rank: Its rank.
        remove: Variables to unset while it is built (also dropped from ``env``).
        **settings: Overrides for :class:`~sidecar_core.SidecarSettings` fields.
    """
    kept = {key: value for key, value in env.items() if key not in remove}
    with environment(kept, remove):
        sidecar = Sidecar(SidecarConfig(sidecar_rank=rank, settings=settings))
    try:
        yield sidecar
    finally:
        sidecar.shutdown_sync()


class Deployment:
    """Rank 0 in this process plus lazily started peer processes, all on one transport.

    Args:
        transport: The registered transport name.
        workdir: An empty directory that outlives the deployment.

    Raises:
        TransportNotFoundError: No such transport is installed.
        PluginUnavailableError: The transport cannot be imported here.
        PluginError: The registered target is not a ``Transport``.
    """

    def __init__(self, transport: str, workdir: Path) -> None:
        self.name = transport
        self.workdir = workdir
        self.transport_cls: type[Transport] = get_registry().load_transport(transport)
        self.peerless = self.transport_cls.peerless
        self.env = {**SUITE_ENV, **self.transport_cls.test_environment(workdir), "SIDECAR_TRANSPORT": transport}
        #: What the deployment unsets: what would send it elsewhere, unless its test environment sets it.
        self._unset = tuple(name for name in UNSET_IN_PRIVATE_RUNS if name not in self.env)
        self.send_timeout = float(self.env["SIDECAR_SEND_TIMEOUT"])
        self.probe = ProbePlugin()
        self._peers: dict[int, PeerProcess] = {}
        with environment(self.env, self._unset):
            self.sidecar = Sidecar(
                SidecarConfig(sidecar_rank=0, transport=transport),
                registry=build_registry(extra_plugins=(self.probe,)),
            )

    def peer(self, rank: int) -> PeerProcess:
        """The deployment's peer of ``rank`` (started on first use, kept until :meth:`close`).

        Raises:
            PeerError: The peer could not start its sidecar.
        """
        peer = self._peers.get(rank)
        if peer is None or not peer.process.is_alive():
            extra = {"SIDECAR_CHUNK_SIZE": str(PART_SIZE)} if rank == PART_SENDER_RANK else {}
            peer = self._peers[rank] = self.spawn(rank, extra)
        return peer

    def spawn(self, rank: int, extra_env: Mapping[str, str] | None = None) -> PeerProcess:
        """Start a new peer of ``rank`` that the caller owns (and must close or kill).

        Raises:
            PeerError: The peer could not start its sidecar.
        """
        env = {**self.env, **(extra_env or {})}
        with environment(env, self._unset):
            return PeerProcess(rank, env)

    def local(
        self, rank: int, extra_env: Mapping[str, str] | None = None
    ) -> contextlib.AbstractContextManager[Sidecar]:
        """A sidecar of ``rank`` in this process, on the deployment's settings (and ``extra_env``), shut down after.

        Raises:
            SidecarError: The sidecar could not start (as :class:`~sidecar_core.Sidecar` raises it).
        """
        return local_sidecar({**self.env, **(extra_env or {})}, rank, self._unset)

    def close(self) -> None:
        """Stop every peer and rank 0."""
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()
        self.sidecar.shutdown_sync()

    def __repr__(self) -> str:
        return f"<Deployment {self.name} peers={sorted(self._peers)}>"
