"""Paged attention in plain PyTorch: the reference every faster kernel is tested against.

KV pool of one layer (one for K, one for V):

    cache[num_blocks, block_size, Hkv, D]       slot s = block * block_size + offset
    cache.view(-1, Hkv, D)[slot_mapping] = k     (write the step's new tokens)

A request's context is gathered through its block table, so its tokens need not be contiguous.
Runs on any device; numerics: softmax in float32. Decodes over plain pools run a fused kernel
instead where one is loaded: Triton on CUDA (triton_decode.py), C++ on the CPU
(kernels/csrc/decode_attention.cpp); both are tested against `_decode_attention`.

A pool may instead be a QuantizedKVPool (int8/fp8 codes with per-token, per-head scales,
tokenmill/quant/kv.py): writes quantize, and the gather below dequantizes to the compute dtype;
everything after the gather is the same code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.attention import triton_decode
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.quant.kv import QuantizedKVPool

KVPool = torch.Tensor | QuantizedKVPool


@dataclass(frozen=True)
class AttentionMetadata:
    """Where the step's T flattened tokens go and what each attends to.

    Requests with one new token (decodes) are batched in one gather; requests with several
    (prefill chunks) are computed one by one with SDPA."""

    slot_mapping: torch.Tensor  # [T] long: KV slot of each new token
    # decodes: token index in the flat batch, block tables padded with 0, context lengths
    decode_token_idx: torch.Tensor  # [B] long, ascending (all T tokens decodes: arange(T))
    decode_block_tables: torch.Tensor  # [B, max_blocks] long
    decode_ctx_lens: torch.Tensor  # [B] long
    # prefill chunks: (first token index, number of tokens, context length incl. them, blocks)
    prefills: list[tuple[int, int, int, torch.Tensor]]
    num_tokens: int


def write_kv(k_cache: KVPool, v_cache: KVPool, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K and V ([T, Hkv, D]) at their slots."""
    if isinstance(k_cache, QuantizedKVPool):
        k_cache.write(slot_mapping, k)
        v_cache.write(slot_mapping, v)
        return
    _, _, hkv, d = k_cache.shape
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_blocks(cache: KVPool, blocks: torch.Tensor) -> torch.Tensor:
    """cache[blocks]: [..., block_size, Hkv, D] in the compute dtype (dequantized if quantized)."""
    if isinstance(cache, QuantizedKVPool):
        return cache.gather(blocks)
    return cache[blocks]


def gather_kv(cache: KVPool, block_table: torch.Tensor, ctx_len: int) -> torch.Tensor:
    """A request's first ctx_len tokens of K or V, contiguous: [ctx_len, Hkv, D]."""
    _, bs, hkv, d = cache.shape
    return gather_blocks(cache, block_table).view(-1, hkv, d)[:ctx_len]


