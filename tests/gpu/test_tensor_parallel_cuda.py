"""Tensor parallelism over NCCL (two GPUs; skipped on a machine with fewer): two ranks give the
greedy tokens of one rank on the same device kind, the tensor traffic goes through NCCL, and a
killed rank fails the next request with the reason instead of leaving a collective waiting."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.golden import PROMPTS, compare_up_to_near_tie, margins
from tokenmill.distributed.group import WorkerDiedError
from tokenmill.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA devices")]
PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)


def _cuda_llm(size: int):
    from tokenmill.llm import LLM

    return LLM("smollm2-135m", device="cuda", dtype="float32", quantization="none", tensor_parallel_size=size,
               kv_cache_memory_gb=0.25, max_model_len=1024, show_progress=False)


def test_two_gpus_generate_what_one_does():
    one = _cuda_llm(1)
    ref = one.generate(PROMPTS, PARAMS, use_progress=False)
    del one
    two = _cuda_llm(2)
    try:
        assert two.engine.tp.size == 2 and torch.distributed.get_backend() == "nccl"
        ours = two.generate(PROMPTS, PARAMS, use_progress=False)
        compared = [compare_up_to_near_tie(o.outputs[0].token_ids, r.outputs[0].token_ids, margins(r))
                    for o, r in zip(ours, ref)]
        assert sum(compared) >= len(PROMPTS) * 12, compared
        assert all(b < 0.6 * sum(two.engine.rank_weight_bytes) for b in two.engine.rank_weight_bytes)
    finally:
        two.engine.shutdown()


def test_a_killed_gpu_rank_fails_the_next_step():
    two = _cuda_llm(2)
    engine = two.engine
    os.kill(engine._tp_launcher.procs[0].pid, signal.SIGKILL)
    assert engine._tp_launcher.died.wait(30)
    engine.add_request("r", "Once upon a time", SamplingParams(max_tokens=4))
    with pytest.raises(WorkerDiedError, match="rank 1 was killed by signal 9"):
        engine.step()
