"""`--hardware local`: this machine, measured instead of looked up.

Three probes, each cached (JSON) in the user cache dir beside the bandwidth result:
  bandwidth  STREAM triad/copy (tokenmill.bench.bandwidth), the decode roofline's slope
  compute    median FLOP/s of a 1024^3 matmul on the probe's threads, fp32 and bf16
  dispatch   median time of one tiny eager torch op; an eager Llama layer issues about
             OPS_PER_LAYER of them (2 norms, 4+3 projections, rope, attention, activation, residuals),
             so dispatch * OPS_PER_LAYER is the per-layer overhead a Python engine pays on CPU.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

from tokenmill.bench.bandwidth import PROBE_THREADS, cache_dir, cached_bandwidth, machine_signature
from tokenmill.plan.hardware import Hardware

CACHE_FILE = "compute.json"
OPS_PER_LAYER = 25
MATMUL_N = 1024


@dataclass(frozen=True)
class ComputeResult:
    fp32_gflops: float
    bf16_gflops: float
    dispatch_us: float
    machine: str = ""


def measure_compute(repeats: int = 5) -> ComputeResult:
    """Matmul FLOP/s (2 * n^3 per product) and eager per-op dispatch time, on the probe threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(min(PROBE_THREADS, os.cpu_count() or 1))
    try:
        rates = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
            b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
            a @ b  # warm-up: thread pool, packing
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
            rates[name] = 2 * MATMUL_N**3 / statistics.median(times) / 1e9
        x = torch.ones(8)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(1000):
                x = x + 1.0
            samples.append((time.perf_counter() - t0) / 1000 * 1e6)
    finally:
        torch.set_num_threads(previous)
    return ComputeResult(
        rates["fp32"], rates["bf16"], statistics.median(samples), machine_signature()
    )


def cached_compute(refresh: bool = False) -> ComputeResult:
    path = cache_dir() / CACHE_FILE
    if not refresh and path.is_file():
        try:
            result = ComputeResult(**json.loads(path.read_text()))
            if result.machine == machine_signature():
                return result
        except (ValueError, TypeError):
            pass
    result = measure_compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=2))
    return result


def total_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 8.0


def local_hardware(refresh: bool = False) -> Hardware:
    """This machine as a one-chip `Hardware` of kind cpu, from the cached probes."""
    bw = cached_bandwidth(refresh=refresh)
    compute = cached_compute(refresh=refresh)
    matmul_tflops = max(compute.fp32_gflops, compute.bf16_gflops) / 1e3
    return Hardware(
        id="local",
        name=f"this machine ({machine_signature()}, {bw.threads} threads)",
        kind="cpu",
        family="cpu",
        memory_gb=total_memory_gb(),
        memory_gbs=bw.peak_gbs,
        tflops={"bf16": matmul_tflops},
        tp_domain=1,
        sources={
            "memory": "measured: tokenmill bench bandwidth",
            "compute": "measured: matmul probe",
        },
        notes=f"STREAM copy {bw.copy_gbs:.1f} GB/s, triad {bw.triad_gbs:.1f} GB/s; "
        f"matmul fp32 {compute.fp32_gflops:.0f} / bf16 {compute.bf16_gflops:.0f} GFLOP/s; "
        f"dispatch {compute.dispatch_us:.1f} us/op",
        layer_overhead_us=compute.dispatch_us * OPS_PER_LAYER,
    )
