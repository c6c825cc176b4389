"""Bytes a decode step must move: the numerator of every bandwidth figure we print.

    decode bytes per step = weight bytes read once per step: every linear layer and the LM head
                            as stored (packed codes + scales for quantized layers, tokenmill.quant),
                            norms and biases; the embedding table only for the rows looked up
                            (a tied table is counted once, as the LM head)
                          + KV bytes read: context tokens x 2 x layers x kv_heads x
                            (head_dim x bytes per element [+ scale bytes when quantized])
    bound ms/token        = bytes per step / measured peak bandwidth
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.quant.base import QuantLinear


def _weights(module: nn.Module) -> Iterator[torch.Tensor]:
    """Parameters, and the packed buffers of quantized layers (not the RoPE tables)."""
    yield from module.parameters()
    for m in module.modules():
        if isinstance(m, QuantLinear):
            yield from m.buffers()


def _unique_bytes(tensors, skip: set[int] = frozenset()) -> int:
    seen: set[int] = set(skip)
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def weight_bytes_per_step(model: LlamaForCausalLM) -> int:
    """Bytes of weights one forward pass reads (tied embeddings counted once, as the LM head)."""
    skip: set[int] = set()
    if not model.config.tie_word_embeddings:  # only looked-up rows are read
        skip = {id(t) for t in _weights(model.model.embed_tokens)}
    return _unique_bytes(_weights(model), skip)


def resident_weight_bytes(model: LlamaForCausalLM) -> int:
    """Every parameter and buffer the model holds (packed weights as stored), each once."""
    return _unique_bytes([*model.parameters(), *model.buffers()])


def kv_bytes_per_step(model: LlamaForCausalLM, context_tokens: int, dtype: torch.dtype,
                      kv_cache_dtype: str = "auto") -> int:
    from tokenmill.worker.kv_cache import bytes_per_token

    return bytes_per_token(model.config, dtype, kv_cache_dtype) * context_tokens
