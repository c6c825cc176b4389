"""Decode-attention cases shared by the kernel tests (Triton, C++): random queries and pools,
shuffled block tables with ragged context lengths, and pools poisoned where no request reads."""

from __future__ import annotations

import torch

BLOCK_SIZE = 16
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4},
       torch.float16: {"rtol": 5e-3, "atol": 5e-3},
       torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def make_case(b: int, hkv: int, g: int, d: int, dtype: torch.dtype, device: str, seed: int = 0,
              max_blocks: int = 6):
    """Random q and pool, shuffled block tables, ragged ctx_lens (1, block multiples, odd ones)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = b * max_blocks + 4  # spare blocks stay unused
    q = torch.randn(b, hkv * g, d, generator=gen)
    k = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen)
    v = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen)
    fixed = [1, BLOCK_SIZE, BLOCK_SIZE + 1, max_blocks * BLOCK_SIZE, 2 * BLOCK_SIZE - 3]
    ctx = torch.randint(1, max_blocks * BLOCK_SIZE + 1, (b,), generator=gen)
    ctx[: len(fixed)] = torch.tensor(fixed[:b])
    # block 0 is never used by a request, so it only appears as table padding
    perm = 1 + torch.randperm(num_blocks - 1, generator=gen)[: b * max_blocks]
    tables = perm.view(b, max_blocks).clone()  # [B, max_blocks]
    for i in range(b):
        tables[i, (int(ctx[i]) + BLOCK_SIZE - 1) // BLOCK_SIZE:] = 0
    q, k, v = (x.to(dtype).to(device) for x in (q, k, v))
    return q, k, v, tables.to(device), ctx.to(device)


def poison_unused(cache: torch.Tensor, tables: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """A copy of the pool with NaN in every slot no request reaches: the kernel must skip them."""
    nb, bs = cache.shape[:2]
    used = torch.zeros(nb * bs, dtype=torch.bool, device=cache.device)
    for i in range(tables.shape[0]):
        n = int(ctx[i])
        slots = (tables[i, :, None] * bs + torch.arange(bs, device=cache.device)).flatten()[:n]
        used[slots] = True
    out = cache.clone()
    out.view(nb * bs, -1)[~used] = float("nan")
    return out
