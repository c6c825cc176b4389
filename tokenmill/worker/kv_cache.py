"""Size and allocate the paged KV pool: per layer K and V of [num_blocks, block_size, Hkv, D]."""

from __future__ import annotations

import torch

from tokenmill.config import CacheConfig, ModelConfig


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for block_size tokens."""
    return model.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size


def num_blocks_for(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    return max(1, cache.memory_bytes // bytes_per_block(model, cache.block_size, dtype))


def allocate_kv_caches(model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    # zeros, not empty: padded decode reads multiply masked (0) probabilities by these values
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model.num_layers)
    ]