def paged_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                    meta: AttentionMetadata, scale: float, k: torch.Tensor | None = None,
                    v: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D] for the step's tokens, whose K/V are already written. Returns [T, H, D].

    k, v: the step's own K/V [T, Hkv, D] as written, if at hand. A prefill chunk with no cached
    context before it (a fresh prompt) then attends over them directly instead of gathering its
    blocks back: the same values for a plain pool of their dtype, two gathers fewer per request
    and layer (only there: a quantized pool holds rounded values, which later chunks read)."""
    t, h, d = q.shape
    hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    n_decode = meta.decode_token_idx.numel()
    if n_decode:
        decode = _decode_attention
        if not isinstance(k_cache, QuantizedKVPool) and k_cache.dtype == q.dtype:  # fused kernels stream the
            if q.is_cuda and triton_decode.available(q.device):                 # blocks: no gathered copy
                decode = triton_decode.paged_decode_attention
            elif q.device.type == "cpu" and cpu_kernels.available():
                decode = cpu_kernels.paged_decode_attention
        elif isinstance(k_cache, QuantizedKVPool):  # codes read in the kernel, no dequantized copy
            if q.is_cuda and triton_decode.quantized_available(q.device, k_cache.kind):
                decode = triton_decode.paged_decode_attention_quantized
            elif q.device.type == "cpu" and cpu_kernels.available():
                decode = cpu_kernels.paged_decode_attention_quantized
        if n_decode == t and not meta.prefills:  # all decodes, in order (the runner's layout): no scatter
            return decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens, scale)
        out[meta.decode_token_idx] = decode(
            q[meta.decode_token_idx], k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens, scale
        )
    fresh_ok = k is not None and not isinstance(k_cache, QuantizedKVPool) and k.dtype == k_cache.dtype
    for start, n, ctx_len, block_table in meta.prefills:
        if fresh_ok and ctx_len == n:  # nothing cached before the chunk: its K/V are the step's
            kc, vc = k[start : start + n], v[start : start + n]
        else:
            kc = gather_kv(k_cache, block_table, ctx_len)  # [S, Hkv, D]
            vc = gather_kv(v_cache, block_table, ctx_len)
        out[start : start + n] = _prefill_attention(q[start : start + n], kc, vc, scale, h // hkv)
    return out


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       group: int) -> torch.Tensor:
    """Causal attention of n new queries over S = past + n keys. q [n, H, D], k/v [S, Hkv, D].

    SDPA gets 4-d [1, heads, len, D] tensors: its fused kernels (flash on the CPU and on CUDA)
    take only those, and 3-d ones fall back to the unfused math path (on two CPU cores 1.3-3x
    slower at 128-1024 tokens). On the CPU, KV heads are shared by `group` query heads without
    copies (enable_gqa); on CUDA they are repeated, as the memory-efficient kernel (float32, or a
    mask) has no GQA."""
    n, s = q.shape[0], k.shape[0]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, n, D], [1, Hkv, S, D]
    gqa = group > 1 and not q.is_cuda
    if group > 1 and q.is_cuda:
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    if s == n:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        make = _make_chunk_mask if torch.compiler.is_compiling() else _chunk_mask  # traced graphs: no cache
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=make(n, s, q.dtype, q.device), scale=scale,
                                           enable_gqa=gqa)
    return o[0].transpose(0, 1)


def _make_chunk_mask(n: int, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask [n, S] of a chunk after S - n cached tokens: query i sits at position
    S - n + i and sees keys 0 .. S - n + i (0 there, -inf after)."""
    seen = torch.ones(n, s, dtype=torch.bool, device=device).tril(diagonal=s - n)
    return torch.zeros(n, s, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))


# The same for every layer of a step (SDPA would otherwise turn a boolean mask into this per call).
_chunk_mask = functools.lru_cache(maxsize=8)(_make_chunk_mask)


def _decode_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                      block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per request. q [B, H, D]; block_tables [B, nb]; returns [B, H, D]."""
    b, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    g = h // hkv
    s = block_tables.shape[1] * bs
    k = gather_blocks(k_cache, block_tables).view(b, s, hkv, d)  # [B, S, Hkv, D]
    v = gather_blocks(v_cache, block_tables).view(b, s, hkv, d)
    qg = q.reshape(b, hkv, g, d)  # q may be a strided view of the fused qkv output
    scores = torch.einsum("bhgd,bshd->bhgs", qg.float(), k.float()) * scale  # [B, Hkv, G, S]
    pad = torch.arange(s, device=q.device)[None, :] >= ctx_lens[:, None]  # [B, S]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o = torch.einsum("bhgs,bshd->bhgd", p, v.float())  # [B, Hkv, G, D]
    return o.reshape(b, h, d).to(q.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention over contiguous q/k/v [S, H(kv), D]: the oracle for tests."""
    h, hkv = q.shape[1], k.shape[1]
    return _prefill_attention(q, k, v, scale, h // hkv)
