"""Triton paged decode attention against the torch reference `paged._decode_attention`.

Two variants: on CUDA (skipped without it), and on CPU through Triton's interpreter, which must be
chosen before the kernel module is imported, so it runs in a subprocess (skipped without triton).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.attention_cases import TOL, make_case, poison_unused
from tests.triton_interpreter import HAS_TRITON, run_in_interpreter
from tokenmill.attention.paged import _decode_attention


def check(b: int, hkv: int, g: int, d: int, dtype: torch.dtype, device: str, seed: int = 0,
          num_splits: int | None = None) -> None:
    from tokenmill.attention.triton_decode import available, paged_decode_attention

    assert available(torch.device(device))
    q, k, v, tables, ctx = make_case(b, hkv, g, d, dtype, device, seed)
    scale = d ** -0.5
    ref = _decode_attention(q, k, v, tables, ctx, scale)
    out = paged_decode_attention(q, poison_unused(k, tables, ctx), poison_unused(v, tables, ctx),
                                 tables, ctx, scale, num_splits)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def check_quantized(b: int, hkv: int, g: int, d: int, dtype: torch.dtype, kind: str, device: str,
                    seed: int = 0, num_splits: int | None = None) -> None:
    """QuantizedKVPools (int8 / e4m3 codes, bf16 scale per token and head) against the reference
    gather, which rounds the dequantized rows to the compute dtype first (its tolerance)."""
    from tokenmill.attention.triton_decode import paged_decode_attention_quantized
    from tokenmill.quant.kv import QuantizedKVPool

    q, k, v, tables, ctx = make_case(b, hkv, g, d, dtype, device, seed)
    pools = []
    for x in (k, v):
        pool = QuantizedKVPool(*x.shape, kind, dtype, x.device)
        pool.write(torch.arange(x.shape[0] * x.shape[1], device=x.device), x.reshape(-1, *x.shape[2:]))
        pools.append(pool)
    ref = _decode_attention(q, *pools, tables, ctx, d ** -0.5)
    for pool in pools:  # scales no request reaches are NaN: reading one would poison the output
        pool.scale = poison_unused(pool.scale, tables, ctx)
    out = paged_decode_attention_quantized(q, *pools, tables, ctx, d ** -0.5, num_splits)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


# (B, Hkv, G, D, dtype): batch 1/3/8, GQA group 1 and 3 (not a power of two), fp32 and bf16
INTERPRETER_CASES = [
    (1, 2, 1, 64, torch.float32),
    (3, 2, 3, 64, torch.float32),
    (8, 1, 3, 64, torch.float32),
    (3, 2, 1, 64, torch.bfloat16),
    (8, 2, 3, 64, torch.bfloat16),
]


def run_interpreter_cases() -> None:
    """Entry point of the subprocess (TRITON_INTERPRET=1 already set)."""
    for i, case in enumerate(INTERPRETER_CASES):
        check(*case, device="cpu", seed=i)
    for i, case in enumerate(INTERPRETER_CASES[1:3] + INTERPRETER_CASES[4:]):  # int8 codes (e4m3: CUDA only)
        check_quantized(*case, "int8", device="cpu", seed=i)
    # split-K: contexts of 1..6 blocks cut into 2, 3 or 8 ranges (8: some ranges always empty)
    for i, (case, splits) in enumerate(zip(INTERPRETER_CASES, (2, 3, 8, 3, 8))):
        check(*case, device="cpu", seed=100 + i, num_splits=splits)
    check_quantized(*INTERPRETER_CASES[1], "int8", device="cpu", seed=200, num_splits=3)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_interpreter_matches_reference():
    run_in_interpreter("tests.gpu.test_triton_decode", "run_interpreter_cases")


def test_unavailable_on_cpu_without_interpreter():
    from tokenmill.attention import triton_decode

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter enabled in this process")
    assert not triton_decode.available(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("b", [1, 3, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("num_splits", [None, 1, 5], ids=["auto-splits", "1-split", "5-splits"])
def test_cuda_matches_reference(b, g, d, dtype, num_splits):
    check(b, 2, g, d, dtype, device="cuda", seed=b * 10 + g, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 8])
def test_cuda_quantized_matches_reference(b, dtype, kind):
    from tokenmill.attention.triton_decode import quantized_available

    if not quantized_available(torch.device("cuda"), kind):
        pytest.skip(f"{kind} codes need sm89+")
    check_quantized(b, 2, 3, 128, dtype, kind, device="cuda", seed=b)
