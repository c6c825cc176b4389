"""Bytes a decode step must move: the numerator of every bandwidth figure we print.

    decode bytes per step = resident weight bytes read once per step (every linear layer and
                            the LM head; the embedding table only for the rows looked up)
                          + KV bytes read: context tokens x 2 x layers x kv_heads x head_dim x bytes
    bound ms/token        = bytes per step / measured peak bandwidth
"""

from __future__ import annotations

import torch

from tokenmill.model.llama import LlamaForCausalLM


def weight_bytes_per_step(model: LlamaForCausalLM) -> int:
    """Bytes of weights one forward pass reads (tied embeddings counted once, as the LM head)."""
    seen: set[int] = set()
    total = 0
    embed = model.model.embed_tokens.weight
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is embed and not model.config.tie_word_embeddings:
            continue  # only looked-up rows are read
        total += p.numel() * p.element_size()
    return total


def resident_weight_bytes(model: LlamaForCausalLM) -> int:
    seen: set[int] = set()
    total = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_step(model: LlamaForCausalLM, context_tokens: int, dtype: torch.dtype) -> int:
    return model.config.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * context_tokens
