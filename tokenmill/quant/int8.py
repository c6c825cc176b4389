"""int8 weight-only, per output channel, symmetric: W[n, k] = q[n, k] * scale[n].

    q      int8 [N, Kp]   Kp = K rounded up to 16 (the CPU kernel's K step), zero-padded
    scale  bf16 [N]       max|W[n]| / 127, rounded to bf16 before q is computed, so the
                          kernel's bf16 scale adds no error of its own

Kernel: `aten._weight_int8pack_mm(x bf16 [M, Kp], q, scale)` on CPU (and on CUDA where this
torch build has it); for M >= dense_min_tokens the weight is dequantized to bf16 and one
dense GEMM runs. On CPUs without AVX-512 (base.cpu_packed_kernel) tokenmill's `int8_mm` over the
same tensors runs at every M instead (kernels/csrc/int8_mm.cpp; a bf16 GEMM is slow there too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.quant.base import ACT_DTYPE, QuantLinear, cpu_packed_kernel, dense_min_tokens

K_STEP = 16  # the CPU kernel reads garbage (or crashes) when K is not a multiple of 16


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K] in [-127, 127], scale float32 [N] holding bf16 values)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(ACT_DTYPE).float()
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference: float32 [N, K]."""
    return q.float() * scale.float()[:, None]


def int8pack_available(device: torch.device) -> bool:
    key = "CPU" if device.type == "cpu" else "CUDA"
    return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", key)


class Int8Linear(QuantLinear):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        n, k = q.shape
        super().__init__(k, n, bias)
        kp = -(-k // K_STEP) * K_STEP
        self.register_buffer("qweight", F.pad(q, (0, kp - k)).contiguous())  # [N, Kp] int8
        self.register_buffer("scale", scale.to(ACT_DTYPE).contiguous())  # [N] bf16
        self.dense_from = dense_min_tokens(q.device)
        self.packed_kernel = int8pack_available(q.device)
        self.own_kernel = q.device.type == "cpu" and cpu_packed_kernel() == "tokenmill"  # fixed: compiled graphs

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        return cls(*quantize_int8(w), bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        own = self.own_kernel and x.device.type == "cpu"
        if not own and (x.shape[0] >= self.dense_from or not self.packed_kernel):
            w = self.qweight[:, : self.in_features].to(ACT_DTYPE) * self.scale[:, None]
            return F.linear(x, w)
        kp = self.qweight.shape[1]
        if kp != self.in_features:
            x = F.pad(x, (0, kp - self.in_features))
        if own:
            return torch.ops.tokenmill.int8_mm(x.contiguous(), self.qweight, self.scale)
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, self.scale)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight[:, : self.in_features], self.scale)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_int8(self.qweight[ids, : self.in_features], self.scale[ids])
