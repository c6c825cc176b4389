#!/usr/bin/env python3
"""int4 weight-only matmul kernels on CUDA, llama-3-8b shapes: a bf16 torch matmul on the
dequantized weight, tinygemm (`aten._weight_int4pack_mm`, what Int4Linear runs today) and the
Triton kernel (tokenmill/quant/triton_int4.py).

Per (N, K) and M: the median µs of each (CUDA events; L2 flushed before every call, so that the
weight streams from HBM as in a decode step), the GB/s this is in weight bytes (bf16: 2NK; int4:
NK/2 plus the bf16 scales and zeros, 4NK/group), the Triton/tinygemm time ratio, and the
largest error of Triton's and tinygemm's results relative to the bf16 matmul's (max |y - y_bf16|
/ max |y_bf16|), so that a wrong kernel shows.

    python benchmarks/int4_kernels.py [--group 32] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name -> (N, K)
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
MS = [1, 16, 64, 256, 2048]
REP_MS = 20  # measured time per kernel and shape, at most MAX_REPS calls
MAX_REPS = 100


def tinygemm_weights(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int):
    """(packed, scales_zeros) built as Int4Linear.__init__ builds them on CUDA."""
    k = q.shape[1]
    pad = (-q.shape[0]) % 8
    q = F.pad(q, (0, 0, 0, pad))
    sz = torch.stack([F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))], -1)  # [Np, K/g, 2]
    scales_zeros = sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/g, Np, 2]
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # [Np, K/2] uint8, even k high
    tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles), scales_zeros


def kernels(x, w_bf16, tg_packed, tri_packed, scales_zeros, group: int) -> dict:
    """name -> a call computing x @ W^T with that kernel."""
    from tokenmill.quant.triton_int4 import int4_matmul

    n = w_bf16.shape[0]
    return {
        "bf16": lambda: x @ w_bf16.t(),
        "tinygemm": lambda: torch.ops.aten._weight_int4pack_mm(x, tg_packed, group,
                                                              scales_zeros)[:, :n],
        "triton": lambda: int4_matmul(x, tri_packed, scales_zeros, group, n),
    }


def bench_us(fn, flush: torch.Tensor) -> float:
    """Median µs of fn() over up to MAX_REPS calls, each after an L2 flush."""
    fn()  # compiles and autotunes on first use
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = max(5, min(MAX_REPS, int(REP_MS / 1e3 / max(time.perf_counter() - t0, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", type=int, default=32, choices=[32, 64, 128])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("int4_kernels: needs a CUDA GPU (tinygemm and the Triton kernel are CUDA kernels)")
        return 1
    import triton

    from tokenmill.quant.int4 import dequantize_int4, quantize_int4
    from tokenmill.quant.triton_int4 import pack_int4_triton

    dev, group = torch.device("cuda"), args.group
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)  # several times the L2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"int4 group {group}; weight GB/s; err = max |y - y_bf16| / max |y_bf16|")
    head = (f"{'shape':>8} {'N':>6} {'K':>5} {'M':>5} | {'bf16 us':>8} {'GB/s':>5} | "
            f"{'tinygemm':>8} {'GB/s':>5} | {'triton':>8} {'GB/s':>5} | {'tri/tg':>6} | "
            f"{'tri err':>7} {'tg err':>7}")
    print(head)
    print("-" * len(head))
    rows, t_start = [], time.perf_counter()
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        q, scale, zero = quantize_int4(w, group)
        w_bf16 = dequantize_int4(q, scale, zero, group).to(torch.bfloat16)
        del w
        tg_packed, scales_zeros = tinygemm_weights(q, scale, zero, group)
        tri_packed = pack_int4_triton(q, group)
        del q, scale, zero
        bytes_bf16, bytes_int4 = 2 * n * k, n * k // 2 + 4 * n * k // group
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            calls = kernels(x, w_bf16, tg_packed, tri_packed, scales_zeros, group)
            us = {key: bench_us(fn, flush) for key, fn in calls.items()}
            y_ref = calls["bf16"]()
            err = {key: max_rel(calls[key](), y_ref) for key in ("triton", "tinygemm")}
            gbs = {key: (bytes_bf16 if key == "bf16" else bytes_int4) / us[key] / 1e3 for key in us}
            row = {"shape": name, "n": n, "k": k, "m": m, "group": group,
                   **{f"{key}_us": round(v, 2) for key, v in us.items()},
                   **{f"{key}_gbs": round(v, 1) for key, v in gbs.items()},
                   "triton_over_tinygemm": round(us["triton"] / us["tinygemm"], 3),
                   "triton_err": err["triton"], "tinygemm_err": err["tinygemm"]}
            rows.append(row)
            print(f"{name:>8} {n:>6} {k:>5} {m:>5} | {us['bf16']:>8.1f} {gbs['bf16']:>5.0f} | "
                  f"{us['tinygemm']:>8.1f} {gbs['tinygemm']:>5.0f} | {us['triton']:>8.1f} "
                  f"{gbs['triton']:>5.0f} | {row['triton_over_tinygemm']:>6.2f} | "
                  f"{err['triton']:>7.1e} {err['tinygemm']:>7.1e}", flush=True)
        del w_bf16, tg_packed, tri_packed, scales_zeros
        torch.cuda.empty_cache()
    print(f"{time.perf_counter() - t_start:.0f} s (including compilation and autotuning)")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": triton.__version__, "group": group}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
