"""``sidecar doctor``: the settings in effect, and whether this host can run the selected transport."""

from __future__ import annotations

import importlib.metadata
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic_settings import BaseSettings

from sidecar_core._errors import SettingsError, SidecarError
from sidecar_core._plugins import Registry
from sidecar_core._settings import SidecarSettings, check_recv_device, load_settings
from sidecar_core._settings_doc import fields_of, settings_class_of
from sidecar_core._transport import Transport

Status = Literal["ok", "info", "warn", "fail"]

SHM_PATH = "/dev/shm"
#: The kernel's transparent-huge-page policy for shared memory (the localhost pool is shared memory).
THP_SHMEM_PATH = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
#: Policies under which the pool's ``MADV_HUGEPAGE`` gets huge pages.
THP_SHMEM_GRANTED = ("advise", "within_size", "always", "force")
#: Below this, shared memory is probably a container default (Docker gives 64 MiB).
SHM_WARN_BYTES = 1 << 30
PROBE_TIMEOUT = 0.5
MASK = "***"


@dataclass(frozen=True, slots=True)
class Check:
    """One finding; ``fail`` makes ``sidecar doctor`` exit non-zero."""

    name: str
    status: Status
    detail: str


@dataclass(frozen=True, slots=True)
class SettingValue:
    """A setting's value in effect and where it came from (secrets masked)."""

    env: str
    value: Any
    source: str


@dataclass
class Report:
    """Everything ``sidecar doctor`` found."""

    settings: list[SettingValue] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing required is broken."""
        return all(check.status != "fail" for check in self.checks)

    def add(self, name: str, status: Status, detail: str) -> None:
        """Record a finding."""
        self.checks.append(Check(name, status, detail))

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-compatible data."""
        return {
            "ok": self.ok,
            "settings": [asdict(s) for s in self.settings],
            "checks": [asdict(c) for c in self.checks],
        }


def diagnose(registry: Registry, ranks: Sequence[int] | None = None, load_ucx: bool = False) -> Report:
    """Check the settings, the selected transport, UCX, shared memory, CUDA and the peers.

    Args:
        registry: The plugin registry.
        ranks: Peer ranks to probe (default: those of ``SIDECAR_PEERS``).
        load_ucx: Import ucxx to prove it loads (done anyway when the ucx transport is selected;
            otherwise only its installed version is read).
    """
    report = Report()
    for broken in registry.broken:
        report.add(f"plugin {broken.name}", "warn", f"entry point from {broken.source} failed to load: {broken.reason}")
    try:
        settings = load_settings(SidecarSettings)
    except SidecarError as exc:
        report.add("settings", "fail", str(exc))
        return report
    report.settings += setting_values(settings)
    report.add("settings", "ok", "SIDECAR_* variables are valid")
    transport = _check_transport(report, registry, settings)
    _check_serializers(report, registry)
    _check_ucx(report, load=load_ucx or settings.transport_name == "ucx")
    _check_shm(report, settings.transport_name)
    if settings.transport_name == "localhost":
        _check_huge_pages(report)
    _check_cuda(report, settings.recv_device)
    if transport is not None and not transport.peerless:
        _check_peers(report, settings, transport, ranks)
    return report


def setting_values(settings: BaseSettings) -> list[SettingValue]:
    """Each field of ``settings`` with its value (secrets masked) and its source."""
    present = {key.upper() for key in os.environ}
    values = settings.model_dump(mode="json")
    rows = []
    for doc in fields_of(type(settings)):
        value = MASK if doc.secret and values[doc.field] is not None else values[doc.field]
        given = [name for name in doc.env if name.upper() in present or _nested_given(name, present)]
        rows.append(SettingValue(doc.env[0], value, f"env {given[0]}" if given else "default"))
    return rows


def _nested_given(name: str, present: set[str]) -> bool:
    prefix = name.upper() + "__"
    return any(key.startswith(prefix) for key in present)


def _check_transport(report: Report, registry: Registry, settings: SidecarSettings) -> type[Transport] | None:
    """Check that the selected transport loads and its own settings are valid; return its class."""
    name = settings.transport_name
    try:
        cls = registry.load_transport(name)
    except SidecarError as exc:
        report.add("transport", "fail", str(exc))
        return None
    report.add("transport", "ok", f"{name} ({registry.transport(name).source}) loads")
    settings_cls = settings_class_of(cls)
    if settings_cls is not None:
        try:
            report.settings += setting_values(load_settings(settings_cls))
        except SidecarError as exc:
            report.add(f"{name} settings", "fail", str(exc))
            return None
    return cls


def _check_serializers(report: Report, registry: Registry) -> None:
    """Load the serializers as a sidecar does at start: one that breaks the protocol stops every sidecar."""
    try:
        names = [serializer.NAME for serializer in registry.load_serializers()]
    except SidecarError as exc:
        report.add("serializers", "fail", str(exc))
        return
    report.add("serializers", "ok", ", ".join(names))


def _check_ucx(report: Report, load: bool) -> None:
    modules = importlib.metadata.packages_distributions()
    if "ucxx" not in modules:
        report.add("ucx", "info", "ucxx is not installed (only the ucx transport needs it): pip install 'sidecar[ucx]'")
        return
    dists = sorted({dist for module in ("ucxx", "libucx") for dist in modules.get(module, [])})
    installed = ", ".join(f"{dist} {importlib.metadata.version(dist)}" for dist in dists)
    if not load:
        report.add("ucx", "ok", f"{installed} installed (not imported; --load-ucx imports it)")
        return
    try:
        import ucxx

        ucx = ".".join(map(str, ucxx.get_ucx_version()))
    except Exception as exc:
        report.add("ucx", "fail", f"{installed} installed but `import ucxx` failed: {exc!r}")
        return
    report.add("ucx", "ok", f"{installed}; ucxx loads, UCX library {ucx}")


