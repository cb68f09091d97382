"""``sidecar bench``: a smoke run with tiny sizes that checks the JSON and that every row ran.

Speed is never asserted here; the benchmark itself reports it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from sidecar_core._bench import main
from sidecar_core._bench._options import Options, parse_options, parse_size
from sidecar_core._bench._peers import PEERS
from sidecar_core._bench._runner import ROUNDS, Progress, Runner, _Pair, split_rounds

MACHINE_KEYS = {
    "date", "cpu_model", "cpu_cores", "cpu_cores_usable", "ram_bytes", "load_average", "os", "python", "packages",
    "cuda",
}  # fmt: skip
SETTINGS_KEYS = {"command", "device", "gpus", "sizes", "repeats", "round_trips", "peers", "baseline", "timing"}
THROUGHPUT_KEYS = {
    "kind", "peer", "src_device", "dst_device", "size_bytes", "size", "warmup", "transfers", "seconds", "median_s",
    "gbps", "baseline", "ratio", "peak_rss_bytes", "peak_cuda_bytes", "status", "reason",
}  # fmt: skip
LATENCY_KEYS = {
    "kind", "peer", "object", "warmup", "round_trips", "p50_us", "p99_us", "mean_us", "peak_rss_bytes", "status",
    "reason",
}  # fmt: skip
SIZES = [4096, 65536]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark chooses each peer's settings; the developer's SIDECAR_* exports must not leak in."""
    for key in list(os.environ):
        if key.upper().startswith(("SIDECAR_", "CORNSERVE_MOCK_SIDECAR")):
            monkeypatch.delenv(key)


