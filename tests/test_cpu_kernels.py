"""The C++ CPU kernels (tokenmill/kernels/): built on this machine, equal to the torch reference.

CI machines have g++ and (from pip) ninja, so the build must succeed here: a failed build is a
test failure, not a skip. Without a compiler users get the torch reference; that fallback is
tested in a subprocess pointed at a compiler that does not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.attention_cases import TOL, make_case, poison_unused
from tokenmill.attention.paged import AttentionMetadata, _decode_attention, paged_attention
from tokenmill.kernels import cpu


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu.load(), "the C++ CPU kernels failed to build (see the log above)"


# (B, Hkv, G, D): batch 1 .. 40 (more requests than threads), GQA groups 1, 3 and 4, head dims
# 64, 80 and 128; each in fp32, bf16 and fp16
CASES = [(1, 2, 1, 64), (3, 2, 3, 64), (8, 1, 3, 64), (5, 3, 4, 128), (40, 2, 2, 80)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_decode_attention_matches_reference(case, dtype):
    b, hkv, g, d = case
    q, k, v, tables, ctx = make_case(b, hkv, g, d, dtype, "cpu", seed=b * 7 + g)
    scale = d ** -0.5
    ref = _decode_attention(q, k, v, tables, ctx, scale)
    # slots no request reaches hold NaN: reading one would poison the output
    out = cpu.paged_decode_attention(q, poison_unused(k, tables, ctx), poison_unused(v, tables, ctx),
                                     tables, ctx, scale)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def _quantized_pools(k, v, kind, dtype):
    """QuantizedKVPools holding k and v ([blocks, block_size, Hkv, D]) as `kind` codes."""
    from tokenmill.quant.kv import QuantizedKVPool

    pools = []
    for x in (k, v):
        pool = QuantizedKVPool(*x.shape, kind, dtype, x.device)
        pool.write(torch.arange(x.shape[0] * x.shape[1]), x.reshape(-1, *x.shape[2:]))
        pools.append(pool)
    return pools


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:4])
def test_quantized_pools_match_reference(case, dtype, kind):
    """Rows read as codes * scale, against the reference's dequantized gather (which rounds the
    rows to the compute dtype first: bf16 tolerance there)."""
    b, hkv, g, d = case
    q, k, v, tables, ctx = make_case(b, hkv, g, d, dtype, "cpu", seed=b * 5 + g)
    kp, vp = _quantized_pools(k, v, kind, dtype)
    ref = _decode_attention(q, kp, vp, tables, ctx, d ** -0.5)
    kp.scale, vp.scale = poison_unused(kp.scale, tables, ctx), poison_unused(vp.scale, tables, ctx)
    out = cpu.paged_decode_attention_quantized(q, kp, vp, tables, ctx, d ** -0.5)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def test_paged_attention_uses_it_for_quantized_pools():
    q, k, v, tables, ctx = make_case(3, 2, 3, 64, torch.bfloat16, "cpu", seed=5)
    kp, vp = _quantized_pools(k, v, "int8", torch.bfloat16)
    meta = AttentionMetadata(slot_mapping=torch.zeros(3, dtype=torch.long), decode_token_idx=torch.arange(3),
                             decode_block_tables=tables, decode_ctx_lens=ctx, prefills=[], num_tokens=3)
    with torch.profiler.profile() as prof:
        out = paged_attention(q, kp, vp, meta, 0.125)
    assert "tokenmill::paged_decode_attention_quantized" in {e.name for e in prof.events()}
    torch.testing.assert_close(out.float(), _decode_attention(q, kp, vp, tables, ctx, 0.125).float(),
                               **TOL[torch.bfloat16])


# (B, Hkv, G, D, block_size): head dims off the kernel's 16-lane grid (72, 40, 8), groups of more
# than 4 query heads (done 4 at a time), blocks of 8 and 24 tokens (its 16-token tiles straddle them)
ODD_CASES = [(3, 2, 5, 72, 8), (2, 3, 6, 40, 24), (2, 1, 1, 8, 16)]


def _odd_case(b, hkv, g, d, block_size, dtype, seed=0):
    """make_case's kind of case for any block size: shuffled blocks, contexts of 100, 1 and 37."""
    gen = torch.Generator().manual_seed(seed)
    per_request = -(-100 // block_size)
    num_blocks = b * per_request + 2  # block 0 only pads the tables
    q = torch.randn(b, hkv * g, d, generator=gen).to(dtype)
    k, v = (torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype) for _ in range(2))
    ctx = torch.tensor([100, 1, 37][:b])
    tables = (1 + torch.randperm(num_blocks - 1, generator=gen)[: b * per_request]).view(b, per_request)
    for i in range(b):
        tables[i, -(-int(ctx[i]) // block_size):] = 0
    return q, k, v, tables, ctx


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float16", "int8", "fp8"])
@pytest.mark.parametrize("case", ODD_CASES)
def test_odd_shapes_match_reference(case, kind):
    b, hkv, g, d, block_size = case
    dtype = torch.bfloat16 if kind in ("int8", "fp8") else getattr(torch, kind)  # quantized: bf16 queries
    _check_kernel(kind, dtype, *_odd_case(b, hkv, g, d, block_size, dtype))


def _check_kernel(kind, dtype, q, k, v, tables, ctx):
    """The kernel on plain pools (kind: their dtype) or int8/fp8 pools made from k and v, against
    the reference, with every slot (or scale) no request reads poisoned with NaN."""
    scale = q.shape[-1] ** -0.5
    if kind in ("int8", "fp8"):
        k, v = _quantized_pools(k, v, kind, dtype)
        ref = _decode_attention(q, k, v, tables, ctx, scale)
        k.scale, v.scale = poison_unused(k.scale, tables, ctx), poison_unused(v.scale, tables, ctx)
        out = cpu.paged_decode_attention_quantized(q, k, v, tables, ctx, scale)
    else:
        ref = _decode_attention(q, k, v, tables, ctx, scale)
        out = cpu.paged_decode_attention(q, poison_unused(k, tables, ctx), poison_unused(v, tables, ctx),
                                         tables, ctx, scale)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def _long_case(hkv, g, d, lens, dtype, seed=0):
    """Requests with contexts `lens` in shuffled blocks of 16 tokens; block 0 pads the tables."""
    gen = torch.Generator().manual_seed(seed)
    b, per_request = len(lens), -(-max(lens) // 16)
    num_blocks = b * per_request + 2
    q = torch.randn(b, hkv * g, d, generator=gen).to(dtype)
    k, v = (torch.randn(num_blocks, 16, hkv, d, generator=gen).to(dtype) for _ in range(2))
    ctx = torch.tensor(lens)
    tables = (1 + torch.randperm(num_blocks - 1, generator=gen)[: b * per_request]).view(b, per_request)
    for i in range(b):
        tables[i, -(-lens[i] // 16):] = 0
    return q, k, v, tables, ctx


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# (threads, context lengths): fewer requests than threads split each context into parts of
# whole tiles (1 request on 2 threads: 2 parts; on 3: 3; 2 requests on 3: 3 parts each; 3 on 4:
# 4, where the context of 1 leaves three parts empty); odd lengths end the last part mid-tile.
# The longest context is long enough for every part (the kernel's kMinPartWork: ~60 tokens here).
SPLIT_CASES = [(2, [640]), (2, [517]), (3, [1000]), (3, [1000, 37]), (4, [1000, 1, 77])]


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float16", "int8", "fp8"])
@pytest.mark.parametrize("shape", [(3, 3, 64), (2, 5, 72)])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_long_context_split_over_threads(case, shape, kind, threads):
    """Few requests with long contexts split their contexts over threads, each part's softmax
    merged by its max and sum: the reference's result, unused slots poisoned."""
    n_threads, lens = case
    hkv, g, d = shape
    threads(n_threads)
    dtype = torch.bfloat16 if kind in ("int8", "fp8") else getattr(torch, kind)
    _check_kernel(kind, dtype, *_long_case(hkv, g, d, lens, dtype, seed=len(lens) + n_threads))


def test_paged_attention_uses_it_for_decodes():
    """The all-decode step of paged_attention runs the kernel (a pool the reference would read
    as NaN everywhere else proves no gathered copy is made)."""
    q, k, v, tables, ctx = make_case(3, 2, 3, 64, torch.bfloat16, "cpu", seed=5)
    meta = AttentionMetadata(slot_mapping=torch.zeros(3, dtype=torch.long), decode_token_idx=torch.arange(3),
                             decode_block_tables=tables, decode_ctx_lens=ctx, prefills=[], num_tokens=3)
    ref = _decode_attention(q, k, v, tables, ctx, 0.125)
    out = paged_attention(q, poison_unused(k, tables, ctx), poison_unused(v, tables, ctx), meta, 0.125)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])


def test_compiled_graph_calls_the_kernel():
    q, k, v, tables, ctx = make_case(2, 2, 3, 64, torch.float32, "cpu", seed=9)
    fn = torch.compile(lambda *a: cpu.paged_decode_attention(*a, 0.125) * 2, dynamic=True)
    torch.testing.assert_close(fn(q, k, v, tables, ctx), 2 * _decode_attention(q, k, v, tables, ctx, 0.125),
                               **TOL[torch.float32])


def test_bad_input_is_a_clear_error():
    q, k, v, tables, ctx = make_case(2, 2, 3, 64, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu.paged_decode_attention(q, k.half(), v.half(), tables, ctx, 0.125)
    with pytest.raises(RuntimeError, match="int64"):
        cpu.paged_decode_attention(q, k, v, tables.int(), ctx, 0.125)
    with pytest.raises(RuntimeError, match="one block table and length per query"):
        cpu.paged_decode_attention(q, k, v, tables[0], ctx, 0.125)
    with pytest.raises(RuntimeError, match="exceeds the block table"):
        cpu.paged_decode_attention(q, k, v, tables[:, :1], ctx + 16, 0.125)
    kp, vp = _quantized_pools(k, v, "int8", torch.float32)
    fp8, _ = _quantized_pools(k, v, "fp8", torch.float32)
    with pytest.raises(RuntimeError, match="one kind for K and V"):
        cpu.paged_decode_attention_quantized(q, fp8, vp, tables, ctx, 0.125)
    kp.scale = kp.scale.float()
    with pytest.raises(RuntimeError, match=r"KV scales must be contiguous bfloat16 \[blocks, block_size, Hkv\]"):
        cpu.paged_decode_attention_quantized(q, kp, vp, tables, ctx, 0.125)


LAYER_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
             torch.float16: {"rtol": 1e-3, "atol": 1e-3}}


def _torch_rms_norm(x, w, eps):  # the torch code of model/layers.py, by hand
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _torch_rope(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 37])
def test_rms_norm_matches_torch(t, dtype):
    g = torch.Generator().manual_seed(t)
    wide = (torch.randn(t, 1000, generator=g) * 3).to(dtype)
    x = wide[:, 100:676]  # rows 1000 apart: a strided view, as a slice of a fused output is
    w = (torch.rand(576, generator=g) + 0.5).to(dtype)
    out = cpu.rms_norm(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), _torch_rms_norm(x, w, 1e-5).float(), **LAYER_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 5, 130])
