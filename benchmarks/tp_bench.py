#!/usr/bin/env python3
"""Tensor parallelism on this machine: batch-1 decode with 1 rank and with N ranks.

Model: the ~1.07B random-weight llama of quant_bench.py (hidden 2048, 22 layers, 32 heads /
4 KV heads, FFN 5632, 49152-token vocabulary), as bf16 dense weights (from its F16 GGUF) and
as packed 4-bit (its Q4_1 GGUF). Each run is `tokenmill bench latency` in a process of its own
(batch 1, 32 prompt + 32 output tokens, medians over the repeats); ranks on one CPU split its
cores (1 thread each on a 2-core machine), so N ranks stream the same bytes with the same
cores and the same memory bandwidth: expect little gain here. What TP buys on one CPU is
memory per process (each rank holds 1/N of the weights); across GPUs or machines it also
divides the bytes each device streams per token.

    python benchmarks/tp_bench.py [--sizes 1,2] [--repeats 3] [--json tp.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from quant_bench import write_big_ggufs  # the same ~1B model

CONFIGS = {"bf16 dense": ("float", ["--quantization", "none", "--dtype", "bfloat16"]),
           "gguf packed 4-bit": ("packed", [])}


def run(model: Path, extra: list[str], tp: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "tokenmill.cli", "bench", "latency", "--model", str(model), "--device", "cpu",
           "--input-len", "32", "--output-len", "32", "--repeats", str(repeats), "--json",
           "--tensor-parallel-size", str(tp), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**__import__("os").environ, "TOKENMILL_LOG_LEVEL": "WARNING"})
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "tokenmill-bench")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    print("writing the ~1B random llama (once) ...", file=sys.stderr)
    f16, q41 = write_big_ggufs(args.cache_dir)
    sources = {"float": f16, "packed": q41}
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for label, (source, extra) in CONFIGS.items():
        base = None
        for tp in sizes:
            print(f"{label}, {tp} rank(s) ...", file=sys.stderr)
            r = run(sources[source], extra, tp, args.repeats)
            row = {"config": label, "tensor_parallel_size": tp, **r}
            if "error" not in r:
                base = base or r["decode_ms_per_token"]
                row["vs_1_rank"] = base / r["decode_ms_per_token"]
            rows.append(row)
    print(f"\n{'config':20s} {'ranks':>5s} {'decode ms/tok':>13s} {'x 1 rank':>8s} {'GB/s':>6s} "
          f"{'% peak':>6s} {'bound ms':>8s} {'MB/token':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:20s} {r['tensor_parallel_size']:5d}  error: {r['error']}")
            continue
        peak = r.get("peak_gbs") or float("nan")
        print(f"{r['config']:20s} {r['tensor_parallel_size']:5d} {r['decode_ms_per_token']:13.1f} "
              f"{r['vs_1_rank']:8.2f} {r['achieved_gbs']:6.1f} {100 * r['achieved_gbs'] / peak:6.0f} "
              f"{r['bound_ms_per_token'] or float('nan'):8.1f} {r['bytes_per_decode_token'] / 1e6:8.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
