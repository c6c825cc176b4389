"""Paged decode attention in Triton: the CUDA fast path of `paged._decode_attention`.

One query token per request attends over that request's first ctx_len cached tokens, which
live in fixed-size blocks of the KV pool named by its block table. The torch reference gathers
every block of the (padded) table into a dense [B, S, Hkv, D] copy, then softmaxes; this kernel
instead streams the blocks once, keeping a running (online) softmax, flash-decoding style.

Grid: one program per (request b, kv head kvh). The program owns the G = H / Hkv query heads
that share kv head kvh (GQA), so each K/V block is read from memory once per group, not once
per query head. G need not be a power of two: rows are padded to next_power_of_2(G) and masked.

    q_grp [G, D] (fp32)          m = -inf, l = 0, acc = 0          (per query row)
    for n in 0 .. cdiv(ctx_len, block_size) - 1:
        blk   = block_table[b, n]
        K, V  = cache[blk, :, kvh, :]            [BS, D]   tokens past ctx_len masked
        s     = q_grp @ K^T * scale              [G, BS]   (-inf where masked)
        m'    = max(m, rowmax(s))
        p     = exp(s - m')                      [G, BS]
        alpha = exp(m - m')                      rescales what was summed under the old max
        l     = l * alpha + rowsum(p)
        acc   = acc * alpha + p @ V              [G, D]
        m     = m'
    out[b, kvh*G : (kvh+1)*G] = acc / l

Split-K (flash-decoding): with few requests, (request, kv head) programs are too few to keep
the GPU busy (batch 1 of an 8B llama: 8 programs on 132 SMs, each walking its whole context
serially). Then a third grid axis splits each request's blocks into `num_splits` contiguous
ranges; each program writes its range's unnormalized partials (m, l, acc), and a second kernel
merges them per query head:

    M = max_s m_s;  w_s = exp2(m_s - M);  out = sum_s w_s * acc_s / sum_s w_s * l_s

An empty range (a short context split many ways) leaves m = -inf, l = 0, acc = 0: weight 0.
The ranges are cut per request from its own ctx_len on the device, so the split count is fixed
per batch size (CUDA graphs capture it) while contexts grow. Compiled steps (--compile) do not
split yet: their batch size is symbolic.

Only blocks below cdiv(ctx_len, block_size) are visited, so the 0-padding of the table is never
read, and every visited block holds at least one valid token, so m' is finite after the first
block. Exponentials use exp2 with the scale folded into log2(e) * scale (same math, cheaper).
All arithmetic is float32, as in the reference; the result is cast to q.dtype.

Quantized pools (QuantizedKVPool: int8 or e4m3 codes with a bf16 scale per token and KV head)
are read by the same kernel, each K/V row widened as codes * scale (`QUANTIZED`); e4m3 codes
need sm89+. The kernel also runs on CPU through Triton's interpreter when TRITON_INTERPRET=1 is
set before this module is imported (the interpreter is chosen when @triton.jit decorates the
kernel, i.e. at import).
"""

from __future__ import annotations

import functools

import torch

from tokenmill.kernels import triton_env
from tokenmill.kernels.triton_env import tl, triton

available = triton_env.available  # whether the kernel runs on a device
_HAS_TRITON = triton_env.HAS_TRITON

_LOG2E = 1.4426950408889634


