"""ucxx's own receive paths for one large message, side by side: do any allocate and post at speed?

The ucx transport receives a frame in two steps: a small header message, which its Python code
reads, allocates memory for and posts the payload's receive into, then the payload itself. ucxx
offers two ways to move a message whose receiver does not know its size in advance, both of which
allocate the receive buffer and post the receive in its compiled code, with no Python in between:

* ``multi``: ``send_multi`` / ``recv_multi`` (a header message naming each buffer's size and memory
  type, then the buffers, all under one tag);
* ``am``: active messages, ``am_send`` / ``am_recv``.

A fourth way, ``header``, is the least any receiver that does not know the size must do in Python:
a small tagged header message naming the size, read by the receiver's Python code, which then
allocates the memory and posts the payload's receive (the sender sends both at once). It is the
floor of the transport's own design, without its checks, store and acknowledgements.

This script times them against the benchmark's raw ucxx loop (``tag``: a tagged ``send`` into a
buffer the receiver allocated once, its receive posted as soon as the last acknowledgement left).
Rank 0 sends a tensor, rank 1 receives it, checks its first and last byte and sends back 8 bytes;
rank 0 times that round trip. The three ways take turns, twice, in one pair of processes::

    python benchmarks/ucxx_receive_paths.py [BYTES] [TRANSFERS] [DEVICE]    # e.g. 1073741824 10 cuda

``DEVICE`` (default ``cuda`` where there is one, else ``cpu``) holds both tensors. The first fifth
of each turn's transfers warm up and are not counted. The progress mode is
``SIDECAR_UCX__PROGRESS_MODE`` (default ``blocking``), as for the transport and ``sidecar bench``.
``UCX_PROTO_INFO=y`` shows which protocol and memory UCX picked for each way.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import statistics
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy
import torch

T = TypeVar("T")

#: The ways, in the order they take turns.
WAYS = ("tag", "header", "multi", "am")
#: How many times each way takes its turn.
TURNS = 2
#: Seconds the whole run, and any one wait in it, may take before it is given up.
WAIT = 600.0


class _Peer:
    """One ucxx endpoint on a private event loop, driven from this (the only) thread."""

    def __init__(self, device: str) -> None:
        if device == "cuda":
            torch.cuda.set_device(0)
        import ucxx

        self.ucxx: Any = ucxx
        self.device = device
        self.loop = asyncio.new_event_loop()
        mode = os.environ.get("SIDECAR_UCX__PROGRESS_MODE", "blocking")
        self.run(self._init(mode))

    async def _init(self, mode: str) -> None:
        self.ucxx.init(progress_mode=mode, enable_python_future=mode.startswith("thread"))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, WAIT))

    def array(self, tensor: torch.Tensor) -> Any:
        """What ucxx takes: CUDA tensors as they are, host tensors as NumPy arrays."""
        return tensor if tensor.is_cuda else tensor.numpy()

    def tensor(self, received: Any) -> torch.Tensor:
        """A buffer ucxx allocated, as a byte tensor over the same memory."""
        if self.device == "cuda":
            return torch.as_tensor(received, device="cuda")
        return torch.frombuffer(received, dtype=torch.uint8)


def _receiver(nbytes: int, transfers: int, device: str, ports: Any) -> None:
    peer = _Peer(device)
    accepted: asyncio.Future[Any] = peer.loop.create_future()

    async def accept(endpoint: Any) -> None:
        accepted.set_result(endpoint)

    async def listen() -> Any:
        return peer.ucxx.create_listener(accept)

    listener = peer.run(listen())
    ports.put(listener.port)
    ep = peer.run(_wait(accepted))
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ack = numpy.zeros(1, dtype=numpy.int64)
    for _ in range(TURNS):
        for way in WAYS:
            for i in range(transfers):
                if way == "tag":
                    peer.run(ep.recv(peer.array(buffer)))
                    got = buffer
                elif way == "header":
                    got = peer.run(_header_then_payload(peer, ep, i))
                elif way == "multi":
                    header, payload = peer.run(ep.recv_multi())
                    got = peer.tensor(payload)
                    if bytes(memoryview(header)) != _header(i, nbytes):
                        raise AssertionError(f"multi: transfer {i} brought the wrong header")
                else:
                    got = peer.tensor(peer.run(ep.am_recv()))
                if got.numel() != nbytes or int(got[0]) != i % 251 or int(got[-1]) != i % 251:
                    raise AssertionError(f"{way}: transfer {i} arrived wrong ({got.numel()} bytes)")
                ack[0] = i
                peer.run(ep.send(ack))


async def _header_then_payload(peer: _Peer, ep: Any, i: int) -> torch.Tensor:
    """Receive the ``header`` way's header, then allocate and receive the payload it names."""
    head = numpy.empty(len(_header(i)), dtype=numpy.uint8)
    await ep.recv(head)
    size = int(bytes(head[:16]).decode())
    got = torch.empty(size, dtype=torch.uint8, device=peer.device)
    await ep.recv(peer.array(got))
    return got


