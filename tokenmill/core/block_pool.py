"""BlockPool: the KV-cache blocks of one device, with reference counts and a prefix cache.

Pure Python, no torch. Every block is in exactly one of two states:

    used   ref_cnt > 0      held by one or more requests' block tables
    free   ref_cnt == 0     in `_free` (an ordered LRU queue), content maybe still cached

A free block that still carries a hash is a *cached* block: a new request whose prefix hashes
to it takes it back (ref_cnt 0 -> 1) without recomputing it. Allocation takes the least
recently freed block first and drops its hash, so cached blocks are evicted LRU.

Invariant (tested with hypothesis): num_free + num_used == num_blocks, and no block id is
both free and used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

BlockHash = int


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: must be >= 1")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}  # hash -> block id (used or free)
        self.hits = 0
        self.queries = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take n blocks (ref_cnt 0 -> 1), evicting the least recently freed cached blocks."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"need {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            h = self.block_hash[block_id]
            if h is not None:
                del self._cached[h]
                self.block_hash[block_id] = None
            self.ref_cnt[block_id] = 1
            out.append(block_id)
        return out

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding this hash's content, or None. Does not take a reference."""
        self.queries += 1
        block_id = self._cached.get(block_hash)
        if block_id is not None:
            self.hits += 1
        return block_id

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each (cached) block; free ones leave the free queue."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] == 0:
                del self._free[block_id]
            self.ref_cnt[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block. Blocks reaching 0 join the end of the LRU queue
        in the given order, so callers pass a request's blocks tail first: the tail of a
        sequence is the least likely to be shared and is evicted first."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] == 0:
                self._free[block_id] = None

    def cache(self, block_id: int, block_hash: BlockHash) -> None:
        """Record that a full block holds the content `block_hash` names. If another block
        already holds it, this one stays uncached (both stay valid)."""
        if not self.enable_prefix_caching or self.block_hash[block_id] is not None:
            return
        if block_hash in self._cached:
            return
        self._cached[block_hash] = block_id
        self.block_hash[block_id] = block_hash

    def reset_prefix_cache(self) -> None:
        for block_hash, block_id in list(self._cached.items()):
            self.block_hash[block_id] = None
        self._cached.clear()

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free)
        for block_id in range(self.num_blocks):
            assert self.ref_cnt[block_id] >= 0
            assert (self.ref_cnt[block_id] == 0) == (block_id in free), block_id
        for h, block_id in self._cached.items():
            assert self.block_hash[block_id] == h
        assert self.num_free + self.num_used == self.num_blocks
