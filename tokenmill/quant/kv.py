"""A quantized paged KV pool: int8 or fp8 (e4m3) codes with one scale per token and KV head.

One layer's K (or V) pool:

    data   [num_blocks, block_size, Hkv, D]   int8 | float8_e4m3fn
    scale  [num_blocks, block_size, Hkv]      bfloat16: max|x| / 127 (int8) or / 448 (fp8)

Scales are per (slot, head), so a token's codes are final when written: a block fills token by
token without re-quantizing what it holds. Per token and head, D = 64 codes of 1 byte plus a
2-byte scale are 66 bytes against 128 in bf16 (1.94x the tokens) or 256 in float32 (3.9x).
Reads dequantize in the gather (attention/paged.py), in the compute dtype.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.bfloat16
_CODES = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def kv_code_dtype(kind: str) -> torch.dtype:
    return _CODES[kind][0]


def quantize_kv(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes [..., D], scale [...] bf16). The scale is rounded to bf16 first and
    the codes computed from the rounded scale."""
    dtype, qmax = _CODES[kind]
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / qmax).clamp(min=1e-8).to(SCALE_DTYPE)
    y = (xf / scale.float()[..., None]).clamp(-qmax, qmax)
    return (y.round() if kind == "int8" else y).to(dtype), scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference: codes [..., D] * scale [...] in `dtype`."""
    return (codes.float() * scale.float()[..., None]).to(dtype)


class QuantizedKVPool:
    """One layer's K or V pool, quantized. Mutated only by `write`; the engine owns it."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, kind: str,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.kind = kind
        self.dtype = dtype  # the compute dtype reads return
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # zeros, not empty: padded decode reads multiply masked probabilities by these values
        self.data = torch.zeros(shape, dtype=kv_code_dtype(kind), device=device)
        self.scale = torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=device)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Store x [T, Hkv, D] at the flat slots [T]."""
        _, _, hkv, d = self.data.shape
        codes, scale = quantize_kv(x, self.kind)
        # through a 1-byte integer view: index_copy_ has no float8 kernel on CPU
        self.data.view(torch.int8).view(-1, hkv, d).index_copy_(0, slots, codes.view(torch.int8))
        self.scale.view(-1, hkv).index_copy_(0, slots, scale)

    def gather(self, blocks: torch.Tensor) -> torch.Tensor:
        """Dequantized blocks: blocks [...] of block ids -> [..., block_size, Hkv, D] in dtype."""
        codes = self.data.view(torch.int8)[blocks].view(self.data.dtype)
        return dequantize_kv(codes, self.scale[blocks], self.dtype)

    @staticmethod
    def bytes_per_token_head(head_dim: int) -> int:
        return head_dim + torch.finfo(SCALE_DTYPE).bits // 8
