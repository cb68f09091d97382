"""Where each rank listens: explicit peer map, host template, or loopback, and free test ports.

Resolution, first match wins:

1. ``SIDECAR_IS_LOCAL=1``: every rank is on ``127.0.0.1`` (the port is still rank-specific).
2. ``SIDECAR_PEERS``: an explicit JSON map of rank to ``host:port``.
3. ``SIDECAR_HOST_TEMPLATE`` with ``{rank}`` replaced (e.g. a Kubernetes StatefulSet's
   ``sidecar-{rank}.sidecar.default.svc``) and port ``SIDECAR_BASE_PORT + rank``.

With ``SIDECAR_IS_LOCAL=1`` or ``SIDECAR_PEERS`` a rank's port comes from the map when the map names
it, else it is ``SIDECAR_BASE_PORT + rank``.
"""

from __future__ import annotations

import random
import re
import socket
from dataclasses import dataclass

from sidecar_core import PeerUnreachableError, SettingsError, SidecarSettings

LOOPBACK = "127.0.0.1"
#: How many consecutive ports a test deployment reserves (ranks 0 to 31).
TEST_PORTS = 32
#: Where test deployments pick their ports when the kernel's range of ephemeral ports is unknown.
_TEST_PORT_RANGE = (20000, 60000)
#: The kernel's range of ports for outgoing connections (and ``bind`` to port 0).
_EPHEMERAL_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"


@dataclass(frozen=True, slots=True)
class Address:
    """A rank's host and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: str, rank: int) -> Address:
    """Parse ``host:port`` (or ``[v6-address]:port``) from ``SIDECAR_PEERS``.

    Raises:
        SettingsError: The value is not ``host:port`` with a port in 1..65535.
    """
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or re.fullmatch("[0-9]{1,5}", port) is None or not 0 < int(port) < 65536:
        raise SettingsError(
            f'invalid sidecar setting: SIDECAR_PEERS maps rank {rank} to {value!r}; expected "host:port", '
            'e.g. {"0": "10.0.0.5:19000"}'
        )
    return Address(host, int(port))


class Addressing:
    """Resolves ranks to addresses from the core settings (validated on construction).

    Raises:
        SettingsError: ``SIDECAR_PEERS`` or ``SIDECAR_HOST_TEMPLATE`` is malformed.
    """

    def __init__(self, settings: SidecarSettings) -> None:
        self._local = settings.is_local
        self._template = settings.host_template
        self._base_port = settings.base_port
        self._peers = {rank: parse_host_port(value, rank) for rank, value in (settings.peers or {}).items()}
        self._explicit = settings.peers is not None
        try:
            self._template.format(rank=0)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:  # {host}, {0}, {rank.x}, ...
            raise SettingsError(
                f"invalid sidecar setting: SIDECAR_HOST_TEMPLATE={self._template!r} cannot be formatted ({exc!r}); "
                "use {rank} as the only placeholder, e.g. 'sidecar-{rank}.sidecar.default.svc'"
            ) from None

    def _port(self, rank: int) -> int:
        port = self._base_port + rank
        if port > 65535:
            raise PeerUnreachableError(
                f"rank {rank} has no port: SIDECAR_BASE_PORT={self._base_port} + {rank} exceeds 65535; "
                "lower SIDECAR_BASE_PORT or list the rank in SIDECAR_PEERS"
            )
        return port

    def listen_port(self, rank: int) -> int:
        """The port this sidecar of ``rank`` listens on.

        Raises:
            PeerUnreachableError: The rank's port would exceed 65535.
        """
        mapped = self._peers.get(rank)
        return mapped.port if mapped is not None else self._port(rank)

    def resolve(self, rank: int) -> Address:
        """Where ``rank`` listens.

        Raises:
            PeerUnreachableError: ``SIDECAR_PEERS`` is set and does not list ``rank``, or its port
                would exceed 65535.
        """
        mapped = self._peers.get(rank)
        if self._local:
            return Address(LOOPBACK, mapped.port if mapped is not None else self._port(rank))
        if self._explicit:
            if mapped is None:
                listed = ", ".join(map(str, sorted(self._peers))) or "none"
                raise PeerUnreachableError(
                    f"rank {rank} is not in SIDECAR_PEERS (ranks listed: {listed}); add it, or unset SIDECAR_PEERS "
                    "to use SIDECAR_HOST_TEMPLATE"
                )
            return mapped
        return Address(self._template.format(rank=rank), self._port(rank))


def ports_free(base: int, count: int) -> bool:
    """Whether TCP ports ``base .. base+count-1`` can all be bound on every interface right now."""
    socks: list[socket.socket] = []
    try:
        for port in range(base, base + count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def free_base_port(count: int = TEST_PORTS, attempts: int = 200) -> int:
    """A random base port such that ``count`` consecutive ports are free (for test deployments).

    Raises:
        RuntimeError: No free range was found.
    """
    low, high = _test_port_range(count)
    rng = random.SystemRandom()
    for _ in range(attempts):
        base = rng.randrange(low, high - count)
        if ports_free(base, count):
            return base
    raise RuntimeError(f"found no {count} consecutive free TCP ports in {low}..{high} after {attempts} tries")


def _test_port_range(count: int) -> tuple[int, int]:
    """Ports below the kernel's ephemeral range where it leaves room, else :data:`_TEST_PORT_RANGE`.

    A port free when a test picks it can be taken, before a rank listens on it, by any outgoing
    connection the kernel gives an ephemeral port (UCX makes several per connection).
    """
    try:
        with open(_EPHEMERAL_PORTS) as ports:
            first = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _TEST_PORT_RANGE
    if first - 10000 >= 50 * count:
        return 10000, first
    return _TEST_PORT_RANGE
