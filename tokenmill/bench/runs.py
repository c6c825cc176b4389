"""`tokenmill bench latency` and `tokenmill bench throughput`: figures beside their bounds."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from rich.progress import Progress

from tokenmill.bench.bytes import kv_bytes_per_step, resident_weight_bytes
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams


def _random_prompt(llm: LLM, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = llm.engine.model_config.vocab_size
    # stay clear of special tokens at the start of the vocabulary
    return {"prompt_token_ids": torch.randint(100, vocab, (n,), generator=g).tolist()}


def _peak_gbs() -> float | None:
    try:
        from tokenmill.bench.bandwidth import cached_bandwidth

        return cached_bandwidth().peak_gbs
    except Exception:  # the probe is optional for the figures; they print without the bound
        return None


@dataclass(frozen=True)
class LatencyResult:
    model: str
    dtype: str
    input_len: int
    output_len: int
    repeats: int
    prefill_ms: float
    prefill_tokens_per_s: float
    decode_ms_per_token: float
    decode_tokens_per_s: float
    resident_weight_mb: float
    bytes_per_decode_token: int
    achieved_gbs: float
    peak_gbs: float | None
    bound_ms_per_token: float | None
    fraction_of_peak: float | None


def bench_latency(llm: LLM, input_len: int = 128, output_len: int = 64, repeats: int = 5,
                  warmup: int = 1) -> LatencyResult:
    """Batch 1: time the prompt's step (prefill) and each decode step, medians over repeats."""
    engine = llm.engine
    if engine.config.scheduler.max_num_batched_tokens < input_len:
        raise ValueError(f"max_num_batched_tokens must be >= input_len ({input_len}) to time one prefill step")
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    prefill, decode = [], []
    with Progress(transient=True) as progress:
        task = progress.add_task("bench latency", total=warmup + repeats)
        for i in range(warmup + repeats):
            engine.kv.pool.reset_prefix_cache()
            engine.add_request(f"lat-{i}", _random_prompt(llm, input_len, i)["prompt_token_ids"], params)
            steps = []
            while engine.has_unfinished_requests():
                t0 = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - t0)
            if i >= warmup:
                prefill.append(steps[0])
                decode.extend(steps[1:])
            progress.advance(task)
    prefill_s = statistics.median(prefill)
    decode_s = statistics.median(decode)
    ctx = input_len + output_len // 2  # mean context during decode
    step_bytes = engine.step_weight_bytes + kv_bytes_per_step(engine.model, ctx, engine.dtype, engine.config.kv_cache_dtype)
    peak = _peak_gbs()
    achieved = step_bytes / decode_s / 1e9
    return LatencyResult(
        model=engine.model_path.name, dtype=str(engine.dtype).removeprefix("torch."), input_len=input_len,
        output_len=output_len, repeats=repeats,
        prefill_ms=prefill_s * 1e3, prefill_tokens_per_s=input_len / prefill_s,
        decode_ms_per_token=decode_s * 1e3, decode_tokens_per_s=1 / decode_s,
        resident_weight_mb=resident_weight_bytes(engine.model) / 1e6, bytes_per_decode_token=step_bytes,
        achieved_gbs=achieved, peak_gbs=peak,
        bound_ms_per_token=None if peak is None else step_bytes / (peak * 1e9) * 1e3,
        fraction_of_peak=None if peak is None else achieved / peak,
    )


@dataclass(frozen=True)
class ThroughputResult:
    model: str
    dtype: str
    num_requests: int
    input_len: int
    output_len: int
    elapsed_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    steps: int
    achieved_gbs: float
    peak_gbs: float | None
    preemptions: int


def bench_throughput(llm: LLM, num_requests: int = 32, input_len: int = 128, output_len: int = 128,
                     seed: int = 0) -> ThroughputResult:
    """N requests submitted together; output tokens per second until the last one finishes."""
    engine = llm.engine
    engine.kv.pool.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    prompts = [_random_prompt(llm, input_len, seed + i) for i in range(num_requests)]
    steps_before, pre_before = engine.stats.steps, engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    steps = engine.stats.steps - steps_before
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    # every step reads the weights once; KV reads average half the final context per request
    kv = kv_bytes_per_step(engine.model, (input_len + output_len // 2) * num_requests, engine.dtype,
                           engine.config.kv_cache_dtype)
    moved = steps * engine.step_weight_bytes + output_len * kv
    return ThroughputResult(
        model=engine.model_path.name, dtype=str(engine.dtype).removeprefix("torch."), num_requests=num_requests,
        input_len=input_len, output_len=output_len, elapsed_s=elapsed, output_tokens_per_s=produced / elapsed,
        total_tokens_per_s=(produced + input_len * num_requests) / elapsed, steps=steps,
        achieved_gbs=moved / elapsed / 1e9, peak_gbs=_peak_gbs(),
        preemptions=engine.scheduler.num_preemptions - pre_before,
    )


def as_dict(result) -> dict:
    return asdict(result)
