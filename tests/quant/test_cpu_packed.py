"""tokenmill's CPU packed kernels (kernels/csrc/int4_mm.cpp, int8_mm.cpp: int8 and fp8) and
torch's CPU int4pack layout.

torch lays packed int4 weights out in 64-row tiles where it runs AVX-512 kernels and in 32-row
tiles on AVX2 CPUs; `cpu_tile_rows` reads the layout off torch, and the kernel takes either. Both
tile sizes are tested on every machine: the one torch packs here through torch, the other packed
by hand from the layout's definition (quant/int4.py's docstring).

The kernels' arithmetic is float32 and the same for every batch size, so: the AVX2 form equals
the plain C++ form bit for bit, a row's output does not depend on the rows beside it, and the
result is within the bf16 output rounding of the dequantized reference.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import ConfigError
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.quant import base
from tokenmill.quant.int4 import (
    Int4Linear,
    cpu_tile_rows,
    dequantize_int4,
    quantize_int4,
    tile_scales,
    unpack_cpu_tiles,
    untile_scales,
)
from tokenmill.quant.fp8 import FP8, Fp8Linear
from tokenmill.quant.int8 import Int8Linear

pytestmark = pytest.mark.skipif(not cpu_kernels.load(), reason="needs the C++ CPU kernels (g++ and ninja)")


def pack_by_hand(q: torch.Tensor, tile: int) -> torch.Tensor:
    """q [Np, K] (codes 0..15, Np a multiple of 64) in the CPU layout with `tile`-row tiles."""
    np_, k = q.shape
    t = q.to(torch.uint8).view(np_ // tile, tile, k).transpose(1, 2)  # [Np/T, K, T]
    return (t[..., : tile // 2] | t[..., tile // 2:] << 4).contiguous().view(np_, k // 2)


def weights(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    zero = (torch.randn(n, k // group, generator=g) * 0.05).to(torch.bfloat16)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # [K/g, N, 2]
    return q, sz, dequantize_int4(q, scale, zero, group)


def test_tile_rows_read_off_torch():
    tile = cpu_tile_rows()
    assert tile in (32, 64)
    q, _, _ = weights(192, 96, 32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(packed.view(torch.uint8), pack_by_hand(q, tile))
    assert torch.equal(unpack_cpu_tiles(packed, 192, 96, tile).int(), q)


@pytest.mark.parametrize("tile", [32, 64])
@pytest.mark.parametrize("n,k,group", [(64, 32, 32), (192, 256, 64), (128, 384, 128), (320, 576, 32)])
def test_kernel_equals_plain_form_and_reference(tile, n, k, group):
    q, sz, w = weights(n, k, group, seed=n + k)
    packed = pack_by_hand(q, tile)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    y = cpu_kernels.int4_mm(x, packed, group, sz, tile)
    assert y.dtype == torch.bfloat16 and y.shape == (13, n)
    assert torch.equal(y, cpu_kernels.int4_mm(x, packed, group, sz, tile, scalar=True))
    tiled = tile_scales(sz, tile)  # the layout Int4Linear stores: the same numbers, the same bits
    assert torch.equal(untile_scales(tiled), sz)
    for m in (1, 2, 5, 13):  # both M < 6 paths and the blocked one, and the plain form
        assert torch.equal(y[:m], cpu_kernels.int4_mm(x[:m], packed, group, tiled, tile))
    assert torch.equal(y, cpu_kernels.int4_mm(x, packed, group, tiled, tile, scalar=True))
    # each row alone; M < 6 in pairs of rows and a single one (2, 3, 5), M >= 6 in blocks of 6, 4
    # and single rows (9, 10, 13)
    assert torch.equal(y, torch.cat([cpu_kernels.int4_mm(x[i:i + 1], packed, group, sz, tile) for i in range(13)]))
    for m in (2, 3, 4, 5, 9, 10):
        assert torch.equal(y[:m], cpu_kernels.int4_mm(x[:m], packed, group, sz, tile))
    ref = x.float() @ w.t()
    # float32 sums, then one bf16 rounding: within 2^-8 of each output plus the sums' own error
    assert ((y.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max()).all()


def test_kernel_equals_torch_kernel_within_rounding():
    """On the layout torch packs here, next to torch's own kernel: both within bf16 rounding."""
    layer = Int4Linear.from_float(torch.randn(200, 256) * 0.05, 32)  # 200 rows: padded to 256
    x = torch.randn(5, 256).to(torch.bfloat16)
    ours = cpu_kernels.int4_mm(x, layer.packed, 32, layer.scales_zeros, cpu_tile_rows())[:, :200]
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.packed, 32, layer.scale_rows())[:, :200]
    ref = x.float() @ layer.dequantize().t()
    for y in (ours, theirs):
        assert float((y.float() - ref).norm() / ref.norm()) < 4e-3


