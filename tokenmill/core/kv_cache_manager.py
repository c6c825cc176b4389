"""KVCacheManager: per-request block tables over one BlockPool, with automatic prefix caching.

A request's block table maps its token positions to KV slots:

    position p  ->  block_table[p // block_size] * block_size + p % block_size   (the slot)

    tokens   | t0 .. t15 | t16 .. t31 | t32 t33 _ _ ... |
    table    |    b7     |    b2      |      b9         |     (b7, b2 full: hashed, shareable)

A full block's hash chains its tokens with its parent's hash, so equal hashes mean equal
prefixes: hash_i = hash((hash_{i-1}, tokens of block i)). Only blocks whose tokens are all
known and scheduled for computation are hashed: speculative drafts are not known tokens, so
their slots are never hashed, and `trim` gives back blocks that only held rejected drafts.
"""

from __future__ import annotations

from tokenmill.core.block_pool import BlockHash, BlockPool
from tokenmill.request import Request

_ROOT_HASH: BlockHash = hash("tokenmill-root")


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}  # hashes of the request's full blocks
        self._offered: dict[str, int] = {}  # leading table blocks already offered to the prefix cache

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def _hash_blocks(self, request: Request, upto_tokens: int) -> list[BlockHash]:
        """Extend the request's chain of full-block hashes to cover `upto_tokens` tokens."""
        hashes = self._hashes.setdefault(request.request_id, [])
        n_full = upto_tokens // self.block_size
        if len(hashes) < n_full:
            tokens = request.all_token_ids
            parent = hashes[-1] if hashes else _ROOT_HASH
            for i in range(len(hashes), n_full):
                chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
                parent = hash((parent, chunk))
                hashes.append(parent)
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks already holding this request's prefix (no references taken).

        At least one token is always left to compute, so the step produces logits."""
        if not self.enable_prefix_caching:
            return []
        hashes = self._hash_blocks(request, request.num_tokens - 1)
        blocks = []
        for h in hashes:
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None
    ) -> bool:
        """Make the block table cover num_computed_tokens (+ cached prefix) + num_new_tokens.

        Mutates the block table and pool only on success; returns False, changing nothing,
        when the pool has too few free blocks. On success the full blocks among the covered
        tokens are registered in the prefix cache."""
        rid, bs = request.request_id, self.block_size
        table = self.block_tables.get(rid, [])
        total = request.num_computed_tokens + num_new_tokens
        if cached_blocks:
            total += len(cached_blocks) * bs
            need = -(-total // bs) - len(table) - len(cached_blocks)
            # cached blocks sitting in the free queue count against the free budget when touched
            evictable_cached = sum(1 for b in cached_blocks if self.pool.ref_cnt[b] == 0)
            if need > self.pool.num_free - evictable_cached:
                return False
            self.pool.touch(cached_blocks)
            table = table + cached_blocks
        else:  # (a running request's step: the path taken once per request and step)
            need = -(-total // bs) - len(table)
            if need > self.pool.num_free:
                return False
        if need > 0:
            table = table + self.pool.allocate(need)
        self.block_tables[rid] = table
        if self.enable_prefix_caching:
            # only blocks whose tokens are all known and computed by the end of this step:
            # the chain may already be longer (find_cached_prefix hashes the whole prompt)
            # (each block once: re-offering a running request's whole table every step cost
            # ~0.2 ms per step at batch 64)
            n_full = min(total, request.num_tokens) // bs
            offered = self._offered.get(rid, 0)
            if n_full > offered:
                hashes = self._hash_blocks(request, n_full * bs)
                for i in range(offered, n_full):
                    self.pool.cache(table[i], hashes[i])
                self._offered[rid] = n_full
        return True

    def trim(self, request: Request) -> int:
        """Roll back speculative slots: drop the table's blocks past those that positions
        [0, request.num_computed_tokens) need, and return how many were released.

        Speculative decoding writes KV for k drafts beyond the request's real tokens; the
        scheduler then counts as computed only the positions whose tokens were accepted.
        Invariant after trim: len(table) == ceil(num_computed_tokens / block_size), every
        position below num_computed_tokens holds KV of the request's real tokens, and no hash
        covers a rejected slot: allocate_slots hashes only blocks full of tokens that were real
        when it ran, all below the new num_computed_tokens, so a trimmed block never carries a
        hash. Rejected slots inside the last kept block are overwritten when those positions are
        computed again, before num_computed_tokens passes them."""
        table = self.block_tables.get(request.request_id)
        keep = -(-request.num_computed_tokens // self.block_size)
        if not table or len(table) <= keep:
            return 0
        dropped = table[keep:]
        del table[keep:]
        if self._offered.get(request.request_id, 0) > keep:  # (never: hashed blocks hold computed tokens)
            self._offered[request.request_id] = keep
        self.pool.free(reversed(dropped))
        return len(dropped)

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first) and forget its table. Idempotent."""
        table = self.block_tables.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        self._offered.pop(request.request_id, None)
        if table:
            self.pool.free(reversed(table))

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def prefix_hit_rate(self) -> float:
        return self.pool.hits / self.pool.queries if self.pool.queries else 0.0