def test_rope_matches_torch(t, dtype):
    """q and k side by side, a view of a fused qkv output ([T, (H + 2 Hkv) D], v left out)."""
    from tokenmill.model.layers import RotaryEmbedding

    h, hkv, d = 9, 3, 64
    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g).to(dtype)
    qk = qkv[:, : (h + hkv) * d].view(t, h + hkv, d)
    cos, sin = RotaryEmbedding(d, 4096, 10000.0, None).cos_sin(torch.randint(0, 4096, (t,), generator=g))
    out = cpu.rope(qk, cos, sin)
    assert out.shape == qk.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), _torch_rope(qk, cos, sin).float(), **LAYER_TOL[dtype])


def test_layers_use_the_layer_ops_in_eager_steps():
    from tokenmill.model.layers import RMSNorm, _rotate

    norm = RMSNorm(64, 1e-6)
    x = torch.randn(3, 64)
    with torch.profiler.profile() as prof:
        norm(x)
        _rotate(x.view(3, 1, 64), torch.ones(3, 1, 32), torch.zeros(3, 1, 32))
    names = {e.name for e in prof.events()}
    assert {"tokenmill::rms_norm", "tokenmill::rope"} <= names, names


def test_layer_ops_bad_input_is_a_clear_error():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"weight must be \[64\] of x's dtype"):
        cpu.rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        cpu.rms_norm(x.long(), torch.ones(64).long(), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        cpu.rms_norm(x.t(), torch.ones(2), 1e-5)
    with pytest.raises(RuntimeError, match="cos and sin must be float32"):
        cpu.rope(x.view(2, 1, 64), torch.ones(2, 1, 16), torch.ones(2, 1, 16))


@pytest.mark.parametrize("env", [{"TOKENMILL_CPU_KERNELS": "0"}, {"CXX": "/nonexistent/g++"}])
def test_falls_back_to_the_reference(env, tmp_path):
    """Switched off, or no working compiler (fresh extension dir): load() says no and logs one
    line, no traceback; paged_attention then takes the reference path (available() is False)."""
    code = ("import logging; from tokenmill.logs import setup_logging; setup_logging();"
            "from tokenmill.kernels import cpu; print('LOADED', cpu.load())")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), **env)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED False" in proc.stdout
    assert "C++ CPU kernels" in proc.stderr and "Traceback" not in proc.stderr
