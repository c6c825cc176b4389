"""int4 CPU layers with int8 activations (TOKENMILL_CPU_INT4_ACTIVATIONS=int8): the layout
(quant/int4.py: pack_q8), the kernel (kernels/csrc/int4_q8_mm.cpp) and the layers and engine
built on them.

The kernel's integer sums are exact and its float steps fixed, so: the AVX2 form equals the plain
C++ form bit for bit, a row's output does not depend on the rows beside it, and the result is
within the bf16 output rounding of a float64 reference computed here from the definition
(activations quantized per row and 32 columns, llama.cpp's Q8_0).
"""

from __future__ import annotations

import pytest
import torch

from tests.quant.test_cpu_packed import weights
from tokenmill.config import ConfigError
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.quant import base
from tokenmill.quant.int4 import Q8_LAYOUT, Int4Linear, pack_q8, tile_scales, unpack_q8

pytestmark = pytest.mark.skipif(not cpu_kernels.load(), reason="needs the C++ CPU kernels (g++ and ninja)")


@pytest.fixture
def int8_activations(monkeypatch):
    """Layers built inside the test take the int8-activation layout."""
    monkeypatch.setenv("TOKENMILL_CPU_INT4_ACTIVATIONS", "int8")
    base.cpu_int4_activations.cache_clear()
    yield
    monkeypatch.delenv("TOKENMILL_CPU_INT4_ACTIVATIONS")
    base.cpu_int4_activations.cache_clear()


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> its int8 rounding as float64: per row and 32 columns, d = amax / 127,
    q = round-half-even(x * (1 / d)), value q d (the kernel's definition, float32 steps)."""
    xf = x.float()
    m, k = xf.shape
    blocks = xf.view(m, k // 32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv).double() * d.double()).view(m, k)


def reference(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """float64: sum s q xq + (z - 8 s) sum x per group (the zero term over the exact x)."""
    m, k = x.shape
    n, groups = q.shape[0], k // group
    xq = quantize_activations(x).view(m, groups, group)
    s, z = sz[..., 0].double().t(), sz[..., 1].double().t()  # [N, K/g]
    a = torch.einsum("mgk,ngk->mng", xq, q.double().view(n, groups, group))
    xs = x.double().view(m, groups, group).sum(-1)  # [M, K/g]
    return (a * s[None] + (z - 8 * s)[None] * xs[:, None, :]).sum(-1)


def test_layout_round_trip_and_definition():
    q = torch.randint(0, 16, (24, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_q8(q)
    assert packed.shape == (3, 8, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_q8(packed), q)
    for b, o, r, t in [(0, 0, 0, 0), (1, 3, 5, 2), (2, 7, 7, 3)]:  # the docstring's formula
        byte = int(packed[b, o, 4 * r + t])
        assert byte & 0xF == q[8 * b + r, 8 * o + t] and byte >> 4 == q[8 * b + r, 8 * o + 4 + t]


@pytest.mark.parametrize("n, k, group", [(64, 96, 32), (192, 256, 64), (128, 384, 128)])
def test_kernel_equals_plain_form_reference_and_rows_alone(n, k, group):
    q, sz, _ = weights(n, k, group)
    packed = pack_q8(q)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x[3] = 0  # a zero row: d = 0, every code 0
    x[5, :32] = 0  # one zero block beside others
    tiled = tile_scales(sz, 8)  # the layout Int4Linear stores: the same numbers, the same bits
    for m in (1, 2, 3, 4, 5, 8, 9, 13):
        y = cpu_kernels.int4_q8_mm(x[:m], packed, group, sz)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert torch.equal(y, cpu_kernels.int4_q8_mm(x[:m], packed, group, sz, scalar=True))
        assert torch.equal(y, cpu_kernels.int4_q8_mm(x[:m], packed, group, tiled))
        assert torch.equal(y, cpu_kernels.int4_q8_mm(x[:m], packed, group, tiled, scalar=True))
        ref = reference(x[:m], q, sz, group)
        assert torch.allclose(y.double(), ref, rtol=2**-8, atol=1e-3 * ref.abs().max().item())
        if m == 13:
            for i in range(m):  # batch-invariant: each row alone gives its bits in the batch
                assert torch.equal(cpu_kernels.int4_q8_mm(x[i:i + 1], packed, group, sz), y[i:i + 1])
    assert torch.equal(cpu_kernels.int4_q8_mm(x[3:4], packed, group, sz), torch.zeros(1, n, dtype=torch.bfloat16))


def test_lossless_activations_give_the_bf16_kernels_result():
    """Integer activations whose every 32-column block holds a +-127 quantize exactly (d = 1),
    so the product is the dequantized weight's, up to float32 summation order."""
    n, k, group = 64, 128, 32
    q, sz, w = weights(n, k, group, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-127, 128, (4, k), generator=g).float()
    x[:, ::32] = 127
    y = cpu_kernels.int4_q8_mm(x.to(torch.bfloat16), pack_q8(q), group, sz)
    ref = x.double() @ w.double().t()
    assert torch.allclose(y.double(), ref, rtol=2**-8, atol=1e-4 * ref.abs().max().item())


def test_layer_builds_the_layout_and_matches_the_bf16_layer(int8_activations, monkeypatch):
    w = torch.randn(200, 128, generator=torch.Generator().manual_seed(5)) * 0.05
    layer = Int4Linear.from_float(w, 32)
    assert layer.cpu_tile == Q8_LAYOUT and layer.packed.shape == (256 // 8, 128 // 8, 32)
    assert layer.scales_zeros.shape == (256 // 8, 128 // 32, 8, 2) and layer.padded_rows == 256
    monkeypatch.setenv("TOKENMILL_CPU_INT4_ACTIVATIONS", "bf16")
    base.cpu_int4_activations.cache_clear()
    plain = Int4Linear.from_float(w, 32)
    assert plain.cpu_tile != Q8_LAYOUT
    assert torch.equal(layer.codes(), plain.codes())  # the same codes, another layout
    assert torch.equal(layer.dequantize(), plain.dequantize())
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    y, y_plain = layer(x), plain(x)
    assert y.shape == (3, 200)
    assert torch.allclose(y.float(), y_plain.float(), rtol=0.05, atol=0.05 * y_plain.abs().max().item())
    # merged layers (q/k/v, gate/up) concatenate the 8-row blocks as they are
    other = Int4Linear.from_float(w[:64] * 2, 32)
    monkeypatch.setenv("TOKENMILL_CPU_INT4_ACTIVATIONS", "int8")
    base.cpu_int4_activations.cache_clear()
    a, b = Int4Linear.from_float(w[:64] * 2, 32), Int4Linear.from_float(w, 32)
    assert Int4Linear.can_concat_packed([a, b])
    merged = Int4Linear.concat_packed([a, b])
    assert torch.equal(merged(x), torch.cat([a(x), b(x)], dim=1))
    assert torch.equal(merged.codes()[:64], other.codes())


def test_choice_and_bad_values(monkeypatch):
    monkeypatch.setenv("TOKENMILL_CPU_INT4_ACTIVATIONS", "int4")
    base.cpu_int4_activations.cache_clear()
    try:
        with pytest.raises(ConfigError, match="accepted bf16, int8"):
            base.cpu_int4_activations()
    finally:
        monkeypatch.delenv("TOKENMILL_CPU_INT4_ACTIVATIONS")
        base.cpu_int4_activations.cache_clear()
    assert base.cpu_int4_activations() == "bf16"  # the default keeps the activations


def test_bad_input_one_line_errors():
    q, sz, _ = weights(64, 64, 32)
    packed = pack_q8(q)
    x = torch.randn(2, 64).to(torch.bfloat16)
    cases = [
        ((x.float(), packed, 32, sz), "x must be a 2-d bfloat16"),
        ((x, packed, 48, sz), "group must be a positive multiple of 32"),
        ((x, packed.view(8, 16, 16), 32, sz), r"packed must be uint8 \[Np/8, K/8, 32\]"),
        ((x, packed, 32, sz.float()), r"scales_zeros must be bfloat16 \[K/group, Np, 2\]"),
        ((x, packed, 32, tile_scales(sz, 8)[:, :1]), r"or \[Np/8, K/group, 8, 2\] = \[8, 2, 8, 2\]"),
        ((torch.randn(2, 96).to(torch.bfloat16), packed, 32, sz), r"packed must be uint8"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message) as e:
            cpu_kernels.int4_q8_mm(*args)
        assert "\n" not in str(e.value).split("\nException raised from")[0].strip()


def test_engine_plan_and_one_call_loop_equal_the_modules(int8_activations):
    """The real model with int8 activations: the one-call C++ loop (int4_tile = Q8_LAYOUT) and
    the modules give the same tokens and log-probs, bit for bit; the start-up note says so."""
    from tests.test_eager_plan import _assert_same, _with_and_without_plan
    from tokenmill.llm import LLM
    from tokenmill.quant.report import weights_note
    from tokenmill.sampling_params import SamplingParams

    llm = LLM(kv_cache_memory_gb=0.05, show_progress=False)
    model = llm.engine.model
    layer = model.model.layers[0].mlp.gate_up_proj
    assert layer.cpu_tile == Q8_LAYOUT
    assert llm.engine.runner.eager_plan[0][0].fused is not None
    assert "int4 layers with int8 activations" in weights_note(model, "gguf", torch.bfloat16)
    _assert_same(*_with_and_without_plan(llm))
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=3), use_progress=False)
    assert out[0].outputs[0].text.strip().startswith("Paris")
