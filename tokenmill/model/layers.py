"""Building blocks of a llama-family decoder: RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import cpu as cpu_kernels


def _cpu_kernel(x: torch.Tensor) -> bool:
    """Whether an eager CPU step can take the C++ op (kernels/): a compiled graph fuses the torch
    code itself."""
    return x.device.type == "cpu" and cpu_kernels.available() and not torch.compiler.is_compiling()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_kernel(x) and x.dim() == 2 and x.dtype == self.weight.dtype:  # one call, not eight
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        # computed in float32 as in the reference implementations, then cast back; one fused
        # kernel for the normalization instead of five (pow, mean, add, rsqrt, mul) on CUDA
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d); with llama3 scaling (Llama 3.1 paper, sec. 3.3;
    the same formula as transformers' `_compute_llama3_parameters`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "freq_factors":  # GGUF's rope_freqs tensor: llama3 scaling precomputed as divisors
        return (inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64)).float()
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}; supported: linear, llama3, freq_factors")
    factor = scaling["factor"]
    low_ff = scaling.get("low_freq_factor", 1.0)
    high_ff = scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled).float()


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (GPT-NeoX layout) over positions given per token."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at each token's position, [T, 1, D/2]; computed once per step."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]):
    """q [T, H, D], k [T, Hkv, D] rotated by their positions' angles."""
    cos, sin = cos_sin
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def apply_rope_qk(qk: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """q and k side by side as [T, H + Hkv, D] (a view of the fused qkv output), rotated in one
    pass: half the kernels of rotating each."""
    cos, sin = cos_sin
    return _rotate(qk, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if _cpu_kernel(x):
        return cpu_kernels.rope(x, cos, sin)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class GatedMLP(nn.Module):
    """intermediate: this rank's FFN rows under tensor parallelism (down_proj's partial output is
    then summed over ranks by `tp`)."""

    def __init__(self, hidden: int, intermediate: int, tp=None) -> None:
        super().__init__()
        self.tp = tp
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):  # merged after loading (model/fusion.py)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        out = self.down_proj(F.silu(gate) * up)
        return out if self.tp is None else self.tp.all_reduce(out)
