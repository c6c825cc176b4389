"""Speculative decoding on the real model: greedy outputs equal plain decoding (n-gram, draft =
the same model, self-speculative int4), alone and inside a mixed batch with preemption forced;
stops inside the accepted tokens; seeded sampling; logprobs; the adaptive switch."""

from __future__ import annotations

import pytest

from tests.golden import NEAR_TIE, PROMPTS, compare_up_to_near_tie, margins
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.slow
NEW_TOKENS = 16
PARAGRAPH = ("The old lighthouse stood at the edge of the cliff for more than two hundred years. Sailors "
             "trusted its light to guide them past the rocks, and the keeper climbed its stairs every evening.")
REPETITIVE = [
    f"Rewrite the following paragraph, keeping its meaning:\n\n{PARAGRAPH}\n\nRewritten paragraph:\n",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
]
PROMPTS_USED = REPETITIVE + PROMPTS[:2]
# a pool of 12 x 16 tokens: one request at a time fits, the batch below does not
KW = {"device": "cpu", "dtype": "float32", "quantization": "none", "num_kv_blocks": 12, "max_num_seqs": 12,
      "max_num_batched_tokens": 128, "max_model_len": 192, "show_progress": False}
METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
    "draft": {"method": "draft", "draft_model": "smollm2-135m", "num_speculative_tokens": 3},
    "self": {"method": "self", "num_speculative_tokens": 3},
}


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": NEW_TOKENS, "ignore_eos": True} | kw)


@pytest.fixture(scope="module")
def plain():
    return LLM("smollm2-135m", **KW)


@pytest.fixture(scope="module")
def reference(plain):
    """Each prompt alone, without speculation, with the top-2 logprobs for the near-tie rule."""
    return [plain.generate(p, greedy(logprobs=2), use_progress=False)[0] for p in PROMPTS_USED]


_LLMS: dict[str, LLM] = {}


def always_on(method: str) -> LLM:
    """One engine per method for the module, speculating at any batch size."""
    if method not in _LLMS:
        _LLMS[method] = LLM("smollm2-135m", speculative=METHODS[method] | {"adaptive": False}, **KW)
    return _LLMS[method]


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    _LLMS.clear()


@pytest.fixture(scope="module", params=list(METHODS))
def spec_llm(request):
    return always_on(request.param)


def check(outs, reference) -> int:
    compared = 0
    for got, ref in zip(outs, reference):
        compared += compare_up_to_near_tie(got.outputs[0].token_ids, ref.outputs[0].token_ids, margins(ref), NEAR_TIE)
    assert compared >= 0.75 * len(reference) * NEW_TOKENS
    return compared


def test_greedy_alone_equals_plain_decoding(spec_llm, reference):
    before = spec_llm.engine.stats.spec.num_accepted_tokens
    outs = [spec_llm.generate(p, greedy(), use_progress=False)[0] for p in PROMPTS_USED]
    check(outs, reference)
    stats = spec_llm.engine.stats.spec
    assert stats.num_accepted_tokens - before >= NEW_TOKENS // 2, "speculation was meant to accept drafts"
    assert stats.tokens_per_pass > 1.5


def test_greedy_in_a_mixed_batch_with_preemption(spec_llm, reference):
    engine = spec_llm.engine
    preempted = engine.scheduler.num_preemptions
    others = [
        (PROMPTS[3], SamplingParams(temperature=0.8, seed=1, max_tokens=16, ignore_eos=True)),
        (PROMPTS[4], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True)),
        (PROMPTS[5], SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=16, ignore_eos=True)),
        (REPETITIVE[0], greedy(logprobs=2, speculative=False)),
    ]
    prompts = PROMPTS_USED + [p for p, _ in others]
    params = [greedy()] * len(PROMPTS_USED) + [q for _, q in others]
    outs = spec_llm.generate(prompts, params, use_progress=False)
    assert engine.scheduler.num_preemptions > preempted, "the pool was meant to force preemption"
    check(outs[: len(PROMPTS_USED)], reference)
    check(outs[-1:], reference[:1])  # opted out, inside the same batch
    assert all(len(o.outputs[0].token_ids) == q.max_tokens for o, (_, q) in zip(outs[len(PROMPTS_USED):], others))
    assert engine.kv.pool.num_free == engine.num_blocks and not engine.kv.block_tables
    draft_kv = getattr(engine.proposer, "kv", None)
    if draft_kv is not None:  # the draft's own pool is released too
        draft_kv.pool.check_invariants()
        assert draft_kv.pool.num_free == draft_kv.pool.num_blocks and not draft_kv.block_tables


@pytest.fixture(scope="module")
def ngram():
    return always_on("ngram")


