"""The GPU check: the CUDA tests and the GPU benchmark in one go (for a machine with a GPU).

    python benchmarks/gpu_bench.py [--json gpu.json] [--skip-tests] [--tests-timeout 300] [--models 1b,8b]
                                   [--modes eager,graphs,compile,compile+graphs]
                                   [--int4-kernels tinygemm,triton] [--profile]

1. `pytest -m gpu` (tests marked gpu: Triton paged decode vs the torch reference, CUDA greedy
   tokens vs the CPU path, compiled and graph-replayed vs eager decode, packed kernels).
2. The card's measured bandwidth: a device-to-device copy of 2 GiB (bytes read + written / s).
3. Random-weight llama models (`--load-format dummy`): a Llama-3.2-1B-shaped one and the
   planner catalog's llama-3-8b, each in bf16 and packed int4 (group 32, each CUDA int4
   kernel named by --int4-kernels): batch-1 decode ms/token and achieved GB/s as % of the
   measured bandwidth, and output tokens/s for 64 concurrent requests of 128 prompt + 128
   output tokens, in each mode: eager, graphs (--cuda-graphs), compile (--compile),
   compile+graphs (both: the graphs replay the compiled layers).
   --profile adds, per row, what the GPU did in a batch-1 decode step (torch.profiler): kernel
   launches, summed kernel time against the step's wall time, and the top kernels.
4. The Triton paged decode kernel alone (8B's heads, bf16 KV, block 16): µs per call and KV
   GB/s at batch 1/8/64 and 256..8192 tokens of context, split-K (auto) against one range per
   (request, kv head) program.
Prints one table and writes JSON (after every row). Without CUDA it says so and exits 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

LLAMA_3_2_1B = {  # config.json of Llama-3.2-1B (the shape; weights are random)
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
}
GPU_TESTS = ["tests/gpu", "tests/quant/test_cuda.py", "tests/quant/test_triton_int4.py"]
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


def attention_bench(peak: float, repeats: int = 50) -> list[dict]:
    """Decode attention over paged bf16 KV (32 query / 8 KV heads of 128, block 16): µs per call
    (median, L2 holds little of it beyond 256 tokens) with num_splits=1 and auto."""
    from tokenmill.attention import triton_decode

    rows = []
    h, hkv, d, bs = 32, 8, 128, 16
    for batch in (1, 8, 64):
        for ctx in (256, 1024, 4096, 8192):
            width = ctx // bs
            k = torch.randn(batch * width + 1, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q = torch.randn(batch, h, d, device="cuda", dtype=torch.bfloat16)
            tables = (1 + torch.randperm(batch * width, device="cuda")).view(batch, width)
            lens = torch.full((batch,), ctx, device="cuda", dtype=torch.long)
            row = {"batch": batch, "ctx": ctx,
                   "auto_splits": triton_decode.split_count(q.device, batch * hkv, width)}
            for name, splits in (("one", 1), ("auto", None)):
                times = []
                for _ in range(repeats):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    triton_decode.paged_decode_attention(q, k, v, tables, lens, d ** -0.5, splits)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3)
                us = statistics.median(times[5:])
                row[f"{name}_us"] = us
                row[f"{name}_gbs"] = 2 * batch * ctx * hkv * d * 2 / us / 1e3
            rows.append(row)
            print(f"decode attention batch {batch:3d} ctx {ctx:5d}: one range {row['one_us']:8.1f} us "
                  f"({row['one_gbs']:5.0f} GB/s), {row['auto_splits']:2d} splits {row['auto_us']:8.1f} us "
                  f"({row['auto_gbs']:5.0f} GB/s = {100 * row['auto_gbs'] / peak:3.0f}% of measured)", flush=True)
            del k, v
    return rows


def profile_decode(llm, batch: int, steps: int = 20) -> dict:
    """`steps` decode steps of `batch` requests under torch.profiler: per step, kernel launches,
    summed kernel time and wall time, the host time outside the model runner, and the kernels
    that took the most time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from tokenmill.sampling_params import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"profile-{batch}-{i}", list(range(1000 + i, 1128 + i)), params)
    sched = engine.scheduler
    while sched.waiting or any(r.num_tokens - r.num_computed_tokens > 1 for r in sched.running):
        engine.step()  # the prefills
    for _ in range(2):
        engine.step()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    execute = engine.runner.execute

    def timed_execute(*args, **kwargs):  # the runner's share of the step (the rest is host work)
        with record_function("runner.execute"):
            return execute(*args, **kwargs)

    engine.runner.execute = timed_execute
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        wall = (time.perf_counter() - t0) / steps
    del engine.runner.execute
    while engine.has_unfinished_requests():
        engine.step()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels) / steps
    launches = sum(e.count for e in kernels) / steps
    runner_us = sum(e.cpu_time_total for e in events if e.key == "runner.execute") / steps
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:8]
    return {"batch": batch, "step_wall_ms": wall * 1e3, "kernel_ms_per_step": gpu_us / 1e3,
            "kernels_per_step": launches, "runner_ms_per_step": runner_us / 1e3,
            "top": [(e.key[:90], e.self_device_time_total / steps, e.count // steps) for e in top]}


def run_model(label: str, model: str, scheme: str, mode: str, peak: float, profile: bool) -> dict:
    """mode: eager | graphs (--cuda-graphs) | compile (--compile) | compile+graphs."""
    from tokenmill.bench.runs import bench_latency, bench_throughput
    from tokenmill.llm import LLM

    kw = dict(SCHEMES[scheme.split(" (")[0]])
    if "(" in scheme:  # "int4 g32 (triton)": the CUDA int4 kernel to build the layers for
        os.environ["TOKENMILL_CUDA_INT4"] = scheme.split("(")[1].rstrip(")")
    t0 = time.perf_counter()
    llm = LLM(model, load_format="dummy", device="cuda", kv_cache_memory_gb=8.0, max_num_seqs=64,
              max_num_batched_tokens=2048, max_model_len=512, compile="compile" in mode,
              cuda_graphs="graphs" in mode, show_progress=False, **kw)
    load_s = time.perf_counter() - t0
    lat = bench_latency(llm, 128, 128, repeats=3)
    thr = bench_throughput(llm, 64, 128, 128)
    row = {"model": label, "scheme": scheme, "mode": mode, "load_s": load_s,
           "decode_ms": lat.decode_ms_per_token, "achieved_gbs": lat.achieved_gbs,
           "pct_of_measured": 100 * lat.achieved_gbs / peak, "bytes_per_token": lat.bytes_per_decode_token,
           "bound_ms": lat.bytes_per_decode_token / (peak * 1e9) * 1e3,
           "throughput_64x128": thr.output_tokens_per_s}
    if profile:
        row["profile"] = [profile_decode(llm, b) for b in (1, 64)]
    llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--modes", default="eager,graphs,compile,compile+graphs")
    ap.add_argument("--int4-kernels", default="tinygemm,triton", help="CUDA int4 kernels to run int4 rows with")
    ap.add_argument("--profile", action="store_true", help="profile a batch-1 decode of each row")
    ap.add_argument("--tests-timeout", type=int, default=300, help="seconds the GPU tests may take")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: CUDA is not available on this machine; this script needs a GPU", file=sys.stderr)
        raise SystemExit(1)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if not args.skip_tests:
        t0 = time.perf_counter()
        try:  # a hung capture or compile must not take the figures' time too
            results["gpu_tests_rc"] = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", *GPU_TESTS],
                                                     timeout=args.tests_timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            results["gpu_tests_rc"] = f"timed out after {args.tests_timeout} s"
            print(f"GPU tests: timed out after {args.tests_timeout} s; going on to the figures", flush=True)
        results["gpu_tests_s"] = time.perf_counter() - t0
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    peak = measured_bandwidth_gbs()
    results["measured_gbs"] = peak
    print(f"{results['device']}: measured copy bandwidth {peak:.0f} GB/s", flush=True)

    try:
        results["attention"] = attention_bench(peak)
    except Exception as e:  # noqa: BLE001 - report and go on to the models
        results["attention"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(f"decode attention bench FAILED {results['attention']['error']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")

    tmp = Path(tempfile.mkdtemp(prefix="tokenmill-gpu-"))
    (tmp / "config.json").write_text(json.dumps(LLAMA_3_2_1B))
    models = {"1b": ("llama-3.2-1b-shaped", str(tmp)), "8b": ("llama-3-8b", "llama-3-8b")}
    rows = []
    results["runs"] = rows
    keys, modes = args.models.split(","), args.modes.split(",")
    schemes = ["bf16"] + [f"int4 g32 ({k})" for k in args.int4_kernels.split(",")]
    runs = [(k, s, m) for k in keys for m in modes for s in schemes]
    for key, scheme, mode in runs:
        label, model = models[key]
        try:
            row = run_model(label, model, scheme, mode, peak, args.profile)
        except Exception as e:  # noqa: BLE001 - report and go on: one failure must not hide the rest
            row = {"model": label, "scheme": scheme, "mode": mode, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()}
        rows.append(row)
        if "error" in row:
            print(f"{label:20s} {scheme:19s} {mode:14s} FAILED {row['error']}", flush=True)
        else:
            print(f"{label:20s} {scheme:19s} {mode:14s} decode {row['decode_ms']:7.2f} ms/token "
                  f"(bound {row['bound_ms']:.2f})  {row['achieved_gbs']:6.0f} GB/s = {row['pct_of_measured']:4.0f}% "
                  f"of measured  64x128/128: {row['throughput_64x128']:7.0f} tok/s", flush=True)
            for prof in row.get("profile", []):
                print(f"    profile batch {prof['batch']}: step {prof['step_wall_ms']:.2f} ms wall, "
                      f"runner {prof['runner_ms_per_step']:.2f} ms, {prof['kernel_ms_per_step']:.2f} ms in "
                      f"{prof['kernels_per_step']:.0f} kernels; top: "
                      + "; ".join(f"{name[:40]} {us:.0f}us x{n}" for name, us, n in prof["top"][:5]), flush=True)
        if args.json:  # after every row, so a run cut short still leaves what it measured
            args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
