"""Quick measurements of the localhost transport against in-process copy baselines.

Rank 0 runs in this process and sends; rank 1 is a real peer process that receives and calls
``mark_done``. Every figure is the median of repeats (small objects: p50 and p99), and the
baselines are measured in the same run::

    python benchmarks/localhost_probe.py                       # 64 MiB CPU tensors, small objects
    python benchmarks/localhost_probe.py --device cuda:0 --recv-device cuda:1   # staged GPU to GPU
    python benchmarks/localhost_probe.py --device cuda:0 --recv-device cuda:1 --cuda-ipc

"send" is the time from ``send()`` to its future resolving, which happens once the receiver's store
holds the decoded tensor (on the receiving GPU for a CUDA receive device). ``wait_setup`` is what a
thread waiting in ``recv_sync`` spends taking the sockets from the loop and giving them back, with
nothing to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidecar_core import Sidecar, SidecarConfig
from sidecar_core.testing import PeerProcess
from transports.localhost import LocalhostTransport
from transports.localhost._copy import default_copy_threads


def _median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memcpy_baselines(nbytes: int, repeats: int) -> dict[str, float]:
    """GB/s of a single-thread memcpy (numpy) and of torch's multi-threaded copy, destination pre-faulted."""
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = 1
    single = _median_seconds(lambda: np.copyto(dst, src), repeats)
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    multi = _median_seconds(lambda: tdst.copy_(tsrc), repeats)
    return {
        "memcpy_1thread_GBps": nbytes / single / 1e9,
        f"torch_copy_{torch.get_num_threads()}threads_GBps": nbytes / multi / 1e9,
    }


