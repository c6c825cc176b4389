"""Triton paged decode attention against the torch reference `paged._decode_attention`.

Two variants: on CUDA (skipped without it), and on CPU through Triton's interpreter, which must be
chosen before the kernel module is imported, so it runs in a subprocess (skipped without triton).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenmill.attention.paged import _decode_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None
REPO = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 16
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4},
       torch.float16: {"rtol": 5e-3, "atol": 5e-3},
       torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def make_case(b: int, hkv: int, g: int, d: int, dtype: torch.dtype, device: str, seed: int = 0,
              max_blocks: int = 6):
    """Random q and pool, shuffled block tables, ragged ctx_lens (1, block multiples, odd ones)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = b * max_blocks + 4  # spare blocks stay unused
    q = torch.randn(b, hkv * g, d, generator=gen)
    k = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen)
    v = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen)
    fixed = [1, BLOCK_SIZE, BLOCK_SIZE + 1, max_blocks * BLOCK_SIZE, 2 * BLOCK_SIZE - 3]
    ctx = torch.randint(1, max_blocks * BLOCK_SIZE + 1, (b,), generator=gen)
    ctx[: len(fixed)] = torch.tensor(fixed[:b])
    # block 0 is never used by a request, so it only appears as table padding
    perm = 1 + torch.randperm(num_blocks - 1, generator=gen)[: b * max_blocks]
    tables = perm.view(b, max_blocks).clone()  # [B, max_blocks]
    for i in range(b):
        tables[i, (int(ctx[i]) + BLOCK_SIZE - 1) // BLOCK_SIZE:] = 0
    q, k, v = (x.to(dtype).to(device) for x in (q, k, v))
    return q, k, v, tables.to(device), ctx.to(device)


def poison_unused(cache: torch.Tensor, tables: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """A copy of the pool with NaN in every slot no request reaches: the kernel must skip them."""
    nb, bs = cache.shape[:2]
    used = torch.zeros(nb * bs, dtype=torch.bool, device=cache.device)
    for i in range(tables.shape[0]):
        n = int(ctx[i])
        slots = (tables[i, :, None] * bs + torch.arange(bs, device=cache.device)).flatten()[:n]
        used[slots] = True
    out = cache.clone()
    out.view(nb * bs, -1)[~used] = float("nan")
    return out


def check(b: int, hkv: int, g: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    from tokenmill.attention.triton_decode import available, paged_decode_attention

    assert available(torch.device(device))
    q, k, v, tables, ctx = make_case(b, hkv, g, d, dtype, device, seed)
    scale = d ** -0.5
    ref = _decode_attention(q, k, v, tables, ctx, scale)
    out = paged_decode_attention(q, poison_unused(k, tables, ctx), poison_unused(v, tables, ctx),
                                 tables, ctx, scale)
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


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    code = "from tests.gpu.test_triton_decode import run_interpreter_cases; run_interpreter_cases()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
def test_cuda_matches_reference(b, g, d, dtype):
    check(b, 2, g, d, dtype, device="cuda", seed=b * 10 + g)
