"""Speculative decoding on this machine: batch-1 decode speed with and without each proposer on
a repetitive and a free-form task, acceptance, and throughput at many concurrent requests with
speculation on (adaptive), forced on, and off.

    python benchmarks/spec_bench.py                      # every figure, SmolLM2-135M float32 on CPU
    python benchmarks/spec_bench.py --methods ngram,self --repeats 5 --json spec.json

Batch 1: each task runs alone, greedy, the methods interleaved round by round so that a noisy
machine slows them alike; decode tokens/s = (tokens - 1) / (time from the first token to the
last), median over rounds. Greedy outputs are the same with and without speculation, so every
method decodes the same text. Throughput: N requests (half of each task) submitted together,
output tokens/s until the last one finishes, configs interleaved, median over rounds.

The target runs with float weights (quantization none), so the self-speculative draft (the same
weights in int4) reads a quarter of the bytes; the `draft` method uses the target model itself as
its draft (the only same-tokenizer model available offline), which accepts everything but costs
a full pass per draft: it checks the machinery, it cannot be faster.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than two hundred years. Sailors trusted its "
    "light to guide them past the rocks on stormy nights, and the keeper climbed its one hundred and twelve "
    "stairs every evening to light the lamp. When the harbour installed electric beacons, the lighthouse went "
    "dark, but the town kept it painted white and red, and children still tell stories about the keeper who "
    "never missed a night."
)
TASKS = {  # chat prompts; SmolLM2-135M-Instruct copies most of the paragraph in the first
    "repetitive": f"Rewrite the following paragraph:\n\n{PARAGRAPH}",
    "partly repetitive": f"Rewrite the following paragraph to make it more formal:\n\n{PARAGRAPH}",
    "free-form": "Write a short story about a robot who learns to paint.",
}
SPECS = {
    "none": None,
    "ngram": {"method": "ngram"},
    "self": {"method": "self"},
    "draft": {"method": "draft", "draft_model": "smollm2-135m"},
}


def build(args, method: str, adaptive: bool) -> LLM:
    spec = SPECS[method]
    if spec is not None:
        spec = spec | {"num_speculative_tokens": args.tokens, "adaptive": adaptive}
    return LLM(args.model, device=args.device, dtype=args.dtype, quantization="none", kv_cache_memory_gb=0.5,
               max_num_seqs=max(64, args.concurrency), max_num_batched_tokens=1024, speculative=spec,
               threads=args.threads, show_progress=False)


def chat_ids(llm: LLM, text: str) -> list[int]:
    tok = llm.get_tokenizer()
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


def decode_once(llm: LLM, ids: list[int], max_tokens: int) -> tuple[list[int], float]:
    """One request alone: (tokens, decode seconds from the first token to the last)."""
    engine = llm.engine
    engine.kv.pool.reset_prefix_cache()
    engine.add_request("bench", ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    first = end = None
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            tokens = o.outputs[0].token_ids
            first = first or now
            end = now
    return tokens, end - first


def spec_delta(llm: LLM, before: dict) -> dict:
    s = llm.engine.stats.spec
    drafted = s.num_draft_tokens - before["num_draft_tokens"]
    accepted = s.num_accepted_tokens - before["num_accepted_tokens"]
    passes = s.num_passes - before["num_passes"]
    emitted = s.num_emitted_tokens - before["num_emitted_tokens"]
    return {
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_tokens": accepted / passes if passes else None,
        "tokens_per_pass": emitted / passes if passes else None,
    }


def batch1(args, llms: dict[str, LLM]) -> list[dict]:
    rows = []
    for task, text in TASKS.items():
        ids = chat_ids(next(iter(llms.values())), text)
        speeds: dict[str, list[float]] = {m: [] for m in llms}
        lengths: dict[str, int] = {}
        for m, llm in llms.items():  # warm-up round, not timed
            decode_once(llm, ids, 8)
        before = {m: dict(vars(llm.engine.stats.spec)) for m, llm in llms.items()}
        for _ in range(args.repeats):
            for m, llm in llms.items():
                tokens, seconds = decode_once(llm, ids, args.max_tokens)
                speeds[m].append((len(tokens) - 1) / seconds)
                lengths[m] = len(tokens)
        base = statistics.median(speeds["none"])
        for m, llm in llms.items():
            tps = statistics.median(speeds[m])
            rows.append({
                "task": task, "method": m, "tokens": lengths[m], "decode_tokens_per_s": tps,
                "min_tokens_per_s": min(speeds[m]), "max_tokens_per_s": max(speeds[m]),
                "speedup": tps / base,
                **(spec_delta(llm, before[m]) if m != "none" else {}),
            })
    return rows


def throughput(args, configs: dict[str, LLM]) -> list[dict]:
    """N requests at once with each config, round-robin over repeats; median output tokens/s."""
    any_llm = next(iter(configs.values()))
    prompts = [{"prompt_token_ids": chat_ids(any_llm, TASKS[t])} for t in TASKS]
    batch = [prompts[i % len(prompts)] for i in range(args.concurrency)]
    params = SamplingParams(temperature=0, max_tokens=args.batch_max_tokens, ignore_eos=True)
    runs: dict[str, list[float]] = {c: [] for c in configs}
    for llm in configs.values():
        llm.generate(batch[:2], SamplingParams(temperature=0, max_tokens=4), use_progress=False)  # warm-up
    before = {c: dict(vars(llm.engine.stats.spec)) for c, llm in configs.items()}
    for _ in range(args.batch_repeats):
        for c, llm in configs.items():
            llm.engine.kv.pool.reset_prefix_cache()
            t0 = time.perf_counter()
            outs = llm.generate(batch, params, use_progress=False)
            runs[c].append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
    rows = []
    for c, llm in configs.items():
        s = llm.engine.stats.spec
        rows.append({"config": c, "requests": args.concurrency, "output_tokens_per_s": statistics.median(runs[c]),
                     "runs": runs[c], "spec_passes": s.num_passes - before[c]["num_passes"],
                     "switches": s.num_switches, **spec_delta(llm, before[c])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default="ngram,self,draft",
                    help="comma-separated: ngram, self, draft; the first also runs adaptive and at N requests")
    ap.add_argument("--tokens", type=int, default=4, help="speculative tokens k")
    ap.add_argument("--max-tokens", type=int, default=96, help="batch-1 output tokens at most")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--batch-max-tokens", type=int, default=32, help="output tokens per request at N requests")
    ap.add_argument("--batch-repeats", type=int, default=3)
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--json", dest="json_path", help="also write the figures here")
    args = ap.parse_args()

    methods = [m for m in args.methods.split(",") if m]
    llms = {"none": build(args, "none", adaptive=False)}
    for m in methods:  # batch 1: each proposer always on, and the first one also as the adaptive default
        llms[m] = build(args, m, adaptive=False)
    adaptive = build(args, methods[0], adaptive=True)  # measures the pass cost (or reads it from the cache)
    llms[f"{methods[0]}, adaptive"] = adaptive
    result: dict = {
        "machine": f"{platform.machine()} {platform.processor() or platform.node()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": args.model, "dtype": args.dtype, "k": args.tokens,
        "batch1": batch1(args, llms),
    }
    cost = adaptive.engine.spec_controller.cost
    result["adaptive"] = {
        "method": methods[0], "pass_cost": vars(cost),
        "break_even_batch": {a: cost.break_even_batch(a) for a in (0.5, 0.7, 0.9)},
    }
    if not args.skip_batch:
        m = methods[0]
        result["throughput"] = throughput(args, {"off": llms["none"], f"{m}, adaptive": adaptive,
                                                 f"{m}, forced on": llms[m]})
        off = result["throughput"][0]["output_tokens_per_s"]
        for row in result["throughput"]:
            row["vs_off"] = row["output_tokens_per_s"] / off
    report(result)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)


def report(result: dict) -> None:
    console = Console(width=160)
    t = Table(title=f"batch 1, greedy, k={result['k']}: decode tokens/s (median) — {result['machine']}",
              caption="methods are always on, except 'adaptive' (the default: off while it does not pay)")
    for col in ("task", "method", "tokens", "tok/s", "range", "speedup", "acceptance", "accepted/pass", "tokens/pass"):
        t.add_column(col, justify="left" if col in ("task", "method") else "right")

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    for r in result["batch1"]:
        t.add_row(r["task"], r["method"], str(r["tokens"]), f(r["decode_tokens_per_s"]),
                  f"{r['min_tokens_per_s']:.2f}-{r['max_tokens_per_s']:.2f}", f(r["speedup"], "{:.2f}x"),
                  f(r.get("acceptance_rate"), "{:.0%}"), f(r.get("mean_accepted_tokens")), f(r.get("tokens_per_pass")))
    console.print(t)
    if "adaptive" in result:
        a = result["adaptive"]
        cost = a["pass_cost"]
        console.print(f"adaptive ({a['method']}): step cost with {cost['k']} drafts vs plain by batch: "
                      + ", ".join(f"B={b}: {s / p:.2f}x" for b, p, s in zip(cost["batches"], cost["plain_s"],
                                                                           cost["spec_s"]))
                      + "; speculation pays up to batch "
                      + ", ".join(f"{b} at acceptance {al}" for al, b in a["break_even_batch"].items()))
    if "throughput" in result:
        t = Table(title=f"{result['throughput'][0]['requests']} concurrent requests: output tokens/s")
        for col in ("config", "tok/s", "vs off", "spec passes", "acceptance", "on/off switches"):
            t.add_column(col, justify="left" if col == "config" else "right")
        for r in result["throughput"]:
            t.add_row(r["config"], f(r["output_tokens_per_s"]), f(r["vs_off"], "{:.2f}x"), str(r["spec_passes"]),
                      f(r.get("acceptance_rate"), "{:.0%}"), str(r["switches"]))
        console.print(t)


if __name__ == "__main__":
    main()
