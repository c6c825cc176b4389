"""Test factories: requests and scheduler steps with fabricated model outputs (no torch)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from tokenmill.config import SchedulerConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.scheduler import Scheduler
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

_ids = itertools.count()


def make_request(prompt_len: int = 10, max_tokens: int = 5, prefix: list[int] | None = None) -> Request:
    n = next(_ids)
    prompt = (prefix or []) + [1000 + n * 7 + i for i in range(prompt_len)]
    return Request(f"r{n}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens=max_tokens)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 32, max_model_len: int = 256,
                   prefix_caching: bool = True) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len), kv)


def fake_outputs(sched: SchedulerOutput, token: int = 7) -> ModelRunnerOutput:
    """Every request that reached its end samples `token`."""
    return ModelRunnerOutput(sampled={r.request_id: token for r in sched.requests if r.sample})


def run_to_completion(scheduler: Scheduler, max_steps: int = 10_000) -> list[SchedulerOutput]:
    steps = []
    while scheduler.num_unfinished and len(steps) < max_steps:
        sched = scheduler.schedule()
        steps.append(sched)
        scheduler.update(sched, fake_outputs(sched))
    return steps


# shared prompt prefixes of the random workloads (prefix-cache hits)
WORKLOAD_PREFIXES = [[], list(range(50, 58)), list(range(60, 72)), list(range(50, 54))]


def run_workload(scheduler: Scheduler, ops: list[tuple[str, int, int, int]], step: Callable[[str], None],
                 check: Callable[[], None]) -> list[Request]:
    """Apply hypothesis-drawn ops (op, length, max_tokens, prefix id): "add" a request with that
    prompt length and prefix (prompts fit a 40-token context), "abort" a live one, anything else
    is `step(op)`; `check()` after each op. Returns every request added."""
    live: list[Request] = []
    for op, length, max_tokens, prefix_id in ops:
        prefix = WORKLOAD_PREFIXES[prefix_id]
        if op == "add":
            r = make_request(prompt_len=max(1, min(length, 30 - len(prefix))), max_tokens=max_tokens, prefix=prefix)
            scheduler.add_request(r)
            live.append(r)
        elif op == "abort" and live:
            scheduler.finish_request(live[length % len(live)].request_id, RequestStatus.FINISHED_ABORTED)
        else:
            step(op)
        check()
    return live