def test_stops_inside_the_accepted_tokens(ngram, plain):
    prompt = REPETITIVE[0]
    full = plain.generate(prompt, greedy(max_tokens=24), use_progress=False)[0].outputs[0]
    words = full.text.split()
    cases = [
        greedy(max_tokens=24, stop_token_ids=[full.token_ids[9]]),
        greedy(max_tokens=24, stop=[words[len(words) // 2]]),
        greedy(max_tokens=24, stop=[words[3]], include_stop_str_in_output=True),
        greedy(max_tokens=7),
    ]
    accepted = ngram.engine.stats.spec.num_accepted_tokens
    for i, params in enumerate(cases):
        want = plain.generate(prompt, params, use_progress=False)[0].outputs[0]
        got = ngram.generate(prompt, params, use_progress=False)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids, want.text, want.finish_reason, want.stop_reason)
        if i == 1:
            streamed = list(ngram.stream(prompt, params))
            assert "".join(o.outputs[0].delta for o in streamed) == want.text
            assert [t for o in streamed for t in o.outputs[0].delta_token_ids] == want.token_ids
    assert ngram.engine.stats.spec.num_accepted_tokens > accepted


def test_seeded_sampling_is_reproducible_and_matches_plain(ngram, plain):
    """n-gram drafts are deterministic, so each position is sampled with the noise an ordinary
    step would draw: the same seed gives the same tokens with or without speculation."""
    params = SamplingParams(temperature=0.8, seed=1234, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompt = REPETITIVE[1]
    alone = ngram.generate(prompt, params, use_progress=False)[0].outputs[0].token_ids
    batch = ngram.generate([PROMPTS[0], prompt, PROMPTS[1]],
                           [greedy(), params, SamplingParams(temperature=1.0, seed=5, max_tokens=8)],
                           use_progress=False)[1].outputs[0].token_ids
    without = plain.generate(prompt, params, use_progress=False)[0].outputs[0].token_ids
    assert alone == batch == without


def test_logprobs_of_accepted_tokens(ngram, reference):
    ref = reference[0].outputs[0]
    got = ngram.generate(REPETITIVE[0], greedy(logprobs=2), use_progress=False)[0].outputs[0]
    n = compare_up_to_near_tie(got.token_ids, ref.token_ids, margins(reference[0]), NEAR_TIE)
    assert len(got.logprobs) == len(got.token_ids)
    for token, entry, want in list(zip(got.token_ids, got.logprobs, ref.logprobs))[:n]:
        assert token in entry and entry[token] == max(entry.values())
        assert entry.keys() == want.keys()
        assert all(abs(entry[t] - want[t]) < 1e-3 for t in want)
    assert got.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(got.token_ids, got.logprobs)))


def test_a_sampled_draft_equal_to_the_target_accepts_nearly_everything():
    """Draft = the target itself, sampling its drafts from q: p and q agree up to float
    rounding, so min(1, p/q) is ~1 at every draft."""
    llm = always_on("draft")
    stats = llm.engine.stats.spec
    drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True)
    outs = llm.generate(PROMPTS[:2], [params, SamplingParams(temperature=0.7, top_k=40, max_tokens=16, ignore_eos=True)],
                        use_progress=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    assert stats.num_draft_tokens - drafted > 12
    assert (stats.num_accepted_tokens - accepted) / (stats.num_draft_tokens - drafted) > 0.9
    again = llm.generate(PROMPTS[0], params, use_progress=False)[0].outputs[0].token_ids
    assert again == outs[0].outputs[0].token_ids  # seeded: reproducible


def test_the_adaptive_switch_turns_speculation_off_for_large_batches(reference, spec_log):
    llm = LLM("smollm2-135m", speculative=METHODS["ngram"] | {"max_batch": 2}, **KW)
    outs = llm.generate(PROMPTS_USED[:4], greedy(), use_progress=False)
    check(outs, reference[:4])
    assert llm.engine.stats.spec.num_switches >= 1
    assert any("speculation off" in r.getMessage() for r in spec_log.records)


def test_the_pass_cost_is_measured_once_per_machine(tmp_path, monkeypatch, spec_log):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    kw = KW | {"max_num_seqs": 4, "num_kv_blocks": 64, "max_model_len": 1024}
    llm = LLM("smollm2-135m", speculative=METHODS["ngram"], **kw)
    cost = llm.engine.spec_controller.cost
    assert cost.batches == (1, 4) and all(t > 0 for t in cost.plain_s + cost.spec_s)
    assert (tmp_path / "spec_cost.json").exists()
    again = LLM("smollm2-135m", speculative=METHODS["ngram"], **kw)
    assert again.engine.spec_controller.cost == cost
    assert sum("step cost" in r.getMessage() for r in spec_log.records) == 1  # measured once
