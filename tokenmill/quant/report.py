"""One-line start-up notes on what the weights and the KV cache hold."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.quant.base import QuantLinear
from tokenmill.quant.int4 import Q8_LAYOUT, Int4Linear


def _kind(m: QuantLinear) -> str:
    return f"int4 g{m.group}" if isinstance(m, Int4Linear) else type(m).__name__.removesuffix("Linear").lower()


def weights_note(model: nn.Module, scheme: str, dtype: torch.dtype) -> str:
    """e.g. 'gguf: 210 int4 g32 + 1 int8 packed linears, 73.2 MiB resident; activations bfloat16',
    and "; CPU kernels: tokenmill's (no AVX-512)" where they run those (base.cpu_packed_kernel), or
    "; CPU kernels: tokenmill's, int4 layers with int8 activations" (base.cpu_int4_activations)."""
    kinds: Counter[str] = Counter()
    seen: set[int] = set()
    own = q8 = False
    for m in model.modules():
        if isinstance(m, QuantLinear) and id(m) not in seen:
            seen.add(id(m))
            kinds[_kind(m)] += 1
            own |= m.cpu_tile != 0 if isinstance(m, Int4Linear) else bool(getattr(m, "own_kernel", False))
            q8 |= isinstance(m, Int4Linear) and m.cpu_tile == Q8_LAYOUT
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    packed = " + ".join(f"{n} {k}" for k, n in kinds.most_common()) or "no"
    note = f"{scheme}: {packed} packed linears, {mib:.1f} MiB resident; activations {str(dtype).removeprefix('torch.')}"
    if q8:
        return note + "; CPU kernels: tokenmill's, int4 layers with int8 activations"
    return note + ("; CPU kernels: tokenmill's (no AVX-512)" if own else "")


def kv_cache_note(model: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str) -> str:
    """e.g. 'int8 + bf16 scale per token and head: 1.94x the tokens of bfloat16 in the same memory'."""
    from tokenmill.worker.kv_cache import bytes_per_token

    name = str(dtype).removeprefix("torch.")
    if kv_cache_dtype == "auto":
        return name
    ratio = bytes_per_token(model, dtype) / bytes_per_token(model, dtype, kv_cache_dtype)
    return f"{kv_cache_dtype} + bf16 scale per token and head: {ratio:.2f}x the tokens of {name} in the same memory"
