"""What each side of a peer does during one measurement (run inside the worker processes).

Throughput, one transfer: the sender has a freshly made tensor (made before the clock starts);
the clock runs from the sender's ``send`` until the sender holds the receiver's acknowledgement.
The receiver acknowledges (a small int, over the same peer) once it holds the whole tensor on its
device, has checked its first and last byte and has released it. Latency, one round trip: the
sender sends a small object, the receiver echoes it back, over the same peer.
"""

from __future__ import annotations

import time

import torch

from sidecar_core._bench._endpoint import SMALL_OBJECTS, Endpoint, check_received, make_source


def _value(i: int) -> int:
    """The byte that fills transfer ``i`` (never 0, so that a zeroed buffer is caught)."""
    return i % 250 + 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def send_tensors(ep: Endpoint, peer: str, nbytes: int, warmup: int, count: int) -> list[float]:
    """Sender side of a throughput measurement; returns the timed transfers' durations in seconds.

    Raises:
        ValueError: The acknowledgement was not the one expected.
    """
    times: list[float] = []
    for i in range(warmup + count):
        source = make_source(nbytes, _value(i), ep.device)
        start = time.perf_counter()
        ep.send_tensor(source)
        ack = ep.recv_ack()
        elapsed = time.perf_counter() - start
        if ack != i:
            raise ValueError(f"{peer}: acknowledgement {ack!r} for transfer {i}, expected {i}")
        del source
        if i >= warmup:
            times.append(elapsed)
    return times


def recv_tensors(ep: Endpoint, peer: str, nbytes: int, warmup: int, count: int) -> None:
    """Receiver side of a throughput measurement.

    Raises:
        ValueError: A tensor arrived with the wrong size or bytes.
    """
    for i in range(warmup + count):
        tensor = ep.recv_tensor(nbytes)
        _sync(ep.device)
        check_received(tensor, nbytes, _value(i), peer)
        del tensor
        ep.release()
        ep.send_ack(i)


def send_objects(ep: Endpoint, peer: str, name: str, warmup: int, count: int) -> list[float]:
    """Sender side of a latency measurement; returns the timed round trips in seconds.

    Raises:
        ValueError: The echo differs from what was sent.
    """
    obj = SMALL_OBJECTS[name]
    times: list[float] = []
    for i in range(warmup + count):
        start = time.perf_counter()
        ep.send_obj(obj)
        echo = ep.recv_obj()
        elapsed = time.perf_counter() - start
        if echo != obj:
            raise ValueError(f"{peer}: the echo of {name} came back as {echo!r}")
        if i >= warmup:
            times.append(elapsed)
    return times


def echo_objects(ep: Endpoint, warmup: int, count: int) -> None:
    """Receiver side of a latency measurement: send every object straight back."""
    for _ in range(warmup + count):
        ep.send_obj(ep.recv_obj())
