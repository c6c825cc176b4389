"""The GPU check: run the CUDA tests and the GPU benchmark in one go (for a lent CUDA machine).

    python benchmarks/gpu_bench.py [--json gpu.json]

1. `pytest -m gpu` (tests marked gpu; skipped on machines without CUDA).
2. SmolLM2-135M on cuda: batch-1 latency and 32-request throughput in bfloat16, with weights
   dequantized and packed (GGUF), each beside its bytes-per-token bound.
Prints one table and writes JSON. On a machine without CUDA it says so and exits 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: CUDA is not available on this machine; this script needs a GPU", file=sys.stderr)
        raise SystemExit(1)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if not args.skip_tests:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"])
        results["gpu_tests_rc"] = rc

    from tokenmill.bench.runs import bench_latency, bench_throughput
    from tokenmill.llm import LLM

    rows = []
    for label, kwargs in [("bf16 dense", {"dtype": "bfloat16", "quantization": "none"}),
                          ("bf16 gguf-packed", {"dtype": "bfloat16", "quantization": "auto"})]:
        try:
            llm = LLM("smollm2-135m", device="cuda", kv_cache_memory_gb=4.0, max_num_seqs=64,
                      max_num_batched_tokens=2048, max_model_len=512, **kwargs)
            lat = bench_latency(llm, 128, 128, repeats=5)
            tp = bench_throughput(llm, 32, 128, 128)
            rows.append({"config": label, "latency": lat.__dict__, "throughput": tp.__dict__})
            print(f"{label:18s} decode {lat.decode_ms_per_token:7.2f} ms/token  prefill "
                  f"{lat.prefill_tokens_per_s:9.0f} tok/s  {lat.achieved_gbs:7.1f} GB/s  "
                  f"throughput(32x128/128) {tp.output_tokens_per_s:8.1f} tok/s")
            del llm
            torch.cuda.empty_cache()
        except Exception as e:  # report and go on: one failing configuration must not hide the rest
            rows.append({"config": label, "error": f"{type(e).__name__}: {e}"})
            print(f"{label}: FAILED {type(e).__name__}: {e}")
    results["runs"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
