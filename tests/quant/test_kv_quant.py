"""Quantized KV pool: writes quantize with per-(token, head) scales, the gather dequantizes, and
paged attention over it equals dense attention over the dequantized K/V."""

from __future__ import annotations

import pytest
import torch

from tokenmill.attention.paged import AttentionMetadata, dense_attention, paged_attention, write_kv
from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.quant.kv import QuantizedKVPool, dequantize_kv, quantize_kv
from tokenmill.quant.report import kv_cache_note
from tokenmill.worker.kv_cache import allocate_kv_caches, bytes_per_block, num_blocks_for

SMOL = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                   num_heads=9, num_kv_heads=3, head_dim=64)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_kv_round_trip_error(kind):
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10  # scales differ per token and head
    codes, scale = quantize_kv(x, kind)
    back = dequantize_kv(codes, scale, torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    if kind == "int8":  # half a step of amax/127, the step from the bf16-rounded scale
        assert ((back - x).abs() <= 0.5 * amax / 127 * (1 + 2**-7) + 1e-6).all()
    else:  # e4m3: 3 mantissa bits, so 2^-4 relative for values above the subnormal range
        big = x.abs() > amax / 64
        assert ((back - x).abs()[big] <= 2**-4 * x.abs()[big] + 1e-6).all()


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_over_quantized_pool(kind, dtype):
    """A prefill chunk after cached tokens and a batch of decodes over scattered blocks."""
    g = torch.Generator().manual_seed(0)
    h, hkv, d, bs, nblocks = 6, 2, 64, 4, 32
    pools = [QuantizedKVPool(nblocks, bs, hkv, d, kind, dtype, torch.device("cpu")) for _ in range(2)]
    lens, new = [13, 9, 22], [5, 1, 1]
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in lens]
    data = [tuple(torch.randn(n, hh, d, generator=g).to(dtype) for hh in (h, hkv, hkv)) for n in lens]
    slots_of = lambda table, ps: torch.tensor([table[p // bs] * bs + p % bs for p in ps])
    for (q, k, v), table, n, m in zip(data, tables, lens, new):  # the cached past
        write_kv(*pools, k[: n - m], v[: n - m], slots_of(table, range(n - m)))
    slots = torch.cat([slots_of(t, range(n - m, n)) for t, n, m in zip(tables, lens, new)])
    meta = AttentionMetadata(
        slot_mapping=slots, decode_token_idx=torch.tensor([5, 6]),
        decode_block_tables=torch.tensor([tables[1] + [0] * (len(tables[2]) - len(tables[1])), tables[2]]),
        decode_ctx_lens=torch.tensor(lens[1:]), prefills=[(0, 5, 13, torch.tensor(tables[0]))], num_tokens=7,
    )
    q_new = torch.cat([q[n - m :] for (q, _, _), n, m in zip(data, lens, new)])
    write_kv(*pools, torch.cat([k[n - m :] for (_, k, _), n, m in zip(data, lens, new)]),
             torch.cat([v[n - m :] for (_, _, v), n, m in zip(data, lens, new)]), slots)
    out = paged_attention(q_new, *pools, meta, d**-0.5)
    assert out.dtype == dtype
    t = 0
    for (q, k, v), n, m in zip(data, lens, new):
        kq, vq = (dequantize_kv(*quantize_kv(x, kind), dtype) for x in (k, v))
        ref = dense_attention(q, kq, vq, d**-0.5)[n - m :]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[t : t + m], ref, atol=tol, rtol=tol)
        exact = dense_attention(q.float(), k.float(), v.float(), d**-0.5)[n - m :]
        rel = float((out[t : t + m].float() - exact).norm() / exact.norm())
        assert rel < (0.02 if kind == "int8" else 0.08), f"{kind}: attention error {rel:.3f} vs unquantized"
        t += m


def test_pool_sizing_counts_scales_and_doubles_tokens():
    cache = CacheConfig(block_size=16, memory_bytes=64 << 20)
    bf16 = num_blocks_for(SMOL, cache, torch.bfloat16)
    int8 = num_blocks_for(SMOL, cache, torch.bfloat16, "int8")
    f32 = num_blocks_for(SMOL, cache, torch.float32)
    assert 1.9 < int8 / bf16 < 2.0  # (64 + 2 scale bytes) vs 128 per token and head
    assert 3.8 < int8 / f32 < 3.9
    assert num_blocks_for(SMOL, cache, torch.float32, "fp8") == int8
    caches = allocate_kv_caches(SMOL, 3, 16, torch.bfloat16, torch.device("cpu"), "int8")
    allocated = sum(p.nbytes for pair in caches for p in pair)
    assert allocated == 3 * bytes_per_block(SMOL, 16, torch.bfloat16, "int8")
    note = kv_cache_note(SMOL, torch.bfloat16, "int8")
    assert "1.94x the tokens of bfloat16" in note, note
