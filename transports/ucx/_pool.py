"""Reusable host buffers for received payloads.

A fresh large host allocation is backed by new pages that fault in as UCX writes them, which costs
about as much as the transfer itself over shared memory. Buffers handed back through the inbox's
``release`` (after ``mark_done``, or once a part was copied) are kept, up to a byte limit, and given
to the next frame of the same size class, so steady traffic lands in memory that is already mapped.

Concurrency: loop thread only. Closing: :meth:`HostPool.clear` drops every idle buffer; buffers in
use are freed normally when their last user lets go.
"""

from __future__ import annotations

from collections import defaultdict

import torch

#: Frames smaller than this come from the ordinary allocator (the heap serves them cheaply).
MIN_POOLED = 1 << 20


def size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to 1/8 of its power of two (at most 12.5% slack)."""
    step = 1 << max(nbytes.bit_length() - 4, 0)
    return -(-nbytes // step) * step


class HostPool:
    """Idle host buffers by size class, at most ``limit`` bytes of them.

    Args:
        limit: Most bytes kept idle (0 turns pooling off).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._idle: defaultdict[int, list[torch.Tensor]] = defaultdict(list)
        self.idle_bytes = 0

    def take(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A flat uint8 CPU tensor of ``nbytes`` bytes and the pooled block behind it (``None``: not pooled)."""
        if self._limit == 0 or nbytes < MIN_POOLED:
            return torch.empty(nbytes, dtype=torch.uint8), None
        cls = size_class(nbytes)
        idle = self._idle.get(cls)
        if idle:
            block = idle.pop()
            self.idle_bytes -= cls
        else:
            block = torch.empty(cls, dtype=torch.uint8)
        return block[:nbytes], block

    def give(self, block: torch.Tensor) -> None:
        """Return a block from :meth:`take`; kept if it fits under the limit, else freed."""
        size = block.numel()
        if self.idle_bytes + size <= self._limit:
            self._idle[size].append(block)
            self.idle_bytes += size

    def clear(self) -> None:
        """Drop every idle block."""
        self._idle.clear()
        self.idle_bytes = 0
