"""tokenmill beside Hugging Face transformers on the same GGUF and the same workloads, one run.

    python benchmarks/peers.py [--input-len 128 --output-len 64 --num-requests 32 --repeats 3]

Workloads (random prompt tokens, greedy, no early stop):
  latency     batch 1: prefill tokens/s and decode ms/token
  throughput  N requests of I prompt + O output tokens submitted together: output tokens/s
transformers runs in float32 (as it loads a GGUF), batched greedy `generate` with left padding.
tokenmill runs in the dtype:quantization configs given by --configs. Prints a table and the ratios; --json writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def hf_latency(model, input_len: int, output_len: int, repeats: int) -> dict:
    prefill, decode = [], []
    for r in range(repeats + 1):
        ids = torch.randint(100, model.config.vocab_size, (1, input_len), generator=torch.Generator().manual_seed(r))
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(ids)
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                           pad_token_id=0)
            t2 = time.perf_counter()
        if r:  # the first repeat warms up
            prefill.append(t1 - t0)
            decode.append(((t2 - t1) - (t1 - t0)) / (output_len - 1))
    p, d = statistics.median(prefill), statistics.median(decode)
    return {"prefill_tokens_per_s": input_len / p, "decode_ms_per_token": d * 1e3}


def hf_throughput(model, num_requests: int, input_len: int, output_len: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, model.config.vocab_size, (input_len,), generator=g) for _ in range(num_requests)]
    t0 = time.perf_counter()
    produced = 0
    for i in range(0, num_requests, batch):
        chunk = prompts[i : i + batch]
        ids = torch.stack(chunk)  # equal lengths: left padding is a no-op, the mask is all ones
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                                 do_sample=False, pad_token_id=0)
        produced += (out.shape[1] - input_len) * len(chunk)
    elapsed = time.perf_counter() - t0
    return {"output_tokens_per_s": produced / elapsed, "elapsed_s": elapsed, "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--tp-output-len", type=int, default=128, help="output tokens per request in the throughput run")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=32, help="transformers' generate batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default="float32:none,bfloat16:none,bfloat16:auto",
                    help="tokenmill runs as dtype:quantization (auto = GGUF tensors stay packed)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from tokenmill.bench.runs import bench_latency, bench_throughput
    from tokenmill.llm import LLM
    from tokenmill.loader.resolve import resolve_model

    path = resolve_model(args.model)
    results: dict = {"model": path.name, "threads": args.threads, "workload": vars(args) | {"json": None}}
    print(f"transformers: loading {path.name} (float32)")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    results["transformers"] = {
        "latency": hf_latency(hf, args.input_len, args.output_len, args.repeats),
        "throughput": hf_throughput(hf, args.num_requests, args.input_len, args.tp_output_len, args.hf_batch),
    }
    del hf
    for config in args.configs.split(","):
        dtype, quantization = config.split(":")
        llm = LLM(args.model, device="cpu", dtype=dtype, quantization=quantization, threads=args.threads,
                  kv_cache_memory_gb=1.0,
                  max_num_seqs=max(64, args.num_requests), max_num_batched_tokens=max(512, args.input_len),
                  max_model_len=args.input_len + max(args.output_len, args.tp_output_len) + 16)
        lat = bench_latency(llm, args.input_len, args.output_len, args.repeats)
        tp = bench_throughput(llm, args.num_requests, args.input_len, args.tp_output_len)
        results[f"tokenmill-{dtype}-{quantization}"] = {"latency": lat.__dict__, "throughput": tp.__dict__}
        del llm

    hf_lat, hf_tp = results["transformers"]["latency"], results["transformers"]["throughput"]
    print(f"\n{'engine':<22}{'prefill tok/s':>14}{'decode ms/tok':>15}{'x HF':>7}{'tput tok/s':>12}{'x HF':>7}"
          f"{'decode GB/s':>13}{'peak GB/s':>11}")
    print(f"{'transformers-float32':<22}{hf_lat['prefill_tokens_per_s']:>14.0f}{hf_lat['decode_ms_per_token']:>15.1f}"
          f"{1:>7.2f}{hf_tp['output_tokens_per_s']:>12.1f}{1:>7.2f}")
    for key, r in results.items():
        if not key.startswith("tokenmill-"):
            continue
        lat, tp = r["latency"], r["throughput"]
        r["decode_speedup_vs_transformers"] = hf_lat["decode_ms_per_token"] / lat["decode_ms_per_token"]
        r["throughput_speedup_vs_transformers"] = tp["output_tokens_per_s"] / hf_tp["output_tokens_per_s"]
        peak = lat["peak_gbs"]
        print(f"{key:<22}{lat['prefill_tokens_per_s']:>14.0f}{lat['decode_ms_per_token']:>15.1f}"
              f"{r['decode_speedup_vs_transformers']:>7.2f}{tp['output_tokens_per_s']:>12.1f}"
              f"{r['throughput_speedup_vs_transformers']:>7.2f}{lat['achieved_gbs']:>13.2f}"
              f"{peak if peak is None else round(peak, 1)!s:>11}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
