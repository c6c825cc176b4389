#!/usr/bin/env python3
"""The C++ paged decode attention kernel (kernels/csrc/decode_attention.cpp) on this CPU: µs per
call and GMAC/s at SmolLM2-135M's shape (9 query heads, 3 KV heads, head dim 64, blocks of 16
tokens), batch 1 and 8, contexts 128 / 512 / 2048, bf16 and int8 KV pools.

    MACs per call = 2 * B * ctx * H * D      (q . k_t, then p_t * v_t: D each, per token and head)
    KV MB         = 2 * B * ctx * Hkv * (D * bytes per value + 2 for a quantized pool's scale)

The pools are hot in cache here (the KV MB column: this machine's L2 and L3 sizes bound them),
where a decode step over 30 layers would stream them from memory: the figures measure the
kernel's arithmetic, not DRAM bandwidth.

--baseline builds another version of the kernel source beside the current one (its ops renamed
to tokenmill_baseline::*) and times both in alternating rounds, medians of all calls:

    python benchmarks/cpu_attention.py --baseline HEAD            # a git revision of the source
    python benchmarks/cpu_attention.py --baseline old.cpp         # or a file
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from tokenmill.kernels import cpu

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "tokenmill/kernels/csrc/decode_attention.cpp"
H, HKV, D, BLOCK = 9, 3, 64, 16  # SmolLM2-135M
PLAIN = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_baseline(spec: str):
    """Load the kernel source `spec` (a file, or a git revision of SOURCE) as tokenmill_baseline ops."""
    from torch.utils import cpp_extension

    path = Path(spec)
    text = path.read_text() if path.is_file() else subprocess.run(
        ["git", "show", f"{spec}:{SOURCE}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    text = text.replace("TORCH_LIBRARY(tokenmill,", "TORCH_LIBRARY(tokenmill_baseline,")
    text = text.replace("TORCH_LIBRARY_IMPL(tokenmill,", "TORCH_LIBRARY_IMPL(tokenmill_baseline,")
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    src = Path(tempfile.gettempdir()) / f"tokenmill_attention_baseline_{digest}.cpp"
    src.write_text(text)
    cpp_extension.load(name=f"tokenmill_attention_baseline_{digest}", sources=[str(src)], extra_cflags=cpu.CFLAGS,
                       is_python_module=False, verbose=False)
    return torch.ops.tokenmill_baseline


def make_inputs(b: int, ctx: int, kind: str, seed: int = 0):
    """q [B, H, D]; K and V pools of B * ctx tokens in shuffled blocks; the op's arguments. A plain
    pool (bf16, fp16, fp32) has q's dtype; a quantized one (int8, fp8) is read with a bf16 q."""
    gen = torch.Generator().manual_seed(seed)
    per_request = (ctx + BLOCK - 1) // BLOCK
    num_blocks = b * per_request + 1
    dtype = PLAIN.get(kind, torch.bfloat16)
    q = torch.randn(b, H, D, generator=gen).to(dtype)
    tables = (1 + torch.randperm(num_blocks - 1, generator=gen)).view(b, per_request)
    ctx_lens = torch.full((b,), ctx, dtype=torch.long)
    k, v = (torch.randn(num_blocks, BLOCK, HKV, D, generator=gen) for _ in range(2))
    if kind in PLAIN:
        return "paged_decode_attention", (q, k.to(dtype), v.to(dtype), tables, ctx_lens, D ** -0.5)
    from tokenmill.quant.kv import quantize_kv

    (kc, ks), (vc, vs) = quantize_kv(k, kind), quantize_kv(v, kind)
    return "paged_decode_attention_quantized", (q, kc, ks, vc, vs, tables, ctx_lens, D ** -0.5)


def time_calls(fn, args, n: int) -> list[float]:
    """Seconds of each of n calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="a kernel source file or git revision to compare against")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--kinds", default="bf16,int8", help="bf16, fp16, fp32 (plain pools), int8, fp8 (quantized)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per case")
    ap.add_argument("--seconds", type=float, default=0.1, help="per version, per round")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    assert cpu.load(), "the C++ kernels did not build"
    impls = {"current": torch.ops.tokenmill}
    if a.baseline:
        impls = {"baseline": build_baseline(a.baseline), **impls}

    print(f"threads {a.threads}; H {H}, Hkv {HKV}, D {D}, blocks of {BLOCK}; median µs per call, GMAC/s")
    head = f"{'kv':>5} {'B':>3} {'ctx':>5} {'KV MB':>6}" + "".join(f" {name:>10} {'GMAC/s':>7}" for name in impls)
    print(head + ("  speedup" if len(impls) > 1 else ""))
    for kind in a.kinds.split(","):
        for b in map(int, a.batches.split(",")):
            for ctx in map(int, a.contexts.split(",")):
                op, args = make_inputs(b, ctx, kind)
                fns = {name: getattr(ns, op) for name, ns in impls.items()}
                outs = [fn(*args).float() for fn in fns.values()]
                for o in outs[1:]:
                    torch.testing.assert_close(o, outs[0], rtol=2e-2, atol=2e-2)
                per_call = max(min(time_calls(fns["current"], args, 3)), 1e-6)
                n = max(5, int(a.seconds / per_call))
                times: dict[str, list[float]] = {name: [] for name in fns}
                for r in range(a.rounds):  # alternate which version runs first
                    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                        times[name] += time_calls(fns[name], args, n)
                macs = 2 * b * ctx * H * D
                kv_mb = 2 * b * ctx * HKV * (D * args[1].element_size() + (2 if kind not in PLAIN else 0)) / 2**20
                med = {name: statistics.median(ts) for name, ts in times.items()}
                row = f"{kind:>5} {b:>3} {ctx:>5} {kv_mb:>6.2f}" + "".join(
                    f" {med[name] * 1e6:>10.1f} {macs / med[name] / 1e9:>7.1f}" for name in fns)
                if len(fns) > 1:
                    row += f"  {med['baseline'] / med['current']:>6.2f}x"
                print(row, flush=True)


if __name__ == "__main__":
    main()