def test_layer_codes_round_trip():
    w = torch.randn(136, 64)
    q, scale, zero = quantize_int4(w, 32)
    layer = Int4Linear(q, scale, zero, 32)
    assert torch.equal(layer.codes().int(), q.int())
    # tokenmill's kernel reads tiled scales; scale_rows() gives the [K/g, Np, 2] ones back
    assert layer.padded_rows == 192
    if layer.cpu_tile:
        assert layer.scales_zeros.shape == (192 // layer.cpu_tile, 2, layer.cpu_tile, 2)
    sz = layer.scale_rows()
    assert sz.shape == (2, 192, 2)
    assert torch.equal(sz[:, :136, 0].t().float(), scale.to(torch.bfloat16).float())
    assert torch.equal(sz[:, :136, 1].t().float(), zero.to(torch.bfloat16).float())


def test_tiled_scales_shape_errors():
    q, sz, _ = weights(64, 64, 32)
    x = torch.randn(2, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"scales_zeros must be bfloat16 \[K/group, Np, 2\] or \[Np/32, K/group, 32"):
        cpu_kernels.int4_mm(x, pack_by_hand(q, 32), 32, tile_scales(sz, 64), 32)


def test_bad_input_one_line_errors():
    q, sz, _ = weights(64, 64, 32)
    packed = pack_by_hand(q, 32)
    with pytest.raises(RuntimeError, match="x must be \\[M, K\\] bfloat16"):
        cpu_kernels.int4_mm(torch.randn(2, 64), packed, 32, sz, 32)
    with pytest.raises(RuntimeError, match="tile 16: accepted 32, 64"):
        cpu_kernels.int4_mm(torch.randn(2, 64).bfloat16(), packed, 32, sz, 16)
    with pytest.raises(RuntimeError, match="K = 96 must be 2 groups of 32"):
        cpu_kernels.int4_mm(torch.randn(2, 96).bfloat16(), packed, 32, sz, 32)


@pytest.mark.parametrize("n,kp", [(4, 16), (37, 64), (258, 576), (66, 1040), (9, 2048)])
def test_int8_kernel_equals_plain_form_and_reference(n, kp):
    """M > 1 runs blocks of 8 weight rows against x rows in threes and twos (M = 7: 3 + 2 + 2, 8:
    3 + 3 + 2, 5: 3 + 2, 4: 2 + 2); odd weight-row counts pair a row with itself; M = 1 takes its
    own path (four rows, a lone row for a short last block)."""
    g = torch.Generator().manual_seed(n * kp)
    q = torch.randint(-127, 128, (n, kp), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.01 + 1e-4).to(torch.bfloat16)
    x = torch.randn(8, kp, generator=g).to(torch.bfloat16)
    y = cpu_kernels.int8_mm(x, q, scale)
    assert y.dtype == torch.bfloat16 and y.shape == (8, n)
    assert torch.equal(y, cpu_kernels.int8_mm(x, q, scale, scalar=True))
    assert torch.equal(y, torch.cat([cpu_kernels.int8_mm(x[i:i + 1], q, scale) for i in range(8)]))
    for m in (2, 3, 4, 5, 7):
        assert torch.equal(y[:m], cpu_kernels.int8_mm(x[:m], q, scale))
    ref = (x.float() @ q.float().t()) * scale.float()
    assert ((y.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max()).all()


def test_int8_layer_runs_the_chosen_kernel(monkeypatch):
    w, x = torch.randn(100, 40) * 0.05, torch.randn(3, 40)  # K 40: padded to 48
    for choice in ("tokenmill", "torch"):
        monkeypatch.setenv("TOKENMILL_CPU_PACKED", choice)
        base.cpu_packed_kernel.cache_clear()
        layer = Int8Linear.from_float(w)
        assert layer.own_kernel == (choice == "tokenmill")
        y = layer(x)
        ref = x.to(torch.bfloat16).float() @ layer.dequantize().t()
        assert float((y - ref).norm() / ref.norm()) < 4e-3
    base.cpu_packed_kernel.cache_clear()


def fp8_codes(n: int, kp: int, seed: int) -> torch.Tensor:
    """Every e4m3fn bit pattern but NaN (s.1111.111), subnormals included, at random."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 256, (n, kp), generator=g, dtype=torch.uint8)
    c[(c & 0x7F) == 0x7F] = 0x42
    return c.view(FP8)


@pytest.mark.parametrize("n,kp", [(4, 16), (37, 64), (258, 576), (9, 2048)])
def test_fp8_kernel_equals_plain_form_and_reference(n, kp):
    q = fp8_codes(n, kp, n * kp)
    g = torch.Generator().manual_seed(n + kp)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    x = torch.randn(8, kp, generator=g).to(torch.bfloat16)
    y = cpu_kernels.fp8_mm(x, q, scale)
    assert y.dtype == torch.bfloat16 and y.shape == (8, n)
    assert torch.equal(y, cpu_kernels.fp8_mm(x, q, scale, scalar=True))
    assert torch.equal(y, torch.cat([cpu_kernels.fp8_mm(x[i:i + 1], q, scale) for i in range(8)]))
    for m in (2, 3, 5):
        assert torch.equal(y[:m], cpu_kernels.fp8_mm(x[:m], q, scale))
    ref = (x.float() @ q.float().t()) * scale
    assert ((y.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max()).all()


def test_fp8_codes_widen_exactly():
    """One-hot rows of x pick single codes: y = bf16(code), for all 254 non-NaN patterns, through
    the blocked (M = 16) and the single-row paths."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    q = torch.cat([codes, codes.new_zeros(2)]).view(16, 16).view(FP8)  # 256 slots, 254 codes
    eye = torch.eye(16).to(torch.bfloat16)
    want = q.float().to(torch.bfloat16).t()  # [16 x-rows (k), 16 weight rows (n)]
    assert torch.equal(cpu_kernels.fp8_mm(eye, q, torch.ones(16)), want)
    assert torch.equal(cpu_kernels.fp8_mm(eye[3:4], q, torch.ones(16)), want[3:4])


def test_fp8_layer_runs_the_chosen_kernel(monkeypatch):
    w, x = torch.randn(96, 64) * 0.05, torch.randn(3, 64).to(torch.bfloat16)
    ref = x.float() @ Fp8Linear.from_float(w).dequantize().t()
    for choice in ("tokenmill", "torch"):
        monkeypatch.setenv("TOKENMILL_CPU_PACKED", choice)
        base.cpu_packed_kernel.cache_clear()
        layer = Fp8Linear.from_float(w)
        assert layer.own_kernel == (choice == "tokenmill")
        y = layer.matmul(x)
        assert y.dtype == torch.bfloat16
        assert float((y.float() - ref).norm() / ref.norm()) < 4e-3
    monkeypatch.setenv("TOKENMILL_CPU_PACKED", "tokenmill")
    base.cpu_packed_kernel.cache_clear()
    assert not Fp8Linear.from_float(torch.randn(8, 40)).own_kernel  # K not a multiple of 16: emulated
    base.cpu_packed_kernel.cache_clear()


def test_fp8_bad_input_one_line_errors():
    q = fp8_codes(4, 32, 0)
    with pytest.raises(RuntimeError, match=r"q must be float8_e4m3fn \[N, Kp\] with x's Kp, a multiple of 16"):
        cpu_kernels.fp8_mm(torch.randn(2, 48).bfloat16(), q, torch.ones(4))
    with pytest.raises(RuntimeError, match=r"scale must be float32 \[N\]"):
        cpu_kernels.fp8_mm(torch.randn(2, 32).bfloat16(), q, torch.ones(4).bfloat16())


def test_int8_bad_input_one_line_errors():
    q = torch.zeros(4, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"q must be int8 \[N, Kp\] with x's Kp, a multiple of 16"):
        cpu_kernels.int8_mm(torch.randn(2, 48).bfloat16(), q, torch.ones(4).bfloat16())
    with pytest.raises(RuntimeError, match=r"scale must be bfloat16 \[N\]"):
        cpu_kernels.int8_mm(torch.randn(2, 32).bfloat16(), q, torch.ones(4))


def test_kernel_choice(monkeypatch):
    for value, expected in (("torch", "torch"), ("tokenmill", "tokenmill")):
        monkeypatch.setenv("TOKENMILL_CPU_PACKED", value)
        base.cpu_packed_kernel.cache_clear()
        assert base.cpu_packed_kernel() == expected
    monkeypatch.setenv("TOKENMILL_CPU_PACKED", "fast")
    base.cpu_packed_kernel.cache_clear()
    with pytest.raises(ConfigError, match="TOKENMILL_CPU_PACKED='fast': accepted auto, tokenmill, torch"):
        base.cpu_packed_kernel()
    monkeypatch.delenv("TOKENMILL_CPU_PACKED")
    base.cpu_packed_kernel.cache_clear()
    avx2_only = torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert base.cpu_packed_kernel() == ("tokenmill" if avx2_only else "torch")


def test_start_up_note_names_the_kernels(monkeypatch):
    from tokenmill.quant.report import weights_note

    w = torch.randn(64, 64) * 0.05
    for choice in ("tokenmill", "torch"):
        monkeypatch.setenv("TOKENMILL_CPU_PACKED", choice)
        base.cpu_packed_kernel.cache_clear()
        model = torch.nn.Sequential(Int4Linear.from_float(w, 32), Int8Linear.from_float(w))
        note = weights_note(model, "int4", torch.bfloat16)
        assert note.startswith("int4: 1 int4 g32 + 1 int8 packed linears")
        assert note.endswith("CPU kernels: tokenmill's (no AVX-512)") == (choice == "tokenmill")
    base.cpu_packed_kernel.cache_clear()