if _HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr,
        ks_ptr, vs_ptr,  # QUANTIZED: bf16 scales [num_blocks, block_size, Hkv], contiguous
        m_ptr, l_ptr, acc_ptr,  # SPLIT: fp32 partials [B, H, num_splits] and [B, H, num_splits, HEAD_DIM]
        num_splits,
        qk_scale,  # scale * log2(e)
        stride_qb, stride_qh, stride_qd,
        stride_kn, stride_ks, stride_kh, stride_kd,
        stride_vn, stride_vs, stride_vh, stride_vd,
        stride_btb, stride_btn,
        stride_ob, stride_oh, stride_od,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
        PAD_G: tl.constexpr, PAD_D: tl.constexpr, PAD_BS: tl.constexpr, QUANTIZED: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        ctx_len = tl.load(ctx_ptr + b)
        num_blocks = tl.cdiv(ctx_len, BLOCK_SIZE)
        if SPLIT:  # this program's contiguous range of the request's blocks (maybe empty)
            per_split = tl.cdiv(num_blocks, num_splits)
            first = tl.program_id(2) * per_split
            last = tl.minimum(first + per_split, num_blocks)
        else:
            first = 0
            last = num_blocks

        g = tl.arange(0, PAD_G)  # [PAD_G]  query rows of this group
        d = tl.arange(0, PAD_D)  # [PAD_D]
        t = tl.arange(0, PAD_BS)  # [PAD_BS] token offset inside a block
        g_ok = g < G
        d_ok = d < HEAD_DIM
        heads = kvh * G + g  # [PAD_G] query head index

        q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd
        q_mask = g_ok[:, None] & d_ok[None, :]  # [PAD_G, PAD_D]
        q = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32)  # [PAD_G, PAD_D]

        m_i = tl.full([PAD_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([PAD_G], dtype=tl.float32)
        acc = tl.zeros([PAD_G, PAD_D], dtype=tl.float32)

        for n in range(first, last):
            blk = tl.load(bt_ptr + b * stride_btb + n * stride_btn).to(tl.int64)
            t_ok = (t < BLOCK_SIZE) & (n * BLOCK_SIZE + t < ctx_len)  # [PAD_BS]
            kv_mask = t_ok[:, None] & d_ok[None, :]  # [PAD_BS, PAD_D]
            k_ptrs = (k_ptr + blk * stride_kn + t[:, None] * stride_ks + kvh * stride_kh
                      + d[None, :] * stride_kd)
            v_ptrs = (v_ptr + blk * stride_vn + t[:, None] * stride_vs + kvh * stride_vh
                      + d[None, :] * stride_vd)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)  # [PAD_BS, PAD_D]
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(tl.float32)  # [PAD_BS, PAD_D]
            if QUANTIZED:  # codes * the scale of their (slot, kv head)
                sc = (blk * BLOCK_SIZE + t) * NUM_KV_HEADS + kvh  # [PAD_BS]
                k = k * tl.load(ks_ptr + sc, mask=t_ok, other=0.0).to(tl.float32)[:, None]
                v = v * tl.load(vs_ptr + sc, mask=t_ok, other=0.0).to(tl.float32)[:, None]

            # G is small and decode is memory bound: broadcast-multiply-sum, not tl.dot (M >= 16)
            # the cast keeps s fp32 when Inductor passes the Python-float scale as fp64
            s = (tl.sum(q[:, None, :] * k[None, :, :], axis=2) * qk_scale).to(tl.float32)  # [PAD_G, PAD_BS]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [PAD_G]
            p = tl.exp2(s - m_new[:, None])  # [PAD_G, PAD_BS]
            alpha = tl.exp2(m_i - m_new)  # [PAD_G]; 0 on the first block (m_i = -inf)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # [PAD_G, PAD_D]
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        if SPLIT:
            part = (b * (NUM_KV_HEADS * G) + heads) * num_splits + tl.program_id(2)  # [PAD_G]
            tl.store(m_ptr + part, m_i, mask=g_ok)
            tl.store(l_ptr + part, l_i, mask=g_ok)
            tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)
        else:
            out = acc / l_i[:, None]
            o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _merge_splits_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr, num_splits,
        stride_ob, stride_oh, stride_od,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_S: tl.constexpr, PAD_D: tl.constexpr,
    ):
        """One program per (request, query head): the weighted sum of its splits' partials."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, PAD_S)
        d = tl.arange(0, PAD_D)
        s_ok = sp < num_splits
        d_ok = d < HEAD_DIM
        part = (b * NUM_HEADS + h) * num_splits + sp  # [PAD_S]
        m = tl.load(m_ptr + part, mask=s_ok, other=float("-inf"))
        lsum = tl.load(l_ptr + part, mask=s_ok, other=0.0)
        acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                      other=0.0)  # [PAD_S, PAD_D]
        w = tl.exp2(m - tl.max(m, axis=0))  # 0 for empty splits (m = -inf); split 0 is never empty
        out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * lsum, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=d_ok)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                           scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Same contract as paged._decode_attention, for plain tensor pools.

    q [B, H, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
    (padded with 0); ctx_lens [B] (each >= 1). Returns [B, H, D] in q.dtype. num_splits: how
    many ranges each request's context is cut into (None: `split_count`).
    """
    return _launch(q, k_cache, v_cache, None, None, block_tables, ctx_lens, scale, num_splits)


