#!/usr/bin/env python3
"""Host work per decode step: what the engine spends in Python around the model, by phase.

On a GPU a decode step's kernels take a few ms (a 1B llama at 64 requests: ~8.7 ms on an H200,
docs/gpu.md), and everything the host does between them — scheduling, building the step's
inputs, sampling bookkeeping, appending tokens, detokenizing, building outputs — adds to it.
That host work does not depend on the device, so it is measured here on a tiny random-weight
llama (2 layers, hidden 64, 2048-token vocabulary: the model's own time is small and reported
apart).

N requests of 128 random prompt tokens decode 128 tokens together (greedy, ignore_eos); after
their prefills, each phase of every step is timed by wrapping the engine's methods:

    schedule   Scheduler.schedule              plan      ModelRunner._plan (lists of the step)
    tensors    ModelRunner._tensors            model     the forward pass (+ logits)
    sampler    Sampler                         update    Scheduler.update
    output     LLMEngine._output (detokenize, build RequestOutputs)
    other      the rest of LLMEngine.step and ModelRunner.execute

On CUDA (the device is chosen as tokenmill chooses it) kernels run asynchronously: "model" is
then the time to launch them (or replay a graph), and the device's own time lands where the host
first waits for it, the sampler's one transfer of the sampled ids; read "sampler" there as
sampling plus that wait.

`--output-kind delta` is what the server asks for (each step's text and ids); `cumulative`
copies everything so far into every step's output (vLLM's default); `final_only` is
LLM.generate's (text at the end). Figures: ms per step and µs per request per
step, median over `--rounds` runs (each in this process, one after another).

    python benchmarks/host_overhead.py [--batches 1,64,256] [--output-kind delta] [--json F]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokenmill.sampling_params import OUTPUT_KINDS  # noqa: E402

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 2048, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "torch_dtype": "float32"}
PHASES = ["schedule", "plan", "tensors", "model", "sampler", "update", "output", "other"]


def timed(obj, name: str, label: str, totals: dict) -> None:
    f = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t0

    setattr(obj, name, wrapper)


def instrument(engine) -> dict[str, float]:
    """Wrap the engine's phases once; returns the totals (seconds per phase) they add to."""
    totals: dict[str, float] = defaultdict(float)
    runner = engine.runner
    timed(engine.scheduler, "schedule", "schedule", totals)
    timed(engine.scheduler, "update", "update", totals)
    timed(engine, "_output", "output", totals)
    timed(runner, "execute", "execute", totals)
    timed(runner, "_plan", "plan", totals)
    timed(runner, "_tensors", "tensors", totals)
    timed(runner.model, "forward", "model", totals)
    timed(runner.model, "compute_logits", "model", totals)
    if runner.cuda_graphs is not None:  # a decode step is one graph replay instead of forward
        timed(runner.cuda_graphs, "run", "model", totals)
    timed(runner, "sampler", "sampler", totals)
    return totals


def measure(engine, totals: dict[str, float], batch: int, prompt_len: int, output_len: int, kind: str,
            seed: int) -> dict:
    from tokenmill.sampling_params import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, output_kind=kind)
    for i in range(batch):
        engine.add_request(f"host-{seed}-{i}", [rng.randrange(100, TINY["vocab_size"]) for _ in range(prompt_len)],
                           params)
    sched = engine.scheduler
    while sched.waiting or any(r.num_tokens - r.num_computed_tokens > 1 for r in sched.running):
        engine.step()  # the prefills
    totals.clear()
    steps = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    wall = time.perf_counter() - t0
    phases = {p: totals[p] for p in PHASES if p != "other"}
    phases["other"] = wall - sum(phases.values())  # the rest of LLMEngine.step and ModelRunner.execute
    return {"steps": steps, "step_ms": 1e3 * wall / steps, **{p: 1e3 * v / steps for p, v in phases.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--output-kind", default="delta", choices=OUTPUT_KINDS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from tokenmill.llm import LLM

    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(TINY))
        for batch in batches:
            llm = LLM(tmp, load_format="dummy", dtype="float32", max_num_seqs=batch,
                      max_num_batched_tokens=max(512, batch * args.prompt_len), kv_cache_memory_gb=0.5,
                      threads=1, show_progress=False)  # one host thread, as beside a GPU
            totals = instrument(llm.engine)
            runs = [measure(llm.engine, totals, batch, args.prompt_len, args.output_len, args.output_kind, seed)
                    for seed in range(args.rounds)]
            row = {"batch": batch, **{k: statistics.median(r[k] for r in runs) for k in ["step_ms", *PHASES]}}
            row["host_ms"] = row["step_ms"] - row["model"]
            row["host_us_per_request"] = 1e3 * row["host_ms"] / batch
            rows.append(row)
            print(f"batch {batch:4d}: step {row['step_ms']:7.3f} ms, host {row['host_ms']:6.3f} ms "
                  f"({row['host_us_per_request']:6.1f} us per request) = "
                  + ", ".join(f"{p} {row[p]:.3f}" for p in PHASES if p != "model")
                  + f"; model {row['model']:.3f}", flush=True)
            del llm
    if args.json:
        args.json.write_text(json.dumps({"output_kind": args.output_kind, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
