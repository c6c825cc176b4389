"""The GPU check: the CUDA tests and the GPU benchmark in one go (for a machine with a GPU).

    python benchmarks/gpu_bench.py [--json gpu.json] [--skip-tests] [--models 1b,8b] [--compile] [--cuda-graphs]

1. `pytest -m gpu` (tests marked gpu: Triton paged decode vs the torch reference, CUDA greedy
   tokens vs the CPU path, compiled vs eager decode, packed kernels; skipped without CUDA).
2. The card's measured bandwidth: a device-to-device copy of 2 GiB (bytes read + written / s).
3. Random-weight llama models (`--load-format dummy`): a Llama-3.2-1B-shaped one and the
   planner catalog's llama-3-8b, each in bf16 and packed int4 (group 32): batch-1 decode
   ms/token and achieved GB/s as % of the measured bandwidth, and output tokens/s for 64
   concurrent requests of 128 prompt + 128 output tokens. `--compile` adds compiled-decode rows,
   `--cuda-graphs` rows replaying captured decode graphs.
Prints one table and writes JSON. On a machine without CUDA it says so and exits 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA_3_2_1B = {  # config.json of Llama-3.2-1B (the shape; weights are random)
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
}
SCHEMES = {"bf16": {"dtype": "bfloat16", "quantization": "none"}, "int4 g32": {"quantization": "int4"}}


def measured_bandwidth_gbs(gib: float = 2.0, repeats: int = 10) -> float:
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n * 2 / statistics.median(times[2:]) / 1e9


def run_model(label: str, model: str, scheme: str, mode: str, peak: float) -> dict:
    """mode: eager | compile (--compile) | graphs (--cuda-graphs)."""
    from tokenmill.bench.runs import bench_latency, bench_throughput
    from tokenmill.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(model, load_format="dummy", device="cuda", kv_cache_memory_gb=8.0, max_num_seqs=64,
              max_num_batched_tokens=2048, max_model_len=512, compile=mode == "compile",
              cuda_graphs=mode == "graphs", show_progress=False,
              **SCHEMES[scheme])
    load_s = time.perf_counter() - t0
    lat = bench_latency(llm, 128, 128, repeats=3)
    thr = bench_throughput(llm, 64, 128, 128)
    row = {"model": label, "scheme": scheme, "mode": mode, "load_s": load_s,
           "decode_ms": lat.decode_ms_per_token, "achieved_gbs": lat.achieved_gbs,
           "pct_of_measured": 100 * lat.achieved_gbs / peak, "bytes_per_token": lat.bytes_per_decode_token,
           "bound_ms": lat.bytes_per_decode_token / (peak * 1e9) * 1e3,
           "throughput_64x128": thr.output_tokens_per_s}
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--compile", action="store_true", help="also run each model in bf16 with --compile")
    ap.add_argument("--cuda-graphs", action="store_true", help="also run each scheme with --cuda-graphs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: CUDA is not available on this machine; this script needs a GPU", file=sys.stderr)
        raise SystemExit(1)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if not args.skip_tests:
        t0 = time.perf_counter()
        results["gpu_tests_rc"] = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"])
        results["gpu_tests_s"] = time.perf_counter() - t0
    peak = measured_bandwidth_gbs()
    results["measured_gbs"] = peak
    print(f"{results['device']}: measured copy bandwidth {peak:.0f} GB/s", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="tokenmill-gpu-"))
    (tmp / "config.json").write_text(json.dumps(LLAMA_3_2_1B))
    models = {"1b": ("llama-3.2-1b-shaped", str(tmp)), "8b": ("llama-3-8b", "llama-3-8b")}
    rows = []
    for key in args.models.split(","):
        label, model = models[key]
        runs = [(s, "eager") for s in SCHEMES] + ([("bf16", "compile")] if args.compile else [])
        runs += [(s, "graphs") for s in SCHEMES] if args.cuda_graphs else []
        for scheme, mode in runs:
            try:
                row = run_model(label, model, scheme, mode, peak)
            except Exception as e:  # noqa: BLE001 - report and go on: one failure must not hide the rest
                row = {"model": label, "scheme": scheme, "mode": mode, "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            if "error" in row:
                print(f"{label:20s} {scheme:8s} {mode:7s} FAILED {row['error']}", flush=True)
            else:
                print(f"{label:20s} {scheme:8s} {mode:7s} decode {row['decode_ms']:7.2f} ms/token "
                      f"(bound {row['bound_ms']:.2f})  {row['achieved_gbs']:6.0f} GB/s = {row['pct_of_measured']:4.0f}% "
                      f"of measured  64x128/128: {row['throughput_64x128']:7.0f} tok/s", flush=True)
    results["runs"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
