"""One side of the two-host ucx test (``tests/test_ucx_netns.py``), run inside a network namespace.

The sidecar is configured from the environment (``SIDECAR_RANK``, ``SIDECAR_PEERS``, ...). Usage::

    python tests/_ucx_netns_peer.py recv ID   # prints "ready", then the digest of what arrived, and
                                             # answers rank 0 with it; exits on a line on stdin
    python tests/_ucx_netns_peer.py send ID NBYTES SEED DST   # sends random bytes to DST, prints
                                                              # the digest sent and the answer
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from sidecar_core import Sidecar

WAIT = 30.0


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def main(argv: list[str]) -> None:
    role, id = argv[0], argv[1]
    with Sidecar() as sidecar:
        if role == "recv":
            print("ready", flush=True)
            received = sidecar.recv_sync(id, timeout=WAIT)
            answer = {"digest": digest(received), "nbytes": received.numel(), "rank": sidecar.sidecar_rank}
            sidecar.send(answer, f"{id}-answer", 0).result(WAIT)
            print(json.dumps(answer), flush=True)
            sys.stdin.readline()  # the sender has its answer: closing now loses nothing
        else:
            nbytes, seed, dst = int(argv[2]), int(argv[3]), int(argv[4])
            data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
            sidecar.send(data, id, dst).result(WAIT)
            answer = sidecar.recv_sync(f"{id}-answer", timeout=WAIT)
            print(json.dumps({"sent": digest(data), "answer": answer}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