def h2d_baseline(nbytes: int, device: str, repeats: int) -> dict[str, float]:
    """GB/s of pinned host to device and device to host copies in this process."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def h2d() -> None:
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)

    def d2h() -> None:
        host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize(device)

    h2d()
    d2h()
    return {
        "pinned_h2d_GBps": nbytes / _median_seconds(h2d, repeats) / 1e9,
        "pinned_d2h_GBps": nbytes / _median_seconds(d2h, repeats) / 1e9,
    }


# -- functions run in the peer process -----------------------------------------------------------


def drain(sidecar: Sidecar, prefix: str, count: int, expect_device: str) -> list[str]:
    """Receive ``prefix0..`` and release each; return the devices seen."""
    devices = set()
    for i in range(count):
        value = sidecar.recv_sync(f"{prefix}{i}")
        if isinstance(value, torch.Tensor):
            devices.add(str(value.device))
        sidecar.mark_done_sync(f"{prefix}{i}")
    return sorted(devices)


def echo(sidecar: Sidecar, prefix: str, count: int) -> None:
    """Send every object received back to rank 0."""
    for i in range(count):
        value = sidecar.recv_sync(f"{prefix}{i}")
        sidecar.mark_done_sync(f"{prefix}{i}")
        sidecar.send(value, f"{prefix}back{i}", 0).result()


# -- measurements --------------------------------------------------------------------------------


def tensor_transfer(
    sidecar: Sidecar, peer: PeerProcess, tensor: torch.Tensor, repeats: int, tag: str
) -> dict[str, Any]:
    """Median send time; for CPU tensors also the median ratio to a memcpy timed just before each send.

    The interleaved memcpy sees the same load as the send it is paired with, which keeps the ratio
    meaningful on a busy host.
    """
    warmup = 3
    nbytes = tensor.numel() * tensor.element_size()
    host = tensor.device.type == "cpu"
    src = tensor.numpy() if host else None
    dst = np.ones(nbytes, dtype=np.uint8) if host else None
    call = peer.submit(drain, tag, warmup + repeats, "")
    times, ratios = [], []
    for i in range(warmup + repeats):
        if src is not None and dst is not None:
            start = time.perf_counter()
            np.copyto(dst, src)
            copy_seconds = time.perf_counter() - start
        start = time.perf_counter()
        sidecar.send(tensor, f"{tag}{i}", 1).result(120)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            if host:
                ratios.append(copy_seconds / times[-1])
    devices = call.result(120)
    seconds = statistics.median(times)
    result = {"seconds": seconds, "GBps": nbytes / seconds / 1e9, "recv_devices": devices}
    if ratios:
        result["vs_interleaved_memcpy_1thread"] = statistics.median(ratios)
    return result


def small_latency(sidecar: Sidecar, peer: PeerProcess, obj: object, repeats: int, tag: str) -> dict[str, float]:
    call = peer.submit(drain, tag, repeats, "")
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        sidecar.send(obj, f"{tag}{i}", 1).result(30)
        times.append(time.perf_counter() - start)
    call.result(60)
    times = times[repeats // 10 :]
    times.sort()
    return {"p50_us": times[len(times) // 2] * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6}


def transport_rtt(sidecar: Sidecar, peer: PeerProcess, obj: object, repeats: int, tag: str) -> dict[str, float]:
    """p50 of ``transport.send`` alone, timed on the sidecar's loop thread (no thread hops, no core)."""
    frames = [
        sidecar.codec.frames(obj, id=f"{tag}{i}", chunk_id=0, num_chunks=1, src=0, max_part_bytes=None)[0]
        for i in range(repeats)
    ]
    transport = sidecar._transport

    async def run() -> list[float]:
        times = []
        for frame in frames:
            start = time.perf_counter()
            await transport.send(1, frame)
            times.append(time.perf_counter() - start)
        return times

    call = peer.submit(drain, tag, repeats, "")
    times = sorted(sidecar._loop_thread.call(run())[repeats // 10 :])
    call.result(60)
    return {"p50_us": times[len(times) // 2] * 1e6}


def wait_cost(sidecar: Sidecar, repeats: int) -> dict[str, float]:
    """p50 of a waiting thread's set-up and hand-back of the sockets alone (nothing to read, ready at once).

    What ``recv_sync`` spends on the sockets around each wait for a chunk that has not arrived yet
    (see ``transports/localhost/_readers.py``), here over the open connections to the peer.
    """
    readers = sidecar._transport._readers  # type: ignore[attr-defined]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        readers.poll_here(lambda: True, 0.001)
        times.append(time.perf_counter() - start)
    times = sorted(times[repeats // 10 :])
    return {"p50_us": times[len(times) // 2] * 1e6}


def echo_latency(sidecar: Sidecar, peer: PeerProcess, obj: object, repeats: int, tag: str) -> dict[str, float]:
    call = peer.submit(echo, tag, repeats)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        sidecar.send(obj, f"{tag}{i}", 1).result(30)
        sidecar.recv_sync(f"{tag}back{i}")
        times.append(time.perf_counter() - start)
        sidecar.mark_done_sync(f"{tag}back{i}")
    call.result(60)
    times = sorted(times[repeats // 10 :])
    return {"p50_us": times[len(times) // 2] * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--small-repeats", type=int, default=2000)
    parser.add_argument("--device", default="cpu", help="where the sent tensor lives (cpu, cuda:N)")
    parser.add_argument("--recv-device", default="cpu", help="SIDECAR_RECV_DEVICE of the receiver")
    parser.add_argument("--cuda-ipc", action="store_true", help="SIDECAR_LOCALHOST__CUDA_IPC=1 on both sides")
    parser.add_argument(
        "--copy-threads", type=int, default=0, help="SIDECAR_LOCALHOST__COPY_THREADS of the sender (0: automatic)"
    )
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    nbytes = args.size_mib << 20
    results: dict[str, Any] = {
        "size_MiB": args.size_mib,
        "device": args.device,
        "recv_device": args.recv_device,
        "cuda_ipc": args.cuda_ipc,
        "copy_threads": args.copy_threads or f"auto ({default_copy_threads()})",
        "cpus": os.cpu_count(),
    }
    results.update(memcpy_baselines(nbytes, args.repeats))
    if args.device.startswith("cuda"):
        results.update(
            h2d_baseline(nbytes, args.recv_device if args.recv_device.startswith("cuda") else args.device, args.repeats)
        )

    workdir = Path(tempfile.mkdtemp(prefix="sidecar-probe-"))
    env = {
        **LocalhostTransport.test_environment(workdir),
        "SIDECAR_TRANSPORT": "localhost",
        "SIDECAR_LOCALHOST__CUDA_IPC": "1" if args.cuda_ipc else "0",
        "SIDECAR_LOCALHOST__COPY_THREADS": str(args.copy_threads),
    }
    os.environ.update(env)
    peer = PeerProcess(1, {**env, "SIDECAR_RECV_DEVICE": args.recv_device})
    try:
        with Sidecar(SidecarConfig(sidecar_rank=0)) as sidecar:
            tensor = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=args.device)
            transfer = tensor_transfer(sidecar, peer, tensor, args.repeats, "t")
            results["transfer"] = transfer
            base = results.get("pinned_h2d_GBps") or results["memcpy_1thread_GBps"]
            results["transfer_vs_baseline"] = transfer["GBps"] / base
            if not args.skip_small:
                results["send_int"] = small_latency(sidecar, peer, 7, args.small_repeats, "i")
                results["send_dict100"] = small_latency(sidecar, peer, {"k": "v" * 90}, args.small_repeats, "d")
                results["transport_rtt_int"] = transport_rtt(sidecar, peer, 7, args.small_repeats, "r")
                results["echo_int"] = echo_latency(sidecar, peer, 7, args.small_repeats // 2, "e")
                results["wait_setup"] = wait_cost(sidecar, args.small_repeats * 5)
    finally:
        peer.close()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