async def _header_and_payload(peer: _Peer, ep: Any, header: Any, tensor: torch.Tensor) -> None:
    """Send the ``header`` way's header and payload at once (they match the receives in this order)."""
    await asyncio.gather(ep.send(header), ep.send(peer.array(tensor)))


async def _wait(future: asyncio.Future[T]) -> T:
    return await future


def _header(i: int, nbytes: int = 0) -> bytes:
    """The multi and header ways' header: a stand-in for a frame header (200 bytes; the size first)."""
    return f"{nbytes:016d}{i:08d}".encode().ljust(200, b".")


def _sender(nbytes: int, transfers: int, device: str, ports: Any, results: Any) -> None:
    peer = _Peer(device)
    ep = peer.run(peer.ucxx.create_endpoint("127.0.0.1", ports.get(timeout=WAIT)))
    tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ack = numpy.zeros(1, dtype=numpy.int64)
    for _ in range(TURNS):
        for way in WAYS:
            times = []
            for i in range(transfers):
                tensor[0] = tensor[-1] = i % 251
                if tensor.is_cuda:
                    torch.cuda.synchronize()
                header = numpy.frombuffer(_header(i, nbytes), dtype=numpy.uint8)
                start = time.perf_counter()
                if way == "tag":
                    peer.run(ep.send(peer.array(tensor)))
                elif way == "header":
                    peer.run(_header_and_payload(peer, ep, header, tensor))
                elif way == "multi":
                    peer.run(ep.send_multi((header, peer.array(tensor))))
                else:
                    peer.run(ep.am_send(peer.array(tensor)))
                peer.run(ep.recv(ack))
                times.append(time.perf_counter() - start)
                if ack[0] != i:
                    raise AssertionError(f"{way}: acknowledgement {ack[0]} for transfer {i}")
            results.put((way, statistics.median(times[transfers // 5 :])))


def main(argv: list[str]) -> int:
    nbytes = int(argv[1]) if len(argv) > 1 else 1 << 20
    transfers = int(argv[2]) if len(argv) > 2 else 20
    device = argv[3] if len(argv) > 3 else ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = multiprocessing.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_receiver, args=(nbytes, transfers, device, ports), daemon=True),
        ctx.Process(target=_sender, args=(nbytes, transfers, device, ports, results), daemon=True),
    ]
    for proc in procs:
        proc.start()
    print(f"{nbytes} bytes on {device}, p50 of {transfers - transfers // 5} round trips per turn")
    deadline = time.monotonic() + WAIT
    printed = 0
    while printed < TURNS * len(WAYS):
        try:
            way, seconds = results.get(timeout=1.0)
        except queue.Empty:
            failed = any(proc.exitcode not in (None, 0) for proc in procs)
            if failed or time.monotonic() > deadline:
                for proc in procs:
                    proc.terminate()
                why = "a process failed" if failed else f"no result within {WAIT:g}s"
                print(f"{why} (exit codes {[proc.exitcode for proc in procs]})", file=sys.stderr)
                return 1
            continue
        print(f"{way:6s} {seconds * 1e6:10.0f} us  {nbytes / seconds / 1e9:9.2f} GB/s", flush=True)
        printed += 1
    for proc in procs:
        proc.join(WAIT)
    if any(proc.exitcode != 0 for proc in procs):
        print(f"a process failed (exit codes {[proc.exitcode for proc in procs]})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