def paged_decode_attention_quantized(q: torch.Tensor, k_pool, v_pool, block_tables: torch.Tensor,
                                     ctx_lens: torch.Tensor, scale: float,
                                     num_splits: int | None = None) -> torch.Tensor:
    """The same over QuantizedKVPools (quant/kv.py): each K/V row read as codes * its scale."""
    for pool in (k_pool, v_pool):
        if not pool.scale.is_contiguous():
            raise ValueError("the KV pools' scales must be contiguous [num_blocks, block_size, Hkv]")
    return _launch(q, k_pool.data, v_pool.data, k_pool.scale, v_pool.scale, block_tables, ctx_lens, scale,
                   num_splits)


MAX_SPLITS = 16
MIN_BLOCKS_PER_SPLIT = 2  # below this a range's partials cost about what its blocks do


def split_count(device: torch.device, programs: int, table_width: int) -> int:
    """Ranges per request's context: enough (request, kv head, range) programs for about two per
    SM, at most MAX_SPLITS, and none beyond what the table's width can fill. 1 off CUDA (the
    interpreter) and when the batch alone fills the GPU."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = -(-2 * _sm_count(index) // programs)
    return max(1, min(want, MAX_SPLITS, table_width // MIN_BLOCKS_PER_SPLIT))


@functools.cache
def _sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (asked once: split_count runs per layer)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def quantized_available(device: torch.device | str, kind: str) -> bool:
    """Whether paged_decode_attention_quantized reads `kind` ("int8" | "fp8") codes on `device`:
    Triton loads e4m3 codes on sm89+ only."""
    device = torch.device(device)
    if not available(device):
        return False
    return kind == "int8" or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


def _launch(q, k_cache, v_cache, k_scale, v_scale, block_tables, ctx_lens, scale: float,
            num_splits: int | None) -> torch.Tensor:
    if not _HAS_TRITON:
        raise RuntimeError("triton is not installed; use paged._decode_attention instead")
    b, h, d = q.shape
    _, bs, hkv, dk = k_cache.shape
    if v_cache.shape != k_cache.shape or dk != d or h % hkv:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    g = h // hkv
    out = torch.empty_like(q)  # [B, H, D]
    if b == 0:
        return out
    quantized = k_scale is not None
    if num_splits is None:
        # inside torch.compile the batch and table width are symbolic: choosing from them would
        # guard (and recompile) per value, so compiled steps keep one range per program
        compiling = torch.compiler.is_compiling()
        num_splits = 1 if compiling else split_count(q.device, b * hkv, block_tables.shape[1])
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits}: must be >= 1")
    split = num_splits > 1
    if split:  # unnormalized partials of every (request, query head, range)
        m = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
        lsum = torch.empty_like(m)
        acc = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
    else:
        m = lsum = acc = q  # unread
    _paged_decode_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, ctx_lens, out,
        k_scale if quantized else q, v_scale if quantized else q,  # unread when not QUANTIZED
        m, lsum, acc, num_splits,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        *k_cache.stride(), *v_cache.stride(),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        G=g, HEAD_DIM=d, BLOCK_SIZE=bs, NUM_KV_HEADS=hkv,
        PAD_G=triton.next_power_of_2(g), PAD_D=triton.next_power_of_2(d),
        PAD_BS=triton.next_power_of_2(bs), QUANTIZED=quantized, SPLIT=split,
    )
    if split:
        _merge_splits_kernel[(b, h)](
            m, lsum, acc, out, num_splits, out.stride(0), out.stride(1), out.stride(2),
            NUM_HEADS=h, HEAD_DIM=d, PAD_S=triton.next_power_of_2(max(num_splits, MAX_SPLITS)),  # one build
            PAD_D=triton.next_power_of_2(d),
        )
    return out
