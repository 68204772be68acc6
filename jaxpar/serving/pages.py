"""The KV cache's page pool on the host: which pages are free, with reference counts (a page shared by requests
with a common prefix is freed when its last user lets it go).

The device pool is split in blocks, one per (batch shard, seq device): a slot's pages come from its batch
shard's blocks, and a request's logical page j from the block of seq device j % n (parallel/paged.py). Page
numbers are local to their block."""
from __future__ import annotations

import numpy as np


class PagePool:
    def __init__(self, batch_shards: int, seq_shards: int, pages_per_block: int):
        self.seq_shards, self.pages_per_block = seq_shards, pages_per_block
        # free pages of each block, lowest first (the order pages are handed out in is deterministic)
        self._free = [[list(range(pages_per_block - 1, -1, -1)) for _ in range(seq_shards)]
                      for _ in range(batch_shards)]
        self.refs = np.zeros((batch_shards, seq_shards, pages_per_block), np.int32)

    def free_pages(self, shard: int) -> int:
        """Pages free in a batch shard (the smallest block's count times the blocks: a request's pages take
        every block in turn)."""
        return min(len(f) for f in self._free[shard]) * self.seq_shards

    def can_allocate(self, shard: int, first: int, count: int) -> bool:
        """Whether logical pages first .. first+count-1 of a request in `shard` can be had."""
        need = np.bincount([(first + j) % self.seq_shards for j in range(count)], minlength=self.seq_shards)
        return all(len(f) >= k for f, k in zip(self._free[shard], need))

    def allocate(self, shard: int, first: int, count: int) -> list[int]:
        """Pages for logical pages first .. first+count-1 (check can_allocate first)."""
        out = []
        for j in range(first, first + count):
            block = j % self.seq_shards
            page = self._free[shard][block].pop()
            self.refs[shard, block, page] += 1
            out.append(page)
        return out

    def release(self, shard: int, pages: list[int], first: int = 0) -> None:
        """Drop one reference to each of a request's pages (its logical pages first, first + 1, ...)."""
        for j, page in enumerate(pages, start=first):
            block = j % self.seq_shards
            self.refs[shard, block, page] -= 1
            if self.refs[shard, block, page] == 0:
                self._free[shard][block].append(page)

    def in_use(self) -> int:
        return int((self.refs > 0).sum())

    @property
    def capacity(self) -> int:
        return self.refs.size
