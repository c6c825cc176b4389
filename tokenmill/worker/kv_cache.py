"""Size and allocate the paged KV pool: per layer K and V of [num_blocks, block_size, Hkv, D].

With kv_cache_dtype int8 or fp8 each pool is a QuantizedKVPool (1-byte codes plus one bf16
scale per token and KV head, tokenmill/quant/kv.py); sizing counts the scale bytes.
"""

from __future__ import annotations

import torch

from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.quant.kv import QuantizedKVPool


def bytes_per_token(model: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """K and V of every layer for one token, scales included."""
    if kv_cache_dtype == "auto":
        return model.kv_bytes_per_token(torch.finfo(dtype).bits // 8)
    return 2 * model.num_layers * model.num_kv_heads * QuantizedKVPool.bytes_per_token_head(model.head_dim)


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype,
                    kv_cache_dtype: str = "auto") -> int:
    """K and V of every layer for block_size tokens."""
    return bytes_per_token(model, dtype, kv_cache_dtype) * block_size


def num_blocks_for(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                   kv_cache_dtype: str = "auto") -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    return max(1, cache.memory_bytes // bytes_per_block(model, cache.block_size, dtype, kv_cache_dtype))


def allocate_kv_caches(model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device, kv_cache_dtype: str = "auto") -> list[tuple]:
    """One (K, V) pair per layer: tensors in `dtype`, or QuantizedKVPools that read as `dtype`."""
    if kv_cache_dtype != "auto":
        return [
            tuple(QuantizedKVPool(num_blocks, block_size, model.num_kv_heads, model.head_dim, kv_cache_dtype,
                                  dtype, device) for _ in range(2))
            for _ in range(model.num_layers)
        ]
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    # zeros, not empty: padded decode reads multiply masked (0) probabilities by these values
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model.num_layers)
    ]
