"""Triton int4 matmul (quant/triton_int4.py) against the reference dequantize_int4 + matmul.

On CPU through Triton's interpreter, which must be chosen before the kernel module is imported,
so it runs in a subprocess (skipped without triton); on CUDA with real shapes (skipped without
it). The interpreter rounds fp32 -> bf16 by truncation, so its error is about twice the GPU's.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from tests.triton_interpreter import HAS_TRITON, run_in_interpreter
from tokenmill.quant.int4 import dequantize_int4, quantize_int4

REL_TOL = 1e-2  # bf16 activations, weights rounded to bf16 for the tensor cores, bf16 output


def make_case(m: int, n: int, k: int, group: int, device: str, seed: int = 0):
    """(x, packed, scales_zeros, reference y in fp32) for a random [n, k] weight."""
    from tokenmill.quant.triton_int4 import pack_int4_triton

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q, scale, zero = quantize_int4(w, group)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/g, N, 2]
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    ref = x.float() @ dequantize_int4(q, scale, zero, group).t()
    return x.to(device), pack_int4_triton(q, group).to(device), sz.to(device), ref.to(device)


def check(m: int, n: int, k: int, group: int, device: str, seed: int = 0) -> None:
    from tokenmill.quant.triton_int4 import available, int4_matmul

    assert available(torch.device(device))
    x, packed, sz, ref = make_case(m, n, k, group, device, seed)
    y = int4_matmul(x, packed, sz, group, n)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    rel = float((y.float() - ref).norm() / ref.norm())
    assert rel < REL_TOL, f"M={m} N={n} K={k} group={group}: relative error {rel:.2e}"


# (M, N, K, group): M = 1 runs the GEMV, the others the tl.dot kernel; N is no multiple of the
# 16-row block (200) or of the interpreter's 32-column tile (96 = 3 x 32 is, 200 is not); K = 384
# leaves a partial 128-wide step
INTERPRETER_CASES = list(itertools.product([1, 3, 16, 33], [200, 96], [256, 384], [32, 64, 128]))


def run_interpreter_cases() -> None:
    """Entry point of the subprocess (TRITON_INTERPRET=1 already set)."""
    from tokenmill.quant import triton_int4

    for i, case in enumerate(INTERPRETER_CASES):
        check(*case, device="cpu", seed=i)
    triton_int4.GEMV_MAX_M = 64  # the GEMV kernel with several rows, should the cut-off move
    for m, n, k, group in [(3, 200, 384, 32), (5, 96, 256, 128)]:
        check(m, n, k, group, device="cpu")
    triton_int4.GEMV_MAX_M = 1
    triton_int4.DENSE_MIN_M = 16  # the widening kernel + dense GEMM
    for m, n, k, group in [(16, 200, 384, 32), (33, 96, 256, 64), (20, 40, 256, 128)]:
        check(m, n, k, group, device="cpu")
        _, packed, sz, _ = make_case(m, n, k, group, "cpu")
        q = triton_int4.unpack_int4_triton(packed, n, group)
        s = sz.transpose(0, 1).float()  # [N, K/g, 2]
        ref = dequantize_int4(q, s[..., 0], s[..., 1], group)
        w = triton_int4.dequantize_int4_triton(packed, sz, group, n)
        assert w.shape == (n, k) and w.dtype == torch.bfloat16
        torch.testing.assert_close(w.float(), ref, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_interpreter_matches_reference():
    run_in_interpreter("tests.quant.test_triton_int4", "run_interpreter_cases")


def test_pack_layout():
    from tokenmill.quant.triton_int4 import pack_int4_triton

    q = torch.randint(0, 16, (40, 128), dtype=torch.uint8)
    packed = pack_int4_triton(q, 32)
    assert packed.shape == (3, 16, 4, 16) and packed.dtype == torch.uint8
    b, j, g, r = 1, 5, 2, 7  # packed[b, j, g, r] = q[n, 32g + 2j] << 4 | q[n, 32g + 2j + 1]
    n = 16 * b + r
    assert packed[b, j, g, r] == q[n, 32 * g + 2 * j] << 4 | q[n, 32 * g + 2 * j + 1]
    unpacked = torch.stack([packed >> 4, packed & 0xF], -1)  # [N/16, j, g, r, 2]
    assert torch.equal(unpacked.permute(0, 3, 2, 1, 4).reshape(48, 128)[:40], q)
    assert not packed[2, :, :, 8:].any()  # rows 40..47 pad N with 0


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "x": a["x"].float()}, "x must be bf16"),
    (lambda a: {**a, "x": a["x"].t().contiguous().t()}, "unit stride"),
    (lambda a: {**a, "group": 48}, "group 48"),
    (lambda a: {**a, "packed": a["packed"][:, :, :-1]}, "packed must be"),
    (lambda a: {**a, "n": 200}, "packed must be"),
    (lambda a: {**a, "scales_zeros": a["scales_zeros"][:, :90]}, "scales_zeros must be"),
    (lambda a: {**a, "scales_zeros": a["scales_zeros"].float()}, "scales_zeros must be"),
    (lambda a: {**a, "scales_zeros": a["scales_zeros"].to("meta")}, "different devices"),
])
def test_bad_inputs(change, message):
    from tokenmill.quant.triton_int4 import int4_matmul

    x, packed, sz, _ = make_case(4, 96, 256, 64, "cpu")
    args = change({"x": x, "packed": packed, "scales_zeros": sz, "group": 64, "n": 96})
    with pytest.raises(ValueError, match=message):
        int4_matmul(**args)


def test_unavailable_on_cpu_without_interpreter():
    from tokenmill.quant import triton_int4

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter enabled in this process")
    assert not triton_int4.available(torch.device("cpu"))
    x, packed, sz, _ = make_case(1, 96, 256, 64, "cpu")
    with pytest.raises(ValueError, match="needs triton and CUDA"):
        triton_int4.int4_matmul(x, packed, sz, 64, 96)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("m", [1, 64, 300])
@pytest.mark.parametrize("group", [32, 128])
def test_cuda_matches_reference(m, group):
    check(m, 4096, 4096, group, device="cuda", seed=m)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_cuda_graph_capture():
    """Captured after a warm-up (autotuning synchronizes), replayed on new inputs."""
    from tokenmill.quant.triton_int4 import int4_matmul

    for m in (1, 48):
        x, packed, sz, _ = make_case(m, 1000, 1024, 32, "cuda")
        int4_matmul(x, packed, sz, 32, 1000)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = int4_matmul(x, packed, sz, 32, 1000)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y, int4_matmul(x, packed, sz, 32, 1000), rtol=0, atol=0)


def run_layer_cases() -> None:
    """Entry point of the subprocess (TRITON_INTERPRET=1, TOKENMILL_CUDA_INT4=triton): Int4Linear
    built for the Triton kernel, its fusion, and an engine decoding through it."""
    import json
    import tempfile
    from pathlib import Path

    from tokenmill.llm import LLM
    from tokenmill.model.fusion import merge_linears
    from tokenmill.quant.int4 import Int4Linear
    from tokenmill.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(0)
    mods, refs = [], []
    for n in (96, 40, 40):  # q, k, v of a GQA layer
        w = torch.randn(n, 256, generator=g) * 0.05
        q, scale, zero = quantize_int4(w, 32)
        mod = Int4Linear(q, scale, zero, 32)
        assert mod.kernel == "triton" and mod.fusable
        assert torch.equal(mod.codes(), q)
        torch.testing.assert_close(mod.dequantize(), dequantize_int4(q, scale, zero, 32), rtol=1e-2, atol=1e-3)
        mods.append(mod)
        refs.append(dequantize_int4(q, scale, zero, 32))
    x = torch.randn(3, 256, generator=g).to(torch.bfloat16)
    merged = merge_linears(mods)
    assert merged.kernel == "triton" and merged.out_features == 176
    assert torch.equal(merged.codes(), torch.cat([m.codes() for m in mods]))
    ref = x.float() @ torch.cat(refs).t()
    assert float((merged(x).float() - ref).norm() / ref.norm()) < REL_TOL

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps({
            "model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": True}))
        llm = LLM(d, load_format="dummy", quantization="int4", kv_cache_memory_gb=0.01, show_progress=False)
        layer = llm.engine.model.model.layers[0]
        assert layer.self_attn.qkv_proj.kernel == "triton"  # built for the Triton kernel, and fused
        out = llm.generate(["Hello there"], SamplingParams(max_tokens=4, ignore_eos=True), use_progress=False)
        assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_layers_built_for_the_triton_kernel():
    run_in_interpreter("tests.quant.test_triton_int4", "run_layer_cases", TOKENMILL_CUDA_INT4="triton")


def test_unknown_kernel_choice_is_a_clear_error(monkeypatch):
    from tokenmill.config import ConfigError
    from tokenmill.quant.int4 import int4_kernel

    monkeypatch.setenv("TOKENMILL_CUDA_INT4", "marlin")
    with pytest.raises(ConfigError, match=r"^TOKENMILL_CUDA_INT4='marlin': accepted tinygemm, triton$"):
        int4_kernel(torch.device("cpu"))
