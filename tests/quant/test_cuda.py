"""CUDA paths of the packed kernels against their references (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.quant.fp8 import Fp8Linear, fp8_native
from tokenmill.quant.int4 import Int4Linear, dequantize_int4, quantize_int4
from tokenmill.quant.int8 import Int8Linear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
REL_TOL = 1e-2  # bf16 activations and outputs; fp8 also quantizes the activations per token


def _rel(module, w_ref: torch.Tensor, m: int) -> float:
    x = torch.randn(m, module.in_features, device="cuda").to(torch.bfloat16)
    ref = x.float() @ w_ref.t()
    return float((module(x).float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("m", [1, 37])
def test_int4_cuda_matches_reference(m):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("int4 tensor-core kernel needs sm80+")
    w = torch.randn(200, 256, device="cuda") * 0.05
    q, s, z = quantize_int4(w, 64)
    module = Int4Linear(q, s, z, 64)
    ref = dequantize_int4(q, s, z, 64)
    torch.testing.assert_close(module.dequantize(), ref, rtol=1e-2, atol=1e-3)
    assert _rel(module, ref, m) < REL_TOL


@pytest.mark.parametrize("m", [1, 37])
def test_int8_cuda_matches_reference(m):
    module = Int8Linear.from_float(torch.randn(200, 256, device="cuda") * 0.05)
    assert _rel(module, module.dequantize(), m) < REL_TOL


@pytest.mark.parametrize("m", [1, 37])
def test_fp8_cuda_matches_reference(m):
    module = Fp8Linear.from_float(torch.randn(192, 256, device="cuda") * 0.05)
    assert module.native == fp8_native(torch.device("cuda"))
    assert _rel(module, module.dequantize(), m) < (4e-2 if module.native else REL_TOL)
