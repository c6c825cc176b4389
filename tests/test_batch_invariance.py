"""16 requests of mixed lengths give the same greedy tokens alone, together, with prefix-cache
hits, and with a pool so small that requests are preempted and recomputed."""

from __future__ import annotations

import pytest

from tests.golden import NEAR_TIE, PROMPTS, compare_up_to_near_tie, margins
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.slow
NEW_TOKENS = 24
SHARED = ("You are a careful assistant. Answer briefly and precisely, and never invent facts. "
          "If a question is ambiguous, say which reading you chose. ")


def _prompts() -> list[str]:
    out = []
    for i in range(16):
        base = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            base = SHARED + base  # shares full KV blocks with the other odd prompts
        if i % 5 == 0:
            base = base + " " + " ".join(["and then"] * (10 + 3 * i))  # long: chunked prefill
        out.append(base)
    return out


def _params():
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def solo(llm):
    llm.engine.kv.pool.reset_prefix_cache()
    outs = []
    for p in _prompts():
        llm.engine.kv.pool.reset_prefix_cache()
        outs.append(llm.generate(p, _params(), use_progress=False)[0])
    return outs


def _check(batch, solo_outs):
    compared = 0
    for got, ref in zip(batch, solo_outs):
        compared += compare_up_to_near_tie(got.outputs[0].token_ids, ref.outputs[0].token_ids, margins(ref), NEAR_TIE)
    assert compared >= 0.75 * 16 * NEW_TOKENS


def test_together_equals_alone(llm, solo):
    llm.engine.kv.pool.reset_prefix_cache()
    batch = llm.generate(_prompts(), _params())
    _check(batch, solo)


def test_prefix_cache_hits_give_same_tokens(llm, solo):
    llm.engine.kv.pool.reset_prefix_cache()
    llm.generate(_prompts()[:4], _params())  # warms the cache, incl. the shared prefix
    batch = llm.generate(_prompts(), _params())
    assert sum(o.num_cached_tokens for o in batch) > 16 * 8, "expected prefix-cache hits"
    _check(batch, solo)


def test_preemption_gives_same_tokens(solo):
    small = LLM("smollm2-135m", device="cpu", dtype="float32", quantization="none", num_kv_blocks=24,
                max_num_seqs=16,
                max_num_batched_tokens=128, max_model_len=384, show_progress=False)
    batch = small.generate(_prompts(), _params())
    assert small.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    _check(batch, solo)
    assert small.engine.kv.pool.num_free == small.engine.num_blocks
