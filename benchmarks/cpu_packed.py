#!/usr/bin/env python3
"""Packed weight kernels on this CPU: torch's (`aten._weight_int4pack_mm_for_cpu`,
`aten._weight_int8pack_mm`) against tokenmill's (kernels/csrc/int4_mm.cpp, int8_mm.cpp), on the
same packed tensors, SmolLM2-135M and llama-3-8b shapes, batch sizes 1 to 64; for int4 also
tokenmill's int8-activation kernel (kernels/csrc/int4_q8_mm.cpp, opt-in in the engine) on the same
codes in its own layout.

Per (kernel, shape, M): the median ms of alternating calls (torch, tokenmill, torch, ...), the GB/s
that is in weight bytes (int4: NK/2 plus the bf16 scales and zeros, 4NK/32; int8: NK plus 2N),
and tokenmill's speed-up. Weights larger than the last-level cache stream from DRAM as in a
decode step; the SmolLM2 layers alone fit in it, so their figures are upper bounds (the engine's
ms/token is the figure that counts: `tokenmill bench latency`). Prints a table; --json saves it;
--plot draws the GB/s per shape at M = 1.

    python benchmarks/cpu_packed.py [--batches 1,4,16,64] [--repeats 30] [--json F] [--plot F.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.quant.int4 import cpu_tile_rows, pack_q8

SHAPES = {  # name -> (kind, N, K)
    "smollm2 qkv": ("int4", 960, 576),
    "smollm2 gate_up": ("int4", 3072, 576),
    "smollm2 down": ("int4", 576, 1536),
    "smollm2 lm_head": ("int8", 49152, 576),
    "8b o_proj": ("int4", 4096, 4096),
    "8b gate_up": ("int4", 28672, 4096),
    "8b lm_head": ("int8", 128256, 4096),
}


def median_ms(fns: list, repeats: int) -> list[float]:
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for f, t in zip(fns, times):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def kernels(kind: str, n: int, k: int):
    """(weight bytes, torch's call, tokenmill's call, tokenmill's int8-activation call or None)
    for x [M, K] bf16."""
    g = torch.Generator().manual_seed(0)
    if kind == "int4":
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = (torch.randn(k // 32, n, 2, generator=g) * 0.02).to(torch.bfloat16)
        tile = cpu_tile_rows()
        q8 = pack_q8(q)
        return (n * k // 2 + 4 * n * k // 32,
                lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz),
                lambda x: cpu_kernels.int4_mm(x, packed, 32, sz, tile),
                lambda x: cpu_kernels.int4_q8_mm(x, q8, 32, sz))
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
    return (n * k + 2 * n, lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale),
            lambda x: cpu_kernels.int8_mm(x, q, scale), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of: " + ", ".join(SHAPES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    if not cpu_kernels.load():
        print("tokenmill's C++ CPU kernels are unavailable here (see the log)", file=sys.stderr)
        return 1
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        print(f"unknown shape(s) {', '.join(unknown)}: accepted {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, int4 tiles of {cpu_tile_rows()} rows", flush=True)
    rows = []
    print("| shape | kind | N x K | M | torch ms | tokenmill ms | torch GB/s | tokenmill GB/s | speed-up "
          "| int8-act ms | int8-act vs tokenmill |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        kind, n, k = SHAPES[name]
        nbytes, theirs, ours, q8 = kernels(kind, n, k)
        for m in batches:
            x = torch.randn(m, k).to(torch.bfloat16)
            calls = [lambda: theirs(x), lambda: ours(x)] + ([lambda: q8(x)] if q8 else [])
            t_torch, t_ours, *t_q8 = median_ms(calls, args.repeats)
            row = dict(shape=name, kind=kind, n=n, k=k, m=m, torch_ms=t_torch, tokenmill_ms=t_ours,
                       torch_gbs=nbytes / t_torch / 1e6, tokenmill_gbs=nbytes / t_ours / 1e6,
                       int8_act_ms=t_q8[0] if t_q8 else None)
            rows.append(row)
            q8_cols = f"{t_q8[0]:.3f} | {t_ours / t_q8[0]:.2f}x" if t_q8 else "- | -"
            print(f"| {name} | {kind} | {n} x {k} | {m} | {t_torch:.3f} | {t_ours:.3f} | {row['torch_gbs']:.1f} | "
                  f"{row['tokenmill_gbs']:.1f} | {t_torch / t_ours:.2f}x | {q8_cols} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ones = [r for r in rows if r["m"] == batches[0]]
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = range(len(ones))
        ax.bar([i - 0.2 for i in xs], [r["torch_gbs"] for r in ones], 0.4, label="torch")
        ax.bar([i + 0.2 for i in xs], [r["tokenmill_gbs"] for r in ones], 0.4, label="tokenmill")
        ax.set_xticks(list(xs), [r["shape"] for r in ones], rotation=30, ha="right")
        ax.set_ylabel(f"GB/s of weights at M = {batches[0]}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
