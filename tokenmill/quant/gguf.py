"""GGUF quantized tensors run packed: their blocks become a QuantLinear at load.

    Q4_0  w = d * (q - 8)              -> int4pack, group 32: scale = d,      zero = 0
    Q4_1  w = d * q + m                -> int4pack, group 32: scale = d,      zero = m + 8d
    Q4_K  w = d*sc_j * q - dmin*m_j    -> int4pack, group 32: scale = d*sc_j, zero = 8*d*sc_j - dmin*m_j
          (256-weight super-blocks of 8 sub-blocks of 32 with 6-bit sc_j, m_j)
    Q8_0, Q5_0, Q5_1, Q5_K, Q6_K, Q8_K  -> int8 per output channel (re-quantized)

The 4-bit codes are kept bit for bit; only scale and zero are rounded from fp16 to the
kernel's bf16 (a relative error of at most 2^-9 on each, i.e. under 1/60 of a quantization
step). Types with more than 4 bits per weight do not fit the int4 kernel, and the int8 kernel
takes one scale per output row, not one per 32 weights: they are dequantized and
re-quantized to int8 per output channel (about 8 bits per weight, like Q8_0's 8.5; for
Q5/Q6 more bytes than the file, but one fast kernel). A tied embedding / LM head is always
int8, since the embedding lookup reads rows from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.quant.base import QuantLinear
from tokenmill.quant.int4 import Int4Linear
from tokenmill.quant.int8 import Int8Linear

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GGUFWeight:
    """A quantized GGUF matrix as stored: raw blocks [rows, bytes per row] (rows are output
    channels, already un-permuted for llama Q/K), the type's name, and the logical shape."""

    raw: np.ndarray
    type_name: str
    shape: tuple[int, int]  # (rows, cols)

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols] as gguf-py decodes the blocks (the reference)."""
        from gguf import GGMLQuantizationType, quants

        return quants.dequantize(self.raw, GGMLQuantizationType[self.type_name]).reshape(self.shape)


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float32 (the block's fp16 field)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def int4_fields(w: GGUFWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 [rows, cols] 0..15, scale, zero float32 [rows, cols/32]) such that
    w = (q - 8) * scale + zero per group of 32 equals the file's Q4_0 / Q4_1 / Q4_K decoding."""
    rows, cols = w.shape
    if w.type_name == "Q4_K":
        from gguf.quants import Q4_K

        b = w.raw.reshape(rows, cols // 256, 144)
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]  # [rows, nb, 1]
        sc, mn = Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
        sc = sc.reshape(rows, -1, 8).astype(np.float32)
        mn = mn.reshape(rows, -1, 8).astype(np.float32)
        qs = b[..., 16:].reshape(rows, -1, 4, 1, 32)  # 4 chunks of 64 weights
        q = np.concatenate([qs & 0xF, qs >> 4], axis=3).reshape(rows, cols)
        scale = d * sc
        zero = 8 * scale - dmin * mn
        return q, scale.reshape(rows, -1), zero.reshape(rows, -1)
    head = 2 if w.type_name == "Q4_0" else 4
    b = w.raw.reshape(rows, cols // 32, head + 16)
    qs = b[..., head:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, cols)  # element j | j + 16
    d = _f16(b[..., 0:2])
    zero = np.zeros_like(d) if w.type_name == "Q4_0" else _f16(b[..., 2:4]) + 8 * d
    return q, d, zero


def gguf_linear(w: GGUFWeight, device: torch.device, bias: torch.Tensor | None = None,
                need_rows: bool = False) -> QuantLinear:
    """The packed module for one GGUF matrix. need_rows: it also serves embedding lookups."""
    if w.type_name in INT4_TYPES and not need_rows:
        q, scale, zero = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in int4_fields(w))
        return Int4Linear(q, scale, zero, 32, bias)
    return Int8Linear.from_float(torch.from_numpy(w.dequantize()).to(device), bias)
