"""Paged attention (scattered blocks, chunked queries, batched decodes) equals dense attention."""

from __future__ import annotations

import pytest
import torch

from tokenmill.attention.paged import (AttentionMetadata, _prefill_attention, dense_attention, paged_attention,
                                      write_kv)


def _random_case(seed: int, lens: list[int], new: list[int], h=6, hkv=2, d=16, bs=4, num_blocks=64):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(num_blocks, bs, hkv, d)
    v_cache = torch.zeros(num_blocks, bs, hkv, d)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered over the pool
    full = []
    tables = []
    for n in lens:
        q = torch.randn(n, h, d, generator=g)
        k = torch.randn(n, hkv, d, generator=g)
        v = torch.randn(n, hkv, d, generator=g)
        nb = -(-n // bs)
        tables.append([perm.pop() for _ in range(nb)])
        full.append((q, k, v))
    return k_cache, v_cache, full, tables


@pytest.mark.parametrize("pass_new_kv", [False, True], ids=["gathered", "fresh-prefills-from-step-kv"])
def test_paged_equals_dense_mixed_batch(pass_new_kv):
    """With the step's K/V passed, the fresh prefills (13 and 5 tokens) attend over them and the
    chunk after cached context still gathers; the cache is poisoned where the fresh prefills
    wrote, after writing, so a gather there would show."""
    lens = [13, 1 + 7, 5, 30, 9]
    new = [13, 1, 5, 4, 1]  # a full prefill, a decode, a prefill, a chunk after 26 cached, a decode
    bs, scale = 4, 16**-0.5
    k_cache, v_cache, full, tables = _random_case(0, lens, new, bs=bs)
    # the cached past of each request is written first
    for (q, k, v), table, n, m in zip(full, tables, lens, new):
        past = n - m
        if past:
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(past)])
            write_kv(k_cache, v_cache, k[:past], v[:past], slots)
    qs, ks, vs, slots, dec_idx, dec_tables, dec_lens, prefills = [], [], [], [], [], [], [], []
    t = 0
    for (q, k, v), table, n, m in zip(full, tables, lens, new):
        qs.append(q[n - m :]); ks.append(k[n - m :]); vs.append(v[n - m :])
        slots += [table[p // bs] * bs + p % bs for p in range(n - m, n)]
        if m == 1:
            dec_idx.append(t); dec_tables.append(table); dec_lens.append(n)
        else:
            prefills.append((t, m, n, torch.tensor(table)))
        t += m
    width = max(len(x) for x in dec_tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), decode_token_idx=torch.tensor(dec_idx),
        decode_block_tables=torch.tensor([x + [0] * (width - len(x)) for x in dec_tables]),
        decode_ctx_lens=torch.tensor(dec_lens), prefills=prefills, num_tokens=t,
    )
    q_all = torch.cat(qs)
    k_new, v_new = torch.cat(ks), torch.cat(vs)
    write_kv(k_cache, v_cache, k_new, v_new, meta.slot_mapping)
    if pass_new_kv:
        for start, m, n, table in prefills:
            if m == n:  # fresh: what it wrote is read from the step's K/V, not the pool
                fresh = meta.slot_mapping[start : start + m]
                k_cache.view(-1, *k_cache.shape[2:])[fresh] = float("nan")
                v_cache.view(-1, *v_cache.shape[2:])[fresh] = float("nan")
        out = paged_attention(q_all, k_cache, v_cache, meta, scale, k_new, v_new)
    else:
        out = paged_attention(q_all, k_cache, v_cache, meta, scale)
    t = 0
    for (q, k, v), n, m in zip(full, lens, new):
        ref = dense_attention(q, k, v, scale)[n - m :]
        torch.testing.assert_close(out[t : t + m], ref, atol=1e-5, rtol=1e-4)
        t += m


def test_dense_attention_matches_naive_softmax():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(7, 2, 8, generator=g) for _ in range(3))
    scores = torch.einsum("qhd,khd->hqk", q, k) * 0.5
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    torch.testing.assert_close(dense_attention(q, k, v, 0.5), ref, atol=1e-5, rtol=1e-5)


def _naive_chunk(q, k, v, scale):
    """q [n, H, D] at positions s - n .. s - 1 over k/v [S, Hkv, D], KV heads shared in order."""
    n, s, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    kh, vh = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), kh) * scale
    scores = scores.masked_fill(torch.ones(n, s, dtype=torch.bool).triu(s - n + 1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vh)


@pytest.mark.parametrize("n,s", [(9, 9), (5, 21)], ids=["fresh-prompt", "chunk-after-16-cached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_gqa_equals_naive_and_runs_fused(n, s, dtype):
    """9 query heads over 3 KV heads; SDPA's fused CPU kernel runs (3-d inputs fell back to the
    unfused math path)."""
    g = torch.Generator().manual_seed(n * s)
    q = torch.randn(n, 9, 64, generator=g).to(dtype)
    k, v = (torch.randn(s, 3, 64, generator=g).to(dtype) for _ in range(2))
    with torch.profiler.profile() as prof:
        out = _prefill_attention(q, k, v, 0.125, 3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), _naive_chunk(q, k, v, 0.125), atol=tol, rtol=tol)
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels, sorted(kernels)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,s", [(64, 64), (32, 96)], ids=["fresh-prompt", "chunk-after-64-cached"])
def test_prefill_attention_runs_fused_on_cuda(n, s):
    """bf16 on CUDA: flash (fresh prompt) or memory-efficient attention (masked chunk), never the
    math path; equal to the naive softmax within bf16 rounding."""
    g = torch.Generator().manual_seed(n + s)
    q = torch.randn(n, 9, 64, generator=g).bfloat16()
    k, v = (torch.randn(s, 3, 64, generator=g).bfloat16() for _ in range(2))
    with torch.profiler.profile() as prof:
        out = _prefill_attention(q.cuda(), k.cuda(), v.cuda(), 0.125, 3)
        torch.cuda.synchronize()
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in kernels, sorted(kernels)
    torch.testing.assert_close(out.float().cpu(), _naive_chunk(q, k, v, 0.125), atol=2e-2, rtol=2e-2)
