"""Every packed matmul equals its reference dequantize-then-matmul, odd shapes included.

Shapes: output rows that are not a multiple of the CPU kernels' tiles (16 / 64) nor of the
group, K with few groups, K not a multiple of 16 for int8 (padded), batches of 1 and 37.
Tolerance: the kernels take bf16 activations and return bf16, so each output carries a
rounding of ~2^-9 relative; REL_TOL bounds ||y - y_ref|| / ||y_ref|| with the activations
rounded to bf16 in the reference too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.quant.base import PackedWeight, QuantEmbedding
from tokenmill.quant.fp8 import Fp8Linear, dequantize_fp8, quantize_fp8
from tokenmill.quant.int4 import Int4Linear, dequantize_int4, quantize_int4
from tokenmill.quant.int8 import Int8Linear, dequantize_int8, quantize_int8

REL_TOL = 6e-3  # measured 1.5e-3 .. 2.9e-3
BATCHES = (1, 37)


def _check(module, reference_w: torch.Tensor, m: int, bias: torch.Tensor | None = None) -> float:
    x = torch.randn(m, module.in_features, generator=torch.Generator().manual_seed(m))
    xb = x.to(torch.bfloat16)
    ref = xb.float() @ reference_w.t() + (0 if bias is None else bias)
    got = module(x)  # float32 in, float32 out; bf16 inside
    assert got.shape == (m, module.out_features) and got.dtype == torch.float32
    err = float((got - ref).norm() / ref.norm())
    assert err < REL_TOL, f"{module}: relative error {err:.2e} at M={m}"
    return err


@pytest.mark.parametrize("shape", [(37, 64), (100, 40), (5, 208), (576, 576)])
@pytest.mark.parametrize("m", BATCHES)
def test_int8_matches_reference(shape, m):
    w = torch.randn(*shape) * 0.05
    q, scale = quantize_int8(w)
    module = Int8Linear(q, scale)
    torch.testing.assert_close(module.dequantize(), dequantize_int8(q, scale), rtol=0, atol=0)
    _check(module, dequantize_int8(q, scale), m)
    # one step of amax/127 per row at most (half a step from rounding)
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((dequantize_int8(q, scale) - w).abs() <= 0.5 * step * (1 + 2**-7)).all()


@pytest.mark.parametrize("shape,group", [((37, 96), 32), ((100, 192), 64), ((5, 128), 128), ((1536, 576), 32),
                                         ((64, 256), 128)])
@pytest.mark.parametrize("m", BATCHES)
def test_int4_matches_reference(shape, group, m):
    w = torch.randn(*shape) * 0.05
    q, scale, zero = quantize_int4(w, group)
    ref = dequantize_int4(q, scale, zero, group)
    module = Int4Linear(q, scale, zero, group)
    assert torch.equal(module.codes(), q), "the CPU int4pack layout is not the one drawn in int4.py"
    torch.testing.assert_close(module.dequantize(), ref, rtol=0, atol=0)
    _check(module, ref, m)
    # asymmetric min/max: at most half a step (max - min) / 15 per group, plus bf16 rounding of zero
    wg = w.reshape(shape[0], -1, group)
    step = (wg.amax(-1) - wg.amin(-1)) / 15
    err = (ref - w).abs().reshape_as(wg).amax(-1)
    assert (err <= 0.5 * step + 2**-8 * wg.abs().amax(-1) + 1e-6).all()


@pytest.mark.parametrize("shape", [(37, 64), (48, 80)])
@pytest.mark.parametrize("m", BATCHES)
def test_fp8_matches_reference(shape, m):
    w = torch.randn(*shape) * 0.05
    q, scale = quantize_fp8(w)
    module = Fp8Linear(q, scale)
    assert not module.native  # CPU: emulated
    _check(module, dequantize_fp8(q, scale), m)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values
    rel = ((dequantize_fp8(q, scale) - w).abs() / w.abs().clamp(min=1e-3 * w.abs().max())).amax()
    assert rel <= 2**-4 + 1e-3


def test_bias_and_leading_dims_pass_through():
    w, b = torch.randn(40, 64) * 0.05, torch.randn(40)
    module = Int8Linear.from_float(w, b.clone())
    x = torch.randn(2, 3, 64)
    y = module(x)
    assert y.shape == (2, 3, 40)
    ref = F.linear(x.to(torch.bfloat16).float(), module.dequantize(), b)
    assert float((y - ref).norm() / ref.norm()) < REL_TOL


@pytest.mark.parametrize("make", [lambda w: Int8Linear.from_float(w), lambda w: Int4Linear.from_float(w, 32),
                                  lambda w: Fp8Linear.from_float(w)])
def test_packed_weight_routes_f_linear(make):
    """The model reads its LM head as F.linear(h, lm_head.weight): that must run the kernel."""
    module = make(torch.randn(64, 96) * 0.05)
    x = torch.randn(3, 96)
    w = module.weight
    assert isinstance(w, PackedWeight) and w.shape == (64, 96)
    torch.testing.assert_close(F.linear(x, w), module(x))
    with pytest.raises(TypeError):  # any other use: no data behind it
        w.sum()


def test_embedding_rows_from_the_packed_table():
    w = torch.randn(50, 64) * 0.05
    for table in (Int8Linear.from_float(w), Fp8Linear.from_float(w)):
        emb = QuantEmbedding(table, torch.bfloat16)
        ids = torch.tensor([0, 7, 49, 7])
        out = emb(ids)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), table.dequantize()[ids].to(torch.bfloat16).float())


def test_weight_bytes_are_the_packed_bytes():
    w = torch.randn(128, 256)
    assert Int8Linear.from_float(w).weight_bytes() == 128 * 256 + 128 * 2
    assert Int4Linear.from_float(w, 32).weight_bytes() == 128 * 256 // 2 + (256 // 32) * 128 * 2 * 2
    assert Fp8Linear.from_float(w).weight_bytes() == 128 * 256 + 128 * 4