def _check_shm(report: Report, transport: str) -> None:
    """``/dev/shm``: UCX's shared-memory transports use it between processes of one host.

    The localhost transport does not: its pool is an anonymous memfd passed over its socket, so
    Docker's 64 MiB ``/dev/shm`` does not limit it.
    """
    needed = transport == "ucx"
    users = "ucx between processes on one host needs it" if needed else "the localhost transport does not use it"
    try:
        stat = os.statvfs(SHM_PATH)
    except OSError as exc:
        report.add("shared memory", "warn" if needed else "info", f"{SHM_PATH} is not usable ({exc}); {users}")
        return
    total, free = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
    detail = f"{SHM_PATH}: {_gib(total)} total, {_gib(free)} free"
    if total >= SHM_WARN_BYTES:
        report.add("shared memory", "ok", detail)
    elif needed:
        report.add(
            "shared memory",
            "warn",
            f"{detail}; UCX's shared-memory transports between processes on one host need more: run containers "
            "with --shm-size=8g (or --ipc=host)",
        )
    else:
        report.add("shared memory", "info", f"{detail}; {users} (its pool is an anonymous memfd)")


def _check_huge_pages(report: Report) -> None:
    """Whether the localhost pool can get transparent huge pages (large copies into it run faster with them)."""
    try:
        with open(THP_SHMEM_PATH) as file:
            text = file.read()
    except OSError:
        report.add(
            "huge pages", "info", "this kernel reports no huge-page policy for shared memory; the pool uses 4 KiB pages"
        )
        return
    chosen = next((word[1:-1] for word in text.split() if word.startswith("[")), text.strip())
    if chosen in THP_SHMEM_GRANTED:
        report.add(
            "huge pages", "ok", f"shared memory gets huge pages ({THP_SHMEM_PATH}: {chosen}); the pool asks for them"
        )
        return
    report.add(
        "huge pages",
        "info",
        f"shared memory gets no huge pages here ({THP_SHMEM_PATH}: {chosen}), so the localhost pool uses 4 KiB pages "
        "and large copies into it run slower (64 MiB: about a fifth slower than into huge pages, measured on a 2-core "
        f"VM). With `advise` the pool gets them: as root, echo advise > {THP_SHMEM_PATH}",
    )


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.1f} GiB"


def _check_cuda(report: Report, recv_device: str) -> None:
    import torch

    try:
        check_recv_device(recv_device)
    except SettingsError as exc:
        report.add("cuda", "fail", str(exc).removeprefix("invalid sidecar setting: "))
        return
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))
        report.add("cuda", "ok", f"torch {torch.__version__}, {count} device(s): {names}")
    else:
        report.add("cuda", "info", f"torch {torch.__version__} sees no CUDA device; tensors travel through host memory")


def _check_peers(
    report: Report, settings: SidecarSettings, transport: type[Transport], ranks: Sequence[int] | None
) -> None:
    wanted = sorted(set(ranks if ranks is not None else (settings.peers or {})) - {settings.rank})
    if not wanted:
        report.add("peers", "info", "no peers to probe: pass --ranks 0,1 (or set SIDECAR_PEERS)")
    elif transport.name == "localhost":
        _probe_sockets(report, wanted)
    else:
        _probe_tcp(report, settings, wanted)


def _probe_sockets(report: Report, ranks: Sequence[int]) -> None:
    """Look for the Unix sockets localhost ranks listen on (without connecting to them)."""
    from transports.localhost import LocalhostSettings
    from transports.localhost._rendezvous import default_socket_dir, socket_path

    directory = load_settings(LocalhostSettings).socket_dir or default_socket_dir()
    for rank in ranks:
        path = socket_path(directory, rank)
        if path.is_socket():
            report.add(f"peer {rank}", "ok", f"rank {rank} has its socket at {path}")
        else:
            report.add(
                f"peer {rank}", "warn", f"no socket at {path}; is rank {rank} up, with the same socket directory?"
            )


def _probe_tcp(report: Report, settings: SidecarSettings, ranks: Sequence[int]) -> None:
    """Try a TCP connection to each rank's address, resolved from the core settings as network transports do."""
    from transports.ucx._addressing import Addressing

    try:
        addressing = Addressing(settings)
    except SidecarError as exc:
        report.add("peers", "fail", str(exc))
        return
    for rank in ranks:
        try:
            address = addressing.resolve(rank)
            with socket.create_connection((address.host, address.port), timeout=PROBE_TIMEOUT):
                pass
        except SidecarError as exc:
            report.add(f"peer {rank}", "warn", str(exc))
        except OSError as exc:
            report.add(f"peer {rank}", "warn", f"nothing accepts connections at {address} ({exc}); is rank {rank} up?")
        except UnicodeError as exc:  # a host name that is no valid DNS name (a label over 63 characters)
            report.add(f"peer {rank}", "fail", f"{address.host!r} is not a valid host name: {exc}")
        else:
            report.add(f"peer {rank}", "ok", f"{address} accepts connections")
