"""Weight-only int4 matmul (w4a16) in Triton: the CUDA alternative to `aten._weight_int4pack_mm`.

Same convention as int4.py: W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g], g = k // group,
y = x @ W^T with x and y bf16 [M, K] / [M, N] and fp32 accumulation. scales_zeros is the
bf16 [K/group, Np, 2] (scale, zero) tensor that Int4Linear already stores (Np >= N).

Packed layout: uint8 [ceil(N/16), group/2, K/group, 16]. Output rows go in blocks of 16; a
byte holds two consecutive k of one row (the even k in the high nibble, as in Int4Linear's
`pairs`); inside a block, byte row j holds the j-th pair of every group, group after group:

    packed[b, j, g, r] = q[16b + r, g*group + 2j] << 4 | q[16b + r, g*group + 2j + 1]

    block b    g = 0                 g = 1                       g = K/group - 1
    j = 0      [r0 r1 ... r15]       [r0 r1 ... r15]     ...     [r0 ... r15]   one byte row:
    j = 1      [r0 r1 ... r15]       [r0 r1 ... r15]     ...     [r0 ... r15]   K/group * 16
    ...                                                                        contiguous bytes
    j = group/2 - 1

Why: in the GEMV a thread owns one (group, block) and reads it 16 bytes (16 rows x 2 k) at a
time, so a warp reads one byte row as 512 contiguous bytes, x is read once per 16 weights
(4 bytes of x per 16 of weight), and the thread sums x * q over its group before applying the
group's scale once. The GEMM's weight tile is 16-byte runs along n, as tl.dot's B operand wants.

Dequantization: t = 0x4B0000bb (one PRMT from the byte bb) is the float 2^23 + bb and
t & 0x4B00000F is 2^23 + the low nibble, so two subtractions give 16 * high and low nibble
exactly, with no int-to-float conversion (those run at a quarter rate). Then
W = q * scale + (zero - 8 * scale).

Kernels (deterministic: no split-K, no atomics; fp32 accumulation):
  - M <= GEMV_MAX_M, `_gemv_kernel` (decode, memory-bound; ~8 instructions per weight byte in
    its loop): one program per (row m, block of 16 outputs), GPS = 32 * num_warps groups per
    step (a group per thread), so N/16 programs (256 for N = 4096, 8016 for the 128256
    vocabulary) of 1-4 warps with 8-16 KB of loads in flight each. Rows m are the fastest grid
    axis so that programs reading one weight slab run together and share it through L2.
  - larger M, `_gemm_kernel`: [BLOCK_M, BLOCK_N] output tiles, m fastest (tiles sharing a weight
    slab run together). Per step of STEP_K, a [STEP_K, BLOCK_N] weight tile is dequantized to
    bf16 in registers as its even-k and odd-k halves, and two tl.dot (x's even and odd columns,
    split in registers) accumulate in fp32. BLOCK_M (16..128) is chosen here from M and is the
    autotuning key's M bucket; BLOCK_N, STEP_K, warps and stages are tuned per (BLOCK_M, N, K,
    group) from a decode set (BLOCK_M <= 64, small BLOCK_N for enough programs) or a prefill set.

  - M >= DENSE_MIN_M (prefill chunks), `_dequant_kernel` + cuBLAS: the weight is widened to
    bf16 once per call (one pass: N K / 2 bytes read, 2 N K written) and one dense GEMM runs.
    On the H200 the tl.dot kernel, bounded by its in-register dequantization, ran 2.3-4.2x
    slower than a bf16 GEMM at M = 256-2048 (docs/gpu.md), more than the widening costs.

Autotuning benchmarks on first use of each key and synchronizes: run every M bucket and shape
once before capturing a CUDA graph. K is a compile-time constant (a model has few). The kernels
also run on CPU through Triton's interpreter when TRITON_INTERPRET=1 is set before this module
is imported (one small config each, fp32 tl.dot, no PTX), which the tests use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels import triton_env
from tokenmill.kernels.triton_env import tl, triton

available = triton_env.available  # whether the kernels run on a device
_HAS_TRITON = triton_env.HAS_TRITON
_INTERPRET = triton_env.INTERPRET  # fixed at import: @triton.jit below picks the interpreter then

GROUP_SIZES = (32, 64, 128)
ROWS = 16  # output rows per packed block
GEMV_MAX_M = 1  # largest M that runs the GEMV kernel
DENSE_MIN_M = 256  # from this M on: widen the weight to bf16 and run one cuBLAS GEMM
DEQUANT_COLS = 128  # k columns per program of the widening kernel


def pack_int4_triton(q: torch.Tensor, group: int) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 -> uint8 [ceil(N/16), group/2, K/group, 16] (drawn in the module
    docstring); the rows that pad N to a multiple of 16 are 0."""
    if q.dim() != 2 or q.dtype != torch.uint8 or group not in GROUP_SIZES or q.shape[1] % group:
        raise ValueError(f"pack_int4_triton: q must be uint8 [N, K] with K a multiple of group "
                         f"{group} (one of {GROUP_SIZES}), got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    q = F.pad(q, (0, 0, 0, (-n) % ROWS))
    pairs = q[:, ::2] << 4 | q[:, 1::2]  # [Np, K/2], even k high
    blocks = pairs.view(-1, ROWS, k // group, group // 2)  # [Np/16, r, g, j]
    return blocks.permute(0, 3, 2, 1).contiguous()


def unpack_int4_triton(packed: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """The inverse of pack_int4_triton: q uint8 [n, K]."""
    nb, half, ng, rows = packed.shape  # [Np/16, group/2, K/group, 16]
    pairs = packed.permute(0, 3, 2, 1).reshape(nb * rows, ng * half)  # [Np, K/2]
    return torch.stack([pairs >> 4, pairs & 0xF], -1).reshape(nb * rows, ng * half * 2)[:n]


if _HAS_TRITON:

    def _bench(kernel_call, quantiles):
        """Autotuning timer: short, since tuning runs on the first call of every key."""
        return triton.testing.do_bench(kernel_call, warmup=5, rep=10, quantiles=quantiles)

    def _config(num_warps: int, num_stages: int, **kwargs) -> triton.Config:
        return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)

    if _INTERPRET:  # one small config each: the interpreter runs programs one by one in numpy
        _GEMV_CONFIGS = [_config(1, 1, GPS=16, JC=16)]
        _DECODE_CONFIGS = _PREFILL_CONFIGS = [_config(1, 1, BLOCK_N=32, STEP_K=128)]
    else:
        _GEMV_CONFIGS = [  # GPS = 32 * num_warps: one group per thread
            _config(1, 3, GPS=32, JC=16),
            _config(2, 3, GPS=64, JC=16),
            _config(4, 3, GPS=128, JC=16),
            _config(2, 3, GPS=64, JC=8),
            _config(4, 3, GPS=128, JC=8),
        ]
        _DECODE_CONFIGS = [  # BLOCK_M <= 64: memory-bound, many columns in flight per program
            _config(4, 4, BLOCK_N=32, STEP_K=256),
            _config(4, 3, BLOCK_N=64, STEP_K=256),
            _config(4, 4, BLOCK_N=64, STEP_K=128),
            _config(8, 3, BLOCK_N=128, STEP_K=128),
        ]
        _PREFILL_CONFIGS = [  # BLOCK_M = 128: compute-bound; STEP_K >= 128 for group 128
            _config(4, 4, BLOCK_N=64, STEP_K=128),
            _config(8, 4, BLOCK_N=64, STEP_K=128),
            _config(8, 3, BLOCK_N=128, STEP_K=128),
            _config(4, 3, BLOCK_N=128, STEP_K=128),
        ]

    # The interpreter's tl.dot multiplies bf16 bit patterns as integers: give it the values in fp32.
    _DOT_DTYPE = tl.constexpr(tl.float32 if _INTERPRET else tl.bfloat16)

    # The interpreter runs no PTX: it takes the plain Triton form of _nibbles.
    _PRMT = tl.constexpr(not _INTERPRET)

    @triton.jit
    def _nibbles(b):
        """Packed bytes (uint8) -> (16 * high nibble, low nibble) as exact fp32.

        t = 0x4B0000bb is 2^23 + byte as a float and t & 0x4B00000F is 2^23 + low nibble, so two
        subtractions give both nibbles: no int-to-float conversion (quarter rate). PRMT builds t
        from the byte and the constant in one instruction; the compiler would extract the byte
        and OR the constant in separately."""
        if _PRMT:
            t = tl.inline_asm_elementwise(
                "prmt.b32 $0, $4, 0x4B000000, 0x7540;\n\tprmt.b32 $1, $4, 0x4B000000, 0x7541;\n\t"
                "prmt.b32 $2, $4, 0x4B000000, 0x7542;\n\tprmt.b32 $3, $4, 0x4B000000, 0x7543;",
                "=r,=r,=r,=r,r", [b], dtype=tl.int32, is_pure=True, pack=4)
        else:
            t = b.to(tl.int32) | 0x4B000000
        lo = (t & 0x4B00000F).to(tl.float32, bitcast=True)
        return t.to(tl.float32, bitcast=True) - lo, lo - 8388608.0

    @triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "GROUP"], do_bench=_bench)
    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, sz_ptr, y_ptr, M, N,
        stride_xm, stride_wb, stride_sg, stride_ym,
        K: tl.constexpr, GROUP: tl.constexpr, GPS: tl.constexpr, JC: tl.constexpr,
    ):
        NUM_GROUPS: tl.constexpr = K // GROUP
        NJC: tl.constexpr = GROUP // 2 // JC  # byte-row chunks per group
        m = tl.program_id(0)
        blk = tl.program_id(1)
        gi = tl.arange(0, GPS)
        c = tl.arange(0, GPS * 16)  # (group, row) of one byte row: contiguous bytes
        t = tl.arange(0, 2)
        n = blk * 16 + tl.arange(0, 16)
        n_ok = n < N

        w_ptrs = w_ptr + blk.to(tl.int64) * stride_wb + c  # + (j * NUM_GROUPS + g0) * 16
        x_ptrs = x_ptr + m.to(tl.int64) * stride_xm + gi[:, None] * GROUP + t[None, :]  # + 2j
        sz_ptrs = sz_ptr + gi[:, None, None] * stride_sg + n[None, :, None] * 2 + t[None, None, :]

        acc = tl.zeros([GPS, 16], dtype=tl.float32)
        for step in range((NUM_GROUPS + GPS - 1) // GPS * NJC):
            g0 = step // NJC * GPS
            j0 = step % NJC * JC
            g_ok = g0 + gi < NUM_GROUPS
            c_ok = g0 + c // 16 < NUM_GROUPS
            # sum_j x * q per (group, row), scaled once per group: one FMA per weight
            part = tl.zeros([GPS, 16], dtype=tl.float32)
            x_sum = tl.zeros([GPS], dtype=tl.float32)
            for jj in tl.static_range(JC):
                j = j0 + jj
                b = tl.load(w_ptrs + (j * NUM_GROUPS + g0) * 16, mask=c_ok, other=0)
                hi16, lo = _nibbles(tl.reshape(b, (GPS, 16)))
                xv = tl.load(x_ptrs + g0 * GROUP + 2 * j, mask=g_ok[:, None], other=0.0)
                x_even, x_odd = tl.split(xv.to(tl.float32))  # [GPS]
                part = tl.fma(hi16, (x_even * 0.0625)[:, None], tl.fma(lo, x_odd[:, None], part))
                x_sum += x_even + x_odd
            sz = tl.load(sz_ptrs + g0 * stride_sg, mask=g_ok[:, None, None] & n_ok[None, :, None],
                         other=0.0)
            s, z = tl.split(sz.to(tl.float32))  # [GPS, 16]
            acc += s * part + (z - 8.0 * s) * x_sum[:, None]
        y = tl.sum(acc, axis=0)  # [16]
        tl.store(y_ptr + m.to(tl.int64) * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, sz_ptr, y_ptr, M, N,
        stride_xm, stride_wb, stride_sg, stride_ym,
        K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        STEP_K: tl.constexpr,
    ):
        NUM_GROUPS: tl.constexpr = K // GROUP
        NB: tl.constexpr = BLOCK_N // 16  # packed blocks per tile
        GPS: tl.constexpr = STEP_K // GROUP
        HALF: tl.constexpr = GROUP // 2
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = tl.program_id(0) % num_m
        pid_n = tl.program_id(0) // num_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, STEP_K)
        gi = tl.arange(0, GPS)
        j = tl.arange(0, HALF)
        blk = pid_n * NB + tl.arange(0, NB)
        r = tl.arange(0, 16)
        t = tl.arange(0, 2)
        n = blk[:, None] * 16 + r[None, :]  # [NB, 16]
        m_ok = (rm < M)[:, None]
        blk_ok = (blk * 16 < N)[None, None, :, None]

        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]  # [BLOCK_M, STEP_K]
        w_ptrs = (w_ptr + blk.to(tl.int64)[None, None, :, None] * stride_wb  # [GPS, HALF, NB, 16]
                  + (j[None, :, None, None] * NUM_GROUPS + gi[:, None, None, None]) * 16
                  + r[None, None, None, :])
        sz_ptrs = (sz_ptr + gi[:, None, None, None] * stride_sg  # [GPS, NB, 16, 2]
                   + n[None, :, :, None] * 2 + t[None, None, None, :])

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g0 in range(0, NUM_GROUPS, GPS):
            g_ok = (g0 + gi < NUM_GROUPS)[:, None, None, None]
            x = tl.load(x_ptrs + g0 * GROUP, mask=m_ok & (g0 * GROUP + rk < K)[None, :], other=0.0)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, STEP_K // 2, 2)))  # k = 2kk + t
            b = tl.load(w_ptrs + g0 * 16, mask=g_ok & blk_ok, other=0)
            sz = tl.load(sz_ptrs + g0 * stride_sg, mask=g_ok & (n < N)[None, :, :, None], other=0.0)
            s, z = tl.split(sz.to(tl.float32))  # [GPS, NB, 16]
            s, z8 = s[:, None, :, :], (z - 8.0 * s)[:, None, :, :]
            hi16, lo = _nibbles(b)  # [GPS, HALF, NB, 16]: kk = g * HALF + j
            w_even = tl.reshape(hi16 * (s * 0.0625) + z8, (STEP_K // 2, BLOCK_N))
            w_odd = tl.reshape(lo * s + z8, (STEP_K // 2, BLOCK_N))
            acc = tl.dot(x_even.to(_DOT_DTYPE), w_even.to(tl.bfloat16).to(_DOT_DTYPE), acc)
            acc = tl.dot(x_odd.to(_DOT_DTYPE), w_odd.to(tl.bfloat16).to(_DOT_DTYPE), acc)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=m_ok & (rn < N)[None, :])

    _gemm_decode = triton.autotune(configs=_DECODE_CONFIGS, key=["BLOCK_M", "N", "K", "GROUP"],
                                   do_bench=_bench)(_gemm_kernel)
    _gemm_prefill = triton.autotune(configs=_PREFILL_CONFIGS, key=["BLOCK_M", "N", "K", "GROUP"],
                                    do_bench=_bench)(_gemm_kernel)


if _HAS_TRITON:

    @triton.jit
    def _dequant_kernel(w_ptr, sz_ptr, out_ptr, N, stride_wb, stride_sg, stride_on,
                        K: tl.constexpr, GROUP: tl.constexpr, GPP: tl.constexpr):
        """W bf16 [N, K] from the packed layout: program (16-row block, GPP groups)."""
        NUM_GROUPS: tl.constexpr = K // GROUP
        HALF: tl.constexpr = GROUP // 2
        blk = tl.program_id(0)
        j = tl.arange(0, HALF)
        r = tl.arange(0, 16)
        n = blk * 16 + r
        n_ok = n < N
        for gg in tl.static_range(GPP):
            g = tl.program_id(1) * GPP + gg
            if g < NUM_GROUPS:
                b = tl.load(w_ptr + blk.to(tl.int64) * stride_wb + (j[:, None] * NUM_GROUPS + g) * 16 + r[None, :])
                hi16, lo = _nibbles(b)  # [HALF, 16]
                s = tl.load(sz_ptr + g * stride_sg + n * 2, mask=n_ok, other=0.0).to(tl.float32)
                z8 = tl.load(sz_ptr + g * stride_sg + n * 2 + 1, mask=n_ok, other=0.0).to(tl.float32) - 8.0 * s
                w_even = hi16 * (s * 0.0625)[None, :] + z8[None, :]  # k = g * GROUP + 2j
                w_odd = lo * s[None, :] + z8[None, :]  # k = g * GROUP + 2j + 1
                cols = out_ptr + n.to(tl.int64)[None, :] * stride_on + g * GROUP + 2 * j[:, None]
                tl.store(cols, w_even.to(tl.bfloat16), mask=n_ok[None, :])
                tl.store(cols + 1, w_odd.to(tl.bfloat16), mask=n_ok[None, :])


def dequantize_int4_triton(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, n: int) -> torch.Tensor:
    """W bf16 [n, K] (the values int4_matmul multiplies by, rounded to bf16) in one kernel."""
    k = scales_zeros.shape[0] * group
    w = torch.empty((n, k), dtype=torch.bfloat16, device=packed.device)
    gpp = max(1, DEQUANT_COLS // group)
    grid = (triton.cdiv(n, ROWS), triton.cdiv(k // group, gpp))
    _dequant_kernel[grid](packed, scales_zeros, w, n, packed.stride(0), scales_zeros.stride(0), w.stride(0),
                          K=k, GROUP=group, GPP=gpp)
    return w


def _check(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
           n: int) -> None:
    if x.dim() != 2 or x.dtype != torch.bfloat16 or x.stride(-1) != 1:
        raise ValueError(f"int4_matmul: x must be bf16 [M, K] with unit stride along K, got "
                         f"{x.dtype} {tuple(x.shape)} strides {x.stride()}")
    k = x.shape[1]
    if group not in GROUP_SIZES or k % group:
        raise ValueError(f"int4_matmul: group {group} must be one of {GROUP_SIZES} and divide K={k}")
    shape = (group // 2, k // group, ROWS)
    if (packed.dtype != torch.uint8 or packed.dim() != 4 or packed.shape[0] * ROWS < n
            or packed.shape[1:] != shape or not packed.is_contiguous()):
        raise ValueError(f"int4_matmul: packed must be contiguous uint8 [>= {-(-n // ROWS)}, "
                         f"{', '.join(map(str, shape))}] (pack_int4_triton), got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if (scales_zeros.dtype != torch.bfloat16 or scales_zeros.dim() != 3
            or scales_zeros.shape[0] != k // group or scales_zeros.shape[1] < n
            or scales_zeros.shape[2] != 2 or not scales_zeros.is_contiguous()):
        raise ValueError(f"int4_matmul: scales_zeros must be contiguous bf16 [{k // group}, >= {n}, 2], "
                         f"got {scales_zeros.dtype} {tuple(scales_zeros.shape)}")
    if not (x.device == packed.device == scales_zeros.device):
        raise ValueError(f"int4_matmul: tensors on different devices: x {x.device}, packed "
                         f"{packed.device}, scales_zeros {scales_zeros.device}")
    if not available(x.device):
        raise ValueError(f"int4_matmul: needs triton and CUDA (or TRITON_INTERPRET=1), x is on {x.device}")


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                n: int) -> torch.Tensor:
    """y = x @ W^T, bf16 [M, n], for x bf16 [M, K], packed = pack_int4_triton(q, group) and
    scales_zeros bf16 [K/group, >= n, 2]. No host sync and no allocation but y (and, from
    DENSE_MIN_M rows on, the widened weight)."""
    _check(x, packed, scales_zeros, group, n)
    m, k = x.shape
    if m >= DENSE_MIN_M:
        return F.linear(x, dequantize_int4_triton(packed, scales_zeros, group, n))
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    if m == 0 or n == 0:
        return y
    args = (x, packed, scales_zeros, y, m, n,
            x.stride(0), packed.stride(0), scales_zeros.stride(0), y.stride(0))
    if m <= GEMV_MAX_M:
        _gemv_kernel[(m, triton.cdiv(n, ROWS))](*args, K=k, GROUP=group)
    else:
        block_m = min(max(triton.next_power_of_2(m), 16), 128)
        kernel = _gemm_decode if block_m <= 64 else _gemm_prefill
        grid = (lambda meta: (triton.cdiv(m, block_m) * triton.cdiv(n, meta["BLOCK_N"]),))
        kernel[grid](*args, K=k, GROUP=group, BLOCK_M=block_m)
    return y