def _only_file(folder: Path, suffix: str) -> Path:
    files = sorted(folder.glob(f"bench-*{suffix}"))
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    for module, why in (("zmq", "the zmq peer"), ("matplotlib", "the plot")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({why} needs it): pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("bench")
    code = main(["--sizes", "4KiB,64KiB", "--repeats", "1", "--round-trips", "5", "--out", str(out)])
    report = json.loads(_only_file(out, ".json").read_text())
    return code, report, out


@pytest.mark.multiprocess
def test_smoke_run_writes_the_documented_json(cpu_run: tuple[int, dict[str, Any], Path]) -> None:
    code, report, out = cpu_run
    assert set(report) == {"schema", "machine", "settings", "rows", "elapsed_s", "plot"}
    assert report["schema"] == "sidecar-bench/1"
    assert set(report["machine"]) == MACHINE_KEYS
    assert report["machine"]["cpu_cores"] >= 1
    assert report["machine"]["python"].count(".") == 2
    assert report["machine"]["packages"]["torch"] == importlib.metadata.version("torch")
    assert set(report["settings"]) == SETTINGS_KEYS
    assert report["settings"]["sizes"] == SIZES
    assert report["settings"]["baseline"] == "memcpy"
    assert report["settings"]["peers"] == [name for name, spec in PEERS.items() if "cpu" in spec.devices]
    for row in report["rows"]:
        assert set(row) == (THROUGHPUT_KEYS if row["kind"] == "throughput" else LATENCY_KEYS), row
    assert report["plot"] is not None
    assert (out / report["plot"]).stat().st_size > 0
    assert code == 0


@pytest.mark.multiprocess
def test_smoke_run_measured_every_peer_size_and_object(cpu_run: tuple[int, dict[str, Any], Path]) -> None:
    _, report, _ = cpu_run
    peers = report["settings"]["peers"]
    throughput = {(r["peer"], r["size_bytes"]): r for r in report["rows"] if r["kind"] == "throughput"}
    latency = {(r["peer"], r["object"]): r for r in report["rows"] if r["kind"] == "latency"}
    assert set(throughput) == {(p, s) for p in peers for s in SIZES}
    assert set(latency) == {(p, o) for p in peers if p != "memcpy" for o in ("int", "dict100")}
    not_ok = {key: row["reason"] for key, row in {**throughput, **latency}.items() if row["status"] != "ok"}
    assert not not_ok, not_ok
    opts = parse_options(["--sizes", "4KiB,64KiB", "--repeats", "1"])
    for (peer, size), row in throughput.items():
        assert len(row["seconds"]) == row["transfers"] >= 1
        assert row["warmup"] == sum(warm for warm, _ in split_rounds(*opts.transfers(size)))
        assert row["gbps"] == pytest.approx(size / row["median_s"] / 1e9)
        assert row["ratio"] == pytest.approx(row["gbps"] / throughput[("memcpy", size)]["gbps"])
        roles = {"solo"} if peer == "memcpy" else {"send", "recv"}
        assert set(row["peak_rss_bytes"]) == roles
        assert all(v > size for v in row["peak_rss_bytes"].values())
    for row in latency.values():
        assert row["round_trips"] == 5
        assert 0 < row["p50_us"] <= row["p99_us"]


def test_sizes_and_transfer_counts() -> None:
    assert [parse_size(s) for s in ("4096", "4KiB", "64M", "1GiB", "2 KiB")] == [4096, 4096, 64 << 20, 1 << 30, 2048]
    for bad in ("0", "-1KiB", "4KB", "big"):
        with pytest.raises(ValueError, match="bad size"):
            parse_size(bad)
    opts: Options = parse_options([])
    assert opts.sizes == [4 << 10, 1 << 20, 64 << 20, 512 << 20]
    assert [opts.transfers(s) for s in opts.sizes] == [(20, 100), (20, 100), (3, 16), (1, 5)]
    quick = parse_options(["--quick", "--repeats", "3"])
    assert (quick.repeats, quick.round_trips, quick.sizes) == (3, 50, [4 << 10, 64 << 10, 1 << 20])


@pytest.mark.parametrize(("warmup", "count"), [(20, 100), (3, 16), (1, 5), (1, 2), (1, 1), (5, 50)])
def test_rounds_spread_the_timed_transfers_evenly(warmup: int, count: int) -> None:
    rounds = split_rounds(warmup, count)
    assert len(rounds) == min(ROUNDS, count)
    assert sum(timed for _, timed in rounds) == count
    assert max(timed for _, timed in rounds) - min(timed for _, timed in rounds) <= 1
    assert rounds[0][0] == warmup
    assert all(warm == max(1, warmup // ROUNDS) for warm, _ in rounds[1:])


def test_peers_alternate_round_by_round(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The runner sends round 1 of every peer, then round 2 of every peer: a drift slows them alike."""
    issued: list[tuple[str, str, int]] = []

    def run(pair: _Pair, command: tuple[Any, ...], timeout: float) -> list[dict[str, Any]]:
        kind, timed = command[0], command[3]
        issued.append((pair.spec.name, kind, timed))
        workers = 1 if pair.spec.is_ceiling else 2
        result = {"seconds": [0.001 * (len(issued))] * timed, "peak_rss_bytes": 1 << 20, "peak_cuda_bytes": None}
        return [dict(result) for _ in range(workers)]

    monkeypatch.setattr(_Pair, "run", run)
    monkeypatch.setattr(_Pair, "close", lambda pair: None)
    opts = parse_options(["--sizes", "64MiB", "--repeats", "2", "--round-trips", "8", "--peers", "tcp,mp-queue"])
    peers = [PEERS[name] for name in ("memcpy", "tcp", "mp-queue")]
    rows = Runner(opts, Progress(9)).run(peers)
    size_rounds = split_rounds(*opts.transfers(64 << 20))
    expected = [(name, "throughput", timed) for _, timed in size_rounds for name in ("memcpy", "tcp", "mp-queue")]
    latency_rounds = split_rounds(5, 8)
    for _ in ("int", "dict100"):
        expected += [(name, "latency", timed) for _, timed in latency_rounds for name in ("tcp", "mp-queue")]
    assert issued == expected
    assert len(size_rounds) == ROUNDS
    tcp = next(r for r in rows if r["peer"] == "tcp" and r["kind"] == "throughput")
    assert len(tcp["seconds"]) == tcp["transfers"] == sum(timed for _, timed in size_rounds)
    assert [r["peer"] for r in rows] == ["memcpy", "tcp", "tcp", "tcp", "mp-queue", "mp-queue", "mp-queue"]
    assert "64MiB: round 2 of 4" in capsys.readouterr().err


def test_unknown_peer_is_refused_with_the_valid_names(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--peers", "tcp,carrier-pigeon", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown peer(s) carrier-pigeon" in err
    assert "sidecar-localhost" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("scale", ["nan", "inf", "0"])
def test_a_timeout_scale_that_is_not_a_positive_number_is_refused(
    scale: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_options(["--timeout-scale", scale, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "--timeout-scale must be a positive, finite number" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(SystemExit) as info:
        parse_options(["--out", str(blocked / "results")])
    assert info.value.code == 2
    assert f"--out {blocked / 'results'}: " in capsys.readouterr().err


def test_cpu_only_peer_is_refused_on_cuda(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--device", "cuda", "--peers", "tcp", "--out", str(tmp_path)]) == 2
    assert "do not run with --device cuda" in capsys.readouterr().err


def test_cuda_without_a_device_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; this checks the message given without one")
    assert main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cuda needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.multiprocess
def test_cuda_smoke_run(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpus = "0,1" if torch.cuda.device_count() > 1 else "0"
    code = main(["--device", "cuda", "--gpus", gpus, "--sizes", "1MiB", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads(_only_file(tmp_path, ".json").read_text())
    not_ok = {(r["peer"], r["dst_device"]): r["reason"] for r in report["rows"] if r["status"] != "ok"}
    assert not not_ok, not_ok
    assert code == 0
    pairs = {(r["src_device"], r["dst_device"]) for r in report["rows"]}
    assert pairs == {("cuda:0", f"cuda:{g}") for g in gpus.split(",")}
    assert all(r["kind"] == "throughput" and r["baseline"] == "cuda-d2d" for r in report["rows"])
