"""int4 weight-only, group-wise asymmetric: W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g],
g = k // group, q in 0..15 — the convention of PyTorch's int4pack kernels (tinygemm).

An asymmetric min/max quantizer maps onto it with scale = (max - min) / 15 and
zero = min + 8 * scale; scale and zero are rounded to bf16 (the kernel's dtype) before q is
computed. GGUF Q4_0 / Q4_1 / Q4_K blocks map onto it exactly (see gguf.py).

CPU layout (`aten._convert_weight_to_int4pack_for_cpu`, checked by tests/quant): N is padded
to a multiple of 64 and the packed weight is uint8 [Np, K/2] read, for tiles of T rows, as

    packed.view(Np/T, K, T/2)[b, k, j] = q[Tb + j, k] | q[Tb + T/2 + j, k] << 4

    scales_zeros  bf16 [K/group, Np, 2]   (scale, zero) per group and output row

T is 64 where torch runs its AVX-512 kernels and 32 on AVX2 CPUs (torch picks by the CPU it runs
on; `cpu_tile_rows` asks it once). Kernel (base.cpu_packed_kernel): torch's
`aten._weight_int4pack_mm_for_cpu(x bf16, packed, group, scales_zeros)`, or on CPUs without
AVX-512 (where torch converts bf16 in software) tokenmill's `int4_mm` over the same tensors
(kernels/csrc/int4_mm.cpp). On CUDA, one of two, chosen when the layer is built by
TOKENMILL_CUDA_INT4:
  - `tinygemm` (default): `aten._weight_int4pack_mm` (sm80+) over
    `aten._convert_weight_to_int4pack`, an opaque tile layout (layers stay unfused);
  - `triton`: quant/triton_int4.py (its own layout, fusable). On an H200 (8B shapes, group 32)
    it was ~25% slower than tinygemm per layer at M = 1 (most of it on the qkv shape) and
    1.3-7x faster from M = 16 (batched decode, prefill), where tinygemm falls far behind bf16;
    not yet measured inside the engine, hence opt-in.
The kernel runs at every M: unpacking to bf16 for a dense GEMM measured slower on CPU
(base.dense_min_tokens).

Int8 activations (opt-in, TOKENMILL_CPU_INT4_ACTIVATIONS=int8, base.cpu_int4_activations): CPU
layers take their own layout instead, 8 rows by 8 columns per 32 bytes, and run tokenmill's
`int4_q8_mm` (kernels/csrc/int4_q8_mm.cpp), which quantizes x to int8 per row and 32 columns
and multiplies with integer dot products:

    packed uint8 [Np/8, K/8, 32]:  packed[b, o, 4r + t] = q[8b + r, 8o + t] | q[8b + r, 8o + 4 + t] << 4

Where tokenmill's kernels run (cpu_tile != 0), the scales are stored tiled like the weights, so
a tile's (scale, zero) pairs are one contiguous stream beside its codes (`tile_scales`):

    scales_zeros  bf16 [Np/T, K/group, T, 2]   (T = cpu_tile, or 8 for the int8-activation layout)

With torch's [K/group, Np, 2] a tile's scales lie in K/group pieces Np rows apart; tiled, the
kernels ran ~7% (int4_mm) and ~14% (int4_q8_mm) faster at batch 1 with the weights cold in
DRAM. `Int4Linear.scale_rows()` gives the [K/group, Np, 2] view back for whoever reads scales.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from tokenmill.config import ConfigError, EngineConfig
from tokenmill.quant.base import ACT_DTYPE, QuantLinear, check_k_multiple, cpu_int4_activations, cpu_packed_kernel

GROUP_SIZES = EngineConfig.GROUP_SIZES  # 32, 64, 128
N_BLOCK = 64  # CPU layers are padded to whole 64-row blocks (one tile, or two of 32 rows)
Q8_LAYOUT = -1  # Int4Linear.cpu_tile of a layer with the int8-activation layout (pack_q8)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q uint8 [N, K] in 0..15, scale [N, K/group], zero [N, K/group]) (float32
    holding bf16 values). K must be a multiple of group."""
    n, k = w.shape
    check_k_multiple("int4 weight", k, group, "the group size")
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(ACT_DTYPE).float()
    zero = (lo + 8 * scale).to(ACT_DTYPE).float()
    q = torch.round((wg - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """The reference: float32 [N, K]."""
    n, k = q.shape
    qg = q.float().reshape(n, k // group, group)
    return ((qg - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


CUDA_KERNELS = ("tinygemm", "triton")


def int4_kernel(device: torch.device) -> str:
    """cpu | tinygemm | triton: the kernel a layer built on `device` runs (module docstring).
    `triton` also runs on CPU under Triton's interpreter (TRITON_INTERPRET=1; tests)."""
    from tokenmill.quant import triton_int4

    choice = os.environ.get("TOKENMILL_CUDA_INT4", "tinygemm")
    if choice not in CUDA_KERNELS:
        raise ConfigError(f"TOKENMILL_CUDA_INT4={choice!r}: accepted {', '.join(CUDA_KERNELS)}")
    if choice == "triton" and triton_int4.available(device):
        return "triton"
    if device.type == "cuda":
        if choice == "triton":
            raise ConfigError("TOKENMILL_CUDA_INT4=triton needs triton: pip install triton")
        return "tinygemm"
    return "cpu"


@functools.cache
def cpu_tile_rows() -> int:
    """Rows per tile of torch's CPU int4pack layout on this CPU (64 or 32), read off a packed
    probe: which reading of the module docstring's layout gives the codes back."""
    n, k = N_BLOCK, 32
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    for tile in (64, 32):
        if torch.equal(unpack_cpu_tiles(packed, n, k, tile).long(), q):
            return tile
    raise RuntimeError("torch's CPU int4pack layout is neither 64- nor 32-row tiles; this torch is not supported")


def unpack_cpu_tiles(packed: torch.Tensor, np_: int, k: int, tile: int) -> torch.Tensor:
    """q uint8 [Np, K] from the CPU layout with `tile`-row tiles (module docstring)."""
    p = packed.view(np_ // tile, k, tile // 2)  # [Np/T, K, T/2]
    q = torch.cat([p & 0xF, p >> 4], dim=-1)  # [Np/T, K, T]: rows j and T/2 + j
    return q.transpose(1, 2).reshape(np_, k)


def pack_q8(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [Np, K] (Np a multiple of 8, K of 8) -> the int8-activation layout [Np/8, K/8, 32]
    (module docstring)."""
    np_, k = q.shape
    v = q.to(torch.uint8).view(np_ // 8, 8, k // 8, 2, 4).permute(0, 2, 1, 3, 4)  # [b, o, r, half, t]
    return (v[..., 0, :] | v[..., 1, :] << 4).contiguous().view(np_ // 8, k // 8, 32)


def unpack_q8(packed: torch.Tensor) -> torch.Tensor:
    """pack_q8's inverse: q uint8 [Np, K]."""
    nb, ko, _ = packed.shape
    p = packed.view(nb, ko, 8, 1, 4)
    v = torch.cat([p & 0xF, p >> 4], dim=3)  # [b, o, r, half, t]
    return v.permute(0, 2, 1, 3, 4).reshape(nb * 8, ko * 8)


def tile_scales(sz: torch.Tensor, rows: int) -> torch.Tensor:
    """[K/g, Np, 2] -> [Np/rows, K/g, rows, 2]: each tile's scales contiguous, groups in order."""
    groups, np_, two = sz.shape
    return sz.view(groups, np_ // rows, rows, two).transpose(0, 1).contiguous()


def untile_scales(sz: torch.Tensor) -> torch.Tensor:
    """The inverse of tile_scales: [Np/T, K/g, T, 2] -> [K/g, Np, 2]."""
    tiles, groups, rows, two = sz.shape
    return sz.transpose(0, 1).reshape(groups, tiles * rows, two)


def cpu_int4_tile() -> int:
    """What a CPU layer built now runs: Q8_LAYOUT for tokenmill's `int4_q8_mm` (int8 activations,
    base.cpu_int4_activations), else 0 for torch's kernel or tokenmill's `int4_mm` over tiles of
    this many rows (base.cpu_packed_kernel). Fixed when the layer is built, so that a compiled
    graph sees a constant."""
    if cpu_int4_activations() == "int8":
        return Q8_LAYOUT
    return cpu_tile_rows() if cpu_packed_kernel() == "tokenmill" else 0


def int4pack_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int4pack_mm_for_cpu", "CPU")
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


class Int4Linear(QuantLinear):
    # CPU layout: 0 runs torch's kernel, > 0 tokenmill's int4_mm over tiles of this many rows,
    # Q8_LAYOUT tokenmill's int4_q8_mm (int8 activations) over pack_q8's layout
    cpu_tile = 0

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 bias: torch.Tensor | None = None) -> None:
        n, k = q.shape
        super().__init__(k, n, bias)
        if group not in GROUP_SIZES:
            raise ConfigError(f"int4 group size {group}: accepted {', '.join(map(str, GROUP_SIZES))}")
        check_k_multiple("int4 weight", k, group, "the group size")
        self.group = group
        self.kernel = int4_kernel(q.device)
        if self.kernel == "triton":
            from tokenmill.quant.triton_int4 import pack_int4_triton

            self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
                                 .to(ACT_DTYPE))  # [K/g, N, 2]
            self.register_buffer("packed", pack_int4_triton(q, group))
            return
        pad = (-n) % N_BLOCK if self.kernel == "cpu" else (-n) % 8
        q = F.pad(q, (0, 0, 0, pad))
        sz = torch.stack([F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))], -1)  # [Np, K/g, 2]
        self.register_buffer("scales_zeros", sz.transpose(0, 1).contiguous().to(ACT_DTYPE))  # [K/g, Np, 2]
        if self.kernel == "tinygemm":
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # [Np, K/2] uint8, even k high
            tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        else:
            self.cpu_tile = cpu_int4_tile()
            if self.cpu_tile == Q8_LAYOUT:
                packed = pack_q8(q)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            if self.cpu_tile:  # tokenmill's kernels: tiled scales, [Np/T, K/g, T, 2]
                self.scales_zeros = tile_scales(self.scales_zeros, 8 if self.cpu_tile == Q8_LAYOUT else self.cpu_tile)
        self.register_buffer("packed", packed)

    @staticmethod
    def can_concat_packed(mods: list[Int4Linear]) -> bool:
        """Whether concat_packed can merge these layers, which merge_linears has found mergeable
        (one group size, one input width): CPU layout, and every layer but the last a whole
        number of N_BLOCK-row blocks (whole tiles, so none carries padding rows into the middle)."""
        return all(m.kernel == "cpu" for m in mods) and all(m.out_features % N_BLOCK == 0 for m in mods[:-1])

    @classmethod
    def concat_packed(cls, mods: list[Int4Linear], bias: torch.Tensor | None = None) -> Int4Linear:
        """The layers' output rows as one layer, built from their packed tiles as they are: a CPU
        tile holds 64 or 32 whole rows (pack_q8's blocks 8), contiguous, so the packed tensors and
        the [K/g, Np, 2] scales concatenate along the rows (the last layer's padding rows end the
        merged layer; tiled scales concatenate along their tiles). At load this replaces unpacking
        and repacking every q/k/v and gate/up."""
        first = mods[0]
        out = cls.__new__(cls)
        QuantLinear.__init__(out, first.in_features, sum(m.out_features for m in mods), bias)
        out.group, out.kernel, out.cpu_tile = first.group, first.kernel, first.cpu_tile
        tiled = first.scales_zeros.dim() == 4
        out.register_buffer("scales_zeros", torch.cat([m.scales_zeros for m in mods], dim=0 if tiled else 1))
        out.register_buffer("packed", torch.cat([m.packed for m in mods], dim=0))
        return out

    @property
    def padded_rows(self) -> int:
        """Np: output rows the kernel computes (out_features, then padding rows up to a whole block)."""
        sz = self.scales_zeros
        return sz.shape[0] * sz.shape[2] if sz.dim() == 4 else sz.shape[1]

    def scale_rows(self) -> torch.Tensor:
        """scales_zeros as [K/g, Np, 2], whichever layout the kernel reads."""
        return untile_scales(self.scales_zeros) if self.scales_zeros.dim() == 4 else self.scales_zeros

    @property
    def fusable(self) -> bool:
        """Whether codes() can read the weight back (not from tinygemm's opaque tiles)."""
        return self.kernel != "tinygemm"

    @classmethod
    def from_float(cls, w: torch.Tensor, group: int, bias: torch.Tensor | None = None) -> Int4Linear:
        return cls(*quantize_int4(w, group), group, bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "triton":
            from tokenmill.quant.triton_int4 import int4_matmul

            return int4_matmul(x.contiguous(), self.packed, self.scales_zeros, self.group, self.out_features)
        if self.kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(x.contiguous(), self.packed, self.group, self.scales_zeros)
        elif self.cpu_tile == Q8_LAYOUT:
            y = torch.ops.tokenmill.int4_q8_mm(x.contiguous(), self.packed, self.group, self.scales_zeros)
        elif self.cpu_tile:
            y = torch.ops.tokenmill.int4_mm(x.contiguous(), self.packed, self.group, self.scales_zeros, self.cpu_tile)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group, self.scales_zeros)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    def codes(self) -> torch.Tensor:
        """q uint8 [N, K], unpacked from the CPU layout (drawn in the module docstring) or the
        Triton one."""
        if self.kernel == "triton":
            from tokenmill.quant.triton_int4 import unpack_int4_triton

            return unpack_int4_triton(self.packed, self.out_features, self.group)
        if self.cpu_tile == Q8_LAYOUT:
            return unpack_q8(self.packed)[: self.out_features]
        return unpack_cpu_tiles(self.packed, self.padded_rows, self.in_features,
                                cpu_tile_rows())[: self.out_features]

    def dequantize(self) -> torch.Tensor:
        if self.kernel == "tinygemm":  # an opaque tile layout: read the weight back through the kernel
            eye = torch.eye(self.in_features, dtype=ACT_DTYPE, device=self.packed.device)
            return torch.ops.aten._weight_int4pack_mm(eye, self.packed, self.group, self.scales_zeros)[
                :, : self.out_features].t().float()
        sz = self.scale_rows()[:, : self.out_features].transpose(0, 1).float()  # [N, K/g, 2]
        return dequantize_int4(self.codes(), sz[..., 0], sz[..., 1], self.group)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group={self.group}"
