"""The ``sidecar`` command line: plugins, doctor, demo and bench."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar_core import Sidecar, SidecarConfig, hookimpl
from sidecar_core._cli import main, plugin_report
from sidecar_core._hooks import Register
from sidecar_core._plugins import BrokenPlugin, build_registry

BUILTIN_TRANSPORTS = {"localhost", "ucx", "mock-file"}
BUILTIN_SERIALIZERS = {"tensor", "chunked_tensor", "primitives", "json"}
SECRET = "s3cret-token-value"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test from default settings, whatever the developer's shell exports."""
    for key in list(os.environ):
        if key.upper().startswith(("SIDECAR_", "CORNSERVE_MOCK_SIDECAR")):
            monkeypatch.delenv(key)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out)


def sidecar_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("SIDECAR_", "CORNSERVE_"))}
    return {**env, **(extra or {})}


def sidecar_argv(*argv: str) -> list[str]:
    """The installed ``sidecar`` console script (next to this interpreter) with arguments."""
    return [os.path.join(os.path.dirname(sys.executable), "sidecar"), *argv]


def sidecar_command(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sidecar_argv(*argv), capture_output=True, text=True, env=sidecar_env(env), timeout=120, check=False
    )


# -- plugins --------------------------------------------------------------------------------------


def test_plugins_json_lists_the_builtins_as_available() -> None:
    result = sidecar_command("plugins", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    by_kind: dict[str, dict[str, Any]] = {"transport": {}, "serializer": {}}
    for plugin in report["plugins"]:
        by_kind[plugin["kind"]][plugin["name"]] = plugin
    assert set(by_kind["transport"]) >= BUILTIN_TRANSPORTS
    assert set(by_kind["serializer"]) >= BUILTIN_SERIALIZERS
    for name in BUILTIN_TRANSPORTS:
        entry = by_kind["transport"][name]
        assert entry["available"] is True, entry
        assert entry["reason"] is None
        assert entry["source"].startswith("sidecar ")
        assert entry["description"]
    for name in BUILTIN_SERIALIZERS:
        assert by_kind["serializer"][name]["available"] is True, by_kind["serializer"][name]
    assert report["broken"] == []


def test_plugins_table_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    header, rule, *rows = out.splitlines()
    assert header.split() == ["kind", "name", "from", "available", "description"]
    assert set(rule) <= {"-", " "}
    for name in BUILTIN_TRANSPORTS | BUILTIN_SERIALIZERS:
        assert any(row.split()[1] == name and " yes " in row for row in rows), name


class _Unavailable:
    @hookimpl
    def sidecar_register_transports(self, register: Register) -> None:
        register(
            "needs-missing",
            "no_such_module_for_sidecar:Transport",
            requires=("no_such_module_for_sidecar",),
            install_hint="pip install no-such-module",
            description="needs a module that is not installed",
        )
        register("bad-target", "json:NoSuchTransport", description="imports, but the class is missing")
        register("not-a-transport", "json:JSONDecoder", description="imports, but is no Transport")


def test_plugins_report_unavailable_and_broken_plugins() -> None:
    registry = build_registry(extra_plugins=(_Unavailable(),))
    registry.broken.append(BrokenPlugin("broken-ep", "example-dist 1.0", "ImportError('boom')"))
    report = plugin_report(registry)
    entries = {p["name"]: p for p in report["plugins"]}
    missing = entries["needs-missing"]
    assert missing["available"] is False
    assert missing["reason"] == "missing module no_such_module_for_sidecar; install it with: pip install no-such-module"
    assert missing["source"] == "in-process plugin " + missing["source"].removeprefix("in-process plugin ")
    # Without --load only what can be found without importing is checked; --load imports the target.
    assert entries["bad-target"]["available"] is True
    loaded = {p["name"]: p for p in plugin_report(registry, load=True)["plugins"]}
    assert loaded["bad-target"]["available"] is False
    assert "NoSuchTransport" in loaded["bad-target"]["reason"]
    assert loaded["localhost"]["available"] is True
    # What a sidecar would refuse to load is not available either.
    assert (entries["not-a-transport"]["available"], entries["not-a-transport"]["invalid"]) == (True, False)
    assert (loaded["not-a-transport"]["available"], loaded["not-a-transport"]["invalid"]) == (False, True)
    assert loaded["needs-missing"]["invalid"] is False
    assert "json:JSONDecoder is not a Transport subclass" in loaded["not-a-transport"]["reason"]
    assert report["broken"] == [{"name": "broken-ep", "source": "example-dist 1.0", "reason": "ImportError('boom')"}]


def test_doctor_fails_a_serializer_a_sidecar_would_not_load(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = build_registry(extra_plugins=(_Unavailable(),))
    registry._register("serializer", "test")("half", "json")  # a module without the serializer names
    monkeypatch.setattr("sidecar_core._cli.build_registry", lambda: registry)
    code, report = run_json(capsys, "doctor", "--json")
    assert code == 1
    check = checks_by_name(report)["serializers"]
    assert check["status"] == "fail"
    assert "serializer 'half' from test: json must define NAME='half'" in check["detail"]


def test_plugins_exits_non_zero_for_a_broken_entry_point(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plugins"]) == 0
    registry = build_registry()
    registry.broken.append(BrokenPlugin("broken-ep", "example-dist 1.0", "ImportError('boom')"))
    monkeypatch.setattr("sidecar_core._cli.build_registry", lambda: registry)
    assert main(["plugins"]) == 1
    assert main(["plugins", "--json"]) == 1
    assert "broken entry point 'broken-ep' from example-dist 1.0" in capsys.readouterr().out


def test_plugins_load_exits_non_zero_for_a_plugin_a_sidecar_would_refuse(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = build_registry(extra_plugins=(_Unavailable(),))
    monkeypatch.setattr("sidecar_core._cli.build_registry", lambda: registry)
    assert main(["plugins", "--load"]) == 1  # not-a-transport loads, but is no Transport
    registry.transports.pop("not-a-transport")
    # What cannot be imported here (a missing module, an import that fails) is unavailable, as an
    # optional dependency that is not installed: not a broken install.
    assert main(["plugins", "--load"]) == 0
    registry._register("serializer", "test")("half", "json")
    assert main(["plugins", "--load"]) == 1
    assert "must define NAME='half'" in capsys.readouterr().out


# -- doctor ---------------------------------------------------------------------------------------


def settings_by_env(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["env"]: row for row in report["settings"]}


def checks_by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


def test_doctor_json_shows_sources_and_masks_the_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SIDECAR_AUTH_TOKEN", SECRET)
    monkeypatch.setenv("SIDECAR_RECV_TIMEOUT", "5")
    code = main(["doctor", "--json"])
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    report = json.loads(captured.out)
    assert code == 0, report
    assert report["ok"] is True
    settings = settings_by_env(report)
    assert settings["SIDECAR_AUTH_TOKEN"] == {
        "env": "SIDECAR_AUTH_TOKEN",
        "value": "***",
        "source": "env SIDECAR_AUTH_TOKEN",
    }
    assert settings["SIDECAR_RECV_TIMEOUT"] == {
        "env": "SIDECAR_RECV_TIMEOUT",
        "value": 5.0,
        "source": "env SIDECAR_RECV_TIMEOUT",
    }
    assert settings["SIDECAR_SEND_TIMEOUT"] == {"env": "SIDECAR_SEND_TIMEOUT", "value": 60.0, "source": "default"}
    assert settings["SIDECAR_TRANSPORT"]["value"] == "localhost"
    checks = checks_by_name(report)
    assert checks["transport"]["status"] == "ok"
    assert checks["transport"]["detail"].startswith("localhost (sidecar ")
    assert checks["shared memory"]["status"] in ("ok", "info")
    assert checks["cuda"]["status"] in ("ok", "info")
    assert checks["ucx"]["detail"].endswith("installed (not imported; --load-ucx imports it)")
    assert checks["serializers"]["status"] == "ok"
    assert {"tensor", "json", "primitives"} <= set(checks["serializers"]["detail"].split(", "))


@pytest.mark.parametrize(("transport", "status"), [("localhost", "info"), ("ucx", "warn")])
def test_doctor_warns_of_a_small_dev_shm_only_where_it_is_used(
    transport: str, status: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small /dev/shm (Docker's 64 MiB) limits UCX's shared memory, not localhost's pool (a memfd)."""
    monkeypatch.setattr("sidecar_core._doctor.SHM_WARN_BYTES", 1 << 62)
    monkeypatch.setenv("SIDECAR_TRANSPORT", transport)
    _, report = run_json(capsys, "doctor", "--json")
    shm = checks_by_name(report)["shared memory"]
    assert shm["status"] == status
    if transport == "localhost":
        assert "does not use it" in shm["detail"]
    else:
        assert "--shm-size" in shm["detail"]


@pytest.mark.parametrize(
    ("policy", "status", "words"),
    [
        ("always within_size advise [never] deny force", "info", "no huge pages here"),
        ("always within_size [advise] never deny force", "ok", "gets huge pages"),
        ("[always] within_size advise never deny force", "ok", "gets huge pages"),
        (None, "info", "no huge-page policy"),
    ],
)
def test_doctor_reports_whether_the_localhost_pool_gets_huge_pages(
    policy: str | None,
    status: str,
    words: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "shmem_enabled"
    if policy is not None:
        path.write_text(policy + "\n")
    monkeypatch.setattr("sidecar_core._doctor.THP_SHMEM_PATH", str(path))
    monkeypatch.setenv("SIDECAR_TRANSPORT", "localhost")
    code, report = run_json(capsys, "doctor", "--json")
    pages = checks_by_name(report)["huge pages"]
    assert (pages["status"], words in pages["detail"]) == (status, True), pages
    assert code == 0
    monkeypatch.setenv("SIDECAR_TRANSPORT", "ucx")
    _, report = run_json(capsys, "doctor", "--json")
    assert "huge pages" not in checks_by_name(report)


def test_doctor_table_masks_the_token(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SIDECAR_AUTH_TOKEN", SECRET)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert any(line.split()[:3] == ["SIDECAR_AUTH_TOKEN", "***", "env"] for line in out.splitlines())
    assert out.rstrip().endswith("all required checks passed")


def test_doctor_cornserve_mock_switch_selects_mock_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORNSERVE_MOCK_SIDECAR", "true")
    code, report = run_json(capsys, "doctor", "--json")
    assert code == 0, report
    assert settings_by_env(report)["CORNSERVE_MOCK_SIDECAR"]["source"] == "env CORNSERVE_MOCK_SIDECAR"
    assert checks_by_name(report)["transport"]["detail"].startswith("mock-file (sidecar ")
    assert "peer 1" not in checks_by_name(report)  # mock-file has no peers


def test_doctor_fails_a_mock_mapping_to_an_unknown_format(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("SIDECAR_TRANSPORT", "mock-file")
    monkeypatch.setenv("SIDECAR_MOCK_FILE__MAPPING", json.dumps({"a-0": str(tmp_path / "a.txt")}))
    code, report = run_json(capsys, "doctor", "--json")
    assert code == 1
    check = checks_by_name(report)["mock-file settings"]
    assert check["status"] == "fail"
    assert "SIDECAR_MOCK_FILE__MAPPING" in check["detail"]
    assert "'.txt'" in check["detail"]


def test_doctor_bad_value_fails_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SIDECAR_RECV_TIMEOUT", "soon")
    code, report = run_json(capsys, "doctor", "--json")
    assert code == 1
    assert report["ok"] is False
    check = checks_by_name(report)["settings"]
    assert check["status"] == "fail"
    assert check["detail"].startswith('invalid sidecar setting: SIDECAR_RECV_TIMEOUT="soon"')


def test_doctor_unknown_transport_fails_with_a_suggestion(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SIDECAR_TRANSPORT", "localhots")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "unknown transport 'localhots'. Did you mean 'localhost'?" in out
    assert "some required checks FAILED" in out


def test_doctor_checks_a_cuda_receive_device(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.setenv("SIDECAR_RECV_DEVICE", "cuda")
    code, report = run_json(capsys, "doctor", "--json")
    check = checks_by_name(report)["cuda"]
    if torch.cuda.is_available():
        assert (code, check["status"]) == (0, "ok")
        assert f"{torch.cuda.device_count()} device(s)" in check["detail"]
    else:
        assert (code, check["status"]) == (1, "fail")
        assert check["detail"].startswith("SIDECAR_RECV_DEVICE=cuda but torch ")
        assert check["detail"].endswith("set SIDECAR_RECV_DEVICE=cpu or run on a CUDA host")


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return int(server.getsockname()[1])


def test_doctor_probes_configured_peers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], listener: int
) -> None:
    closed = free_port()
    monkeypatch.setenv("SIDECAR_TRANSPORT", "ucx")
    monkeypatch.setenv("SIDECAR_PEERS", json.dumps({"1": f"127.0.0.1:{listener}", "2": f"127.0.0.1:{closed}"}))
    code, report = run_json(capsys, "doctor", "--json")
    checks = checks_by_name(report)
    assert checks["peer 1"] == {"name": "peer 1", "status": "ok", "detail": f"127.0.0.1:{listener} accepts connections"}
    assert checks["peer 2"]["status"] == "warn"
    assert checks["peer 2"]["detail"].startswith(f"nothing accepts connections at 127.0.0.1:{closed}")
    assert code == 0  # a peer that is not up yet is a warning, not a broken setup
    assert "ucxx loads, UCX library 1." in checks["ucx"]["detail"]  # imported because ucx is selected


def test_doctor_probes_ranks_by_template(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], listener: int
) -> None:
    monkeypatch.setenv("SIDECAR_TRANSPORT", "ucx")
    monkeypatch.setenv("SIDECAR_BASE_PORT", str(listener - 3))
    code, report = run_json(capsys, "doctor", "--json", "--ranks", "3")
    assert code == 0
    assert checks_by_name(report)["peer 3"]["detail"] == f"127.0.0.1:{listener} accepts connections"


def test_doctor_fails_on_a_malformed_peer_address(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SIDECAR_TRANSPORT", "ucx")
    monkeypatch.setenv("SIDECAR_PEERS", '{"1": "no-port-here"}')
    code, report = run_json(capsys, "doctor", "--json")
    assert code == 1
    detail = checks_by_name(report)["peers"]["detail"]
    assert detail.startswith("invalid sidecar setting: SIDECAR_PEERS maps rank 1 to 'no-port-here'; expected")


def test_doctor_fails_on_a_host_name_dns_cannot_hold(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SIDECAR_TRANSPORT", "ucx")
    monkeypatch.setenv("SIDECAR_HOST_TEMPLATE", "sidecar-{rank}." + "x" * 64)  # a label over 63 characters
    code, report = run_json(capsys, "doctor", "--json", "--ranks", "1")
    assert code == 1
    check = checks_by_name(report)["peer 1"]
    assert check["status"] == "fail"
    assert "is not a valid host name" in check["detail"]


def test_doctor_looks_for_localhost_sockets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    socket_dir = tmp_path / "sockets"
    monkeypatch.setenv("SIDECAR_LOCALHOST__SOCKET_DIR", str(socket_dir))
    with Sidecar(SidecarConfig(sidecar_rank=1)):
        code, report = run_json(capsys, "doctor", "--json", "--ranks", "1,2")
    assert code == 0
    checks = checks_by_name(report)
    assert checks["peer 1"] == {
        "name": "peer 1",
        "status": "ok",
        "detail": f"rank 1 has its socket at {socket_dir}/rank-1.sock",
    }
    assert checks["peer 2"]["status"] == "warn"
    assert checks["peer 2"]["detail"].startswith(f"no socket at {socket_dir}/rank-2.sock; is rank 2 up")
    assert settings_by_env(report)["SIDECAR_LOCALHOST__SOCKET_DIR"] == {
        "env": "SIDECAR_LOCALHOST__SOCKET_DIR",
        "value": str(socket_dir),
        "source": "env SIDECAR_LOCALHOST__SOCKET_DIR",
    }


def test_doctor_loads_ucx_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(capsys, "doctor", "--json", "--load-ucx")
    assert code == 0
    detail = checks_by_name(report)["ucx"]["detail"]
    assert "ucxx loads, UCX library 1." in detail


def test_bad_ranks_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "--ranks", "one"])
    assert exc.value.code == 2
    assert "expected comma-separated ranks like 0,1,2, got 'one'" in capsys.readouterr().err


# -- demo -----------------------------------------------------------------------------------------


#: How each demo run selects its transport: by default, through SIDECAR_TRANSPORT, with --transport.
DEMOS: dict[str, tuple[list[str], dict[str, str]]] = {
    "localhost": ([], {}),
    "mock-file": ([], {"SIDECAR_TRANSPORT": "mock-file"}),
    # The demo's deployment is private: addresses of a real deployment in the environment are not used.
    "ucx": (["--transport", "ucx"], {"SIDECAR_PEERS": '{"0": "10.0.0.5:19000", "1": "10.0.0.6:19000"}'}),
}


@pytest.fixture(scope="module")
def demo_runs() -> Iterator[dict[str, subprocess.Popen[str]]]:
    """One ``sidecar demo`` per built-in transport, all started at once (they use private deployments)."""
    runs = {
        name: subprocess.Popen(
            sidecar_argv("demo", *args, "--size-mib", "8"),
            env=sidecar_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, env) in DEMOS.items()
    }
    yield runs
    for run in runs.values():
        if run.poll() is None:
            run.kill()
        run.communicate()


@pytest.mark.multiprocess
@pytest.mark.parametrize("transport", sorted(DEMOS))
def test_demo_runs_end_to_end(demo_runs: dict[str, subprocess.Popen[str]], transport: str) -> None:
    out, err = demo_runs[transport].communicate(timeout=180)
    assert demo_runs[transport].returncode == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith(f"sidecar demo over the {transport} transport: rank 0 (pid ")
    assert lines[1].startswith("  rank 1 started in a new process (pid ")
    for what in ("tensor", "dict", "stream", "large tensor"):
        assert any(line.startswith(f"  {what:<13} ") and line.endswith("came back intact") for line in lines), what
    assert re.search(r"8 MiB tensor sent and acknowledged at \d+\.\d\d GB/s", out)
    assert re.search(r"round trip: small message there and back in \d+ µs", out)
    assert lines[-1] == "OK: everything arrived intact"


def test_demo_notices_a_dead_rank_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sidecar_core._demo import DemoError, _recv_while_alive

    child = multiprocessing.get_context("spawn").Process(target=sys.exit, args=(3,))
    child.start()
    child.join()
    monkeypatch.setenv("SIDECAR_LOCALHOST__SOCKET_DIR", str(tmp_path / "sockets"))
    with Sidecar(SidecarConfig(sidecar_rank=0)) as sidecar, pytest.raises(DemoError) as error:
        _recv_while_alive(sidecar, child, "demo-hello", 0, timeout=30)
    assert str(error.value) == "rank 1 exited (code 3) before sending 'demo-hello'"


def test_demo_bad_setting_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SIDECAR_SEND_TIMEOUT", "-1")
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith('sidecar demo: SettingsError: invalid sidecar setting: SIDECAR_SEND_TIMEOUT="-1"')


def test_demo_unknown_transport_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--transport", "nope"]) == 2
    assert "unknown transport 'nope'" in capsys.readouterr().err


def test_demo_rejects_a_non_positive_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size-mib", "0"]) == 2
    assert "--size-mib must be a positive number of MiB" in capsys.readouterr().err


# -- bench ----------------------------------------------------------------------------------------


def test_bench_passes_its_arguments_through(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "sidecar bench" in capsys.readouterr().out
