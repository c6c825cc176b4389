"""fp8 (e4m3) weight-only, per output channel: W[n, k] = q[n, k] * scale[n], scale = max|W[n]| / 448.

    q      float8_e4m3fn [N, K]
    scale  float32 [N]

Native on CUDA devices with fp8 tensor cores (compute capability 8.9+: Ada, H100 and newer):
activations are quantized per token to e4m3 and `torch._scaled_mm` runs with row-wise scales.
On CPUs where tokenmill's packed kernels run (base.cpu_packed_kernel: AVX2 without AVX-512),
`tokenmill::fp8_mm` reads the codes in place (kernels/csrc/int8_mm.cpp: int8_mm's loop, each code
widened exactly), at every M, where K is a multiple of 16. Elsewhere it is emulated: the weight
is widened to bf16 per call and one GEMM runs, the channel scale applied to the output. The
emulation reads 1 byte per weight but also writes and reads a bf16 copy, so it is a quality
preview, not a fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.quant.base import ACT_DTYPE, QuantLinear, cpu_packed_kernel

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q float8_e4m3fn [N, K], scale float32 [N])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference: float32 [N, K]."""
    return q.float() * scale.float()[:, None]


def fp8_native(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(QuantLinear):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        n, k = q.shape
        super().__init__(k, n, bias)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.native = fp8_native(q.device) and n % 16 == 0 and k % 16 == 0  # _scaled_mm's shape rule
        # fixed here, not looked up per call: compiled graphs see a constant
        self.own_kernel = q.device.type == "cpu" and k % 16 == 0 and cpu_packed_kernel() == "tokenmill"

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> Fp8Linear:
        return cls(*quantize_fp8(w), bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            xs = (x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [M, 1]
            xq = (x.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            return torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.scale[None, :],
                                    out_dtype=ACT_DTYPE)
        if self.own_kernel and x.device.type == "cpu":
            return torch.ops.tokenmill.fp8_mm(x.to(ACT_DTYPE).contiguous(), self.qweight, self.scale)
        return (F.linear(x, self.qweight.to(ACT_DTYPE)) * self.scale).to(ACT_DTYPE)

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8(self.qweight, self.scale)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_fp8(self.qweight[ids], self.scale[ids])
