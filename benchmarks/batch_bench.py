"""Many requests at once: tokenmill beside llama.cpp's batched decoding, the same GGUF, one run.

    python benchmarks/batch_bench.py [--batches 1,4,16,64 --input-len 128 --output-len 128
                                      --rounds 2 --json out.json --plot out.png]

Workload per batch size N: N requests of I random prompt tokens and O greedy output tokens (no
early stop), all submitted together; output tokens/s from the first prompt token to the last
output token.

- tokenmill: `bench_throughput` (continuous batching; chunked prefill; eager CPU steps) on the
  default model (SmolLM2-135M-Instruct, Q4_1 GGUF) or --model; "tokenmill int8-act" is the same
  with TOKENMILL_CPU_INT4_ACTIVATIONS=int8 (int4 layers on int8-quantized activations, opt-in).
- llama.cpp: llama-cpp-python's low-level API on the same file, as llama.cpp's `batched` example
  runs it: one context with N sequences, every prompt prefilled (batches of up to n_batch tokens
  across sequences), then one `llama_decode` per step carrying one token of every sequence, the
  greedy argmax of each row's logits feeding the next step. Default context settings otherwise
  (f16 KV cache, flash attention as llama.cpp chooses); BATCH_BENCH_LLAMA_CPP="kv_unified=1,
  flash_attn_type=1" sets integer fields of its context parameters, to try others.

Both use 2 threads. Each (engine, N) runs in its own process; rounds alternate the engines and
each figure keeps its fastest round (a shared host's contention comes in bursts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2


def tokenmill_run(model: str, n: int, input_len: int, output_len: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from tokenmill import LLM
    from tokenmill.bench.runs import bench_throughput

    llm = LLM(model=model, max_num_seqs=max(n, 1), max_model_len=input_len + output_len + 16)
    bench_throughput(llm, min(n, 4), input_len, 8)  # warm-up: first-call allocations, kernel loads
    r = bench_throughput(llm, n, input_len, output_len, seed=1)
    return {"output_tok_s": r.output_tokens_per_s, "elapsed_s": r.elapsed_s, "steps": r.steps,
            "preemptions": r.preemptions}


def llama_cpp_run(model: str, n: int, input_len: int, output_len: int) -> dict:
    import ctypes

    import llama_cpp as lc
    import numpy as np

    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    lmodel = lc.llama_model_load_from_file(model.encode(), mparams)
    if not lmodel:
        raise SystemExit(f"llama.cpp could not load {model}")
    vocab = lc.llama_model_get_vocab(lmodel)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    per_seq = input_len + output_len + 16
    n_batch = max(512, n)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = per_seq * n
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch
    cparams.n_seq_max = n
    cparams.n_threads = cparams.n_threads_batch = THREADS
    cparams.no_perf = True
    for kv in filter(None, os.environ.get("BATCH_BENCH_LLAMA_CPP", "").split(",")):
        key, val = kv.split("=")
        setattr(cparams, key, type(getattr(cparams, key))(int(val)))
    ctx = lc.llama_init_from_model(lmodel, cparams)
    if not ctx:
        raise SystemExit(f"llama.cpp could not create a context of {per_seq * n} tokens for {n} sequences")
    batch = lc.llama_batch_init(n_batch, 0, 1)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)"""
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, out) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = out
        rc = lc.llama_decode(ctx, batch)
        if rc:
            raise SystemExit(f"llama_decode returned {rc}")

    def argmax(i: int) -> int:
        row = lc.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), (n_vocab,)).argmax())

    def run(seed: int, out_len: int) -> float:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(100, n_vocab, input_len).tolist() for _ in range(n)]
        t0 = time.perf_counter()
        flat = [(tok, pos, s, pos == input_len - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        last: dict[int, int] = {}  # sequence -> its row of logits in the latest decode
        for start in range(0, len(flat), n_batch):
            chunk = flat[start:start + n_batch]
            decode(chunk)
            next_tok = {seq: argmax(i) for i, (_, _, seq, out) in enumerate(chunk) if out}
            last.update(next_tok)
        tokens = last
        t1 = time.perf_counter()
        for step in range(1, out_len):
            decode([(tokens[s], input_len + step - 1, s, True) for s in range(n)])
            tokens = {s: argmax(s) for s in range(n)}
        t2 = time.perf_counter()
        return t2 - t0, t1 - t0, (t2 - t1) / max(out_len - 1, 1)

    run(0, 8)  # warm-up
    elapsed, prefill_s, step_s = run(1, output_len)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(lmodel)
    return {"output_tok_s": n * output_len / elapsed, "elapsed_s": elapsed, "prefill_s": prefill_s,
            "decode_step_ms": step_s * 1e3}


ENGINES = ("tokenmill", "tokenmill int8-act", "llama.cpp")


def _child(engine: str, model: str, n: int, input_len: int, output_len: int) -> dict:
    extra = {"TOKENMILL_CPU_INT4_ACTIVATIONS": "int8"} if engine == "tokenmill int8-act" else {}
    proc = subprocess.run([sys.executable, __file__, "--child", engine, model, str(n), str(input_len), str(output_len)],
                          capture_output=True, text=True, check=False, cwd=ROOT,
                          env={**os.environ, **extra, "TOKENMILL_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": str(THREADS),
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in ENGINES:
        pts = [(r["batch"], r[engine]["output_tok_s"]) for r in rows if "error" not in r[engine]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine, model, n, i, o = sys.argv[2:7]
        fn = llama_cpp_run if engine == "llama.cpp" else tokenmill_run
        print(json.dumps(fn(model, int(n), int(i), int(o))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="GGUF file (default: the default model)")
    ap.add_argument("--batches", default="1,4,16,64", help="comma-separated request counts")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tokenmill.loader.resolve import default_model_path

    model = args.model or str(default_model_path())
    batches = [int(b) for b in args.batches.split(",")]
    best: dict[tuple[str, int], dict] = {}
    for rnd in range(args.rounds):
        for n in batches:
            for engine in ENGINES:
                print(f"round {rnd + 1}/{args.rounds}: {engine}, {n} requests ...", file=sys.stderr, flush=True)
                r = _child(engine, model, n, args.input_len, args.output_len)
                old = best.get((engine, n))
                if old is None or "error" in old or ("error" not in r and r["output_tok_s"] > old["output_tok_s"]):
                    best[(engine, n)] = r
    rows = [{"batch": n, **{engine: best[(engine, n)] for engine in ENGINES}} for n in batches]
    print(f"\n{Path(model).name}, {args.input_len} prompt + {args.output_len} output tokens per request, "
          f"{THREADS} threads, fastest of {args.rounds} rounds\n")
    print("| requests | " + " | ".join(f"{e} out tok/s" for e in ENGINES) + " | tokenmill / llama.cpp "
          "| int8-act / llama.cpp |")
    print("|---" * (len(ENGINES) + 3) + "|")

    def rate(r: dict) -> str:
        return f"{r['output_tok_s']:.1f}" if "error" not in r else f"error: {r['error']}"

    def ratio(a: dict, b: dict) -> str:
        return f"{a['output_tok_s'] / b['output_tok_s']:.2f}x" if "error" not in a and "error" not in b else "-"

    for r in rows:
        print(f"| {r['batch']} | " + " | ".join(rate(r[e]) for e in ENGINES)
              + f" | {ratio(r['tokenmill'], r['llama.cpp'])} | {ratio(r['tokenmill int8-act'], r['llama.cpp'])} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        _plot(rows, args.plot, f"{Path(model).name}: {args.input_len}+{args.output_len} tokens/request, {THREADS} threads")
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
