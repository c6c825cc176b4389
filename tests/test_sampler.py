"""Sampler: exact checks for greedy, penalties, logprobs and batch invariance; statistical checks
(chi-square at a fixed seed) for temperature, top-k, top-p and min-p."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.sample.sampler import (
    Sampler,
    SamplerOutput,
    SamplingState,
    apply_penalties,
    categorical,
    draw_uniforms,
    top_p_cutoff,
)
from tokenmill.sampling_params import SamplingParams

# Upper 0.9999 quantiles of the chi-square distribution, by degrees of freedom
# (scipy.stats.chi2.ppf(0.9999, df)). A correct sampler fails a check 1 time in 10,000 seeds;
# the seeds are fixed, so each check is deterministic.
CHI2_CRIT = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745, 6: 27.856, 7: 29.878}

sample = Sampler()


def state(prompt: list[int] | None = None, output: list[int] | None = None, **kw) -> SamplingState:
    s = SamplingState.new(SamplingParams(**kw), prompt or [])
    s.output_token_ids.extend(output or [])
    return s


def draw(logits_row: torch.Tensor, n: int, seed: int = 0, **kw) -> torch.Tensor:
    """Sample n unseeded tokens from one row of logits in one batched call; [V] counts."""
    torch.manual_seed(seed)
    out = sample(logits_row.expand(n, -1), [state(**kw) for _ in range(n)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.shape[0])


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic of counts against probs over the support of probs; (stat, df)."""
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the support"
    expected = probs[support].double() * counts.sum()
    stat = ((counts[support].double() - expected) ** 2 / expected).sum().item()
    return stat, int(support.sum()) - 1


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    stat, df = chi_square(counts, probs)
    assert stat < CHI2_CRIT[df], f"chi-square {stat:.1f} >= {CHI2_CRIT[df]} (df={df})"


# probabilities sorted descending, so nucleus and min-p sets are easy to read off
PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])
LOGITS = PROBS.log() + 3.0  # an offset: the sampler must not assume normalised input


# --- greedy ---------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 100, generator=g)
    states = [state(temperature=0.0, seed=i if i % 2 else None) for i in range(16)]
    out = sample(logits, states)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_top_k_1_is_greedy_at_temperature_1() -> None:
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(2))
    out = sample(logits, [state(temperature=1.0, top_k=1) for _ in range(16)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_logits_are_not_mutated() -> None:
    logits = torch.randn(4, 50)
    before = logits.clone()
    states = [
        state(prompt=[1, 2], output=[3], repetition_penalty=1.5, presence_penalty=1.0),
        state(temperature=0.5, top_p=0.5, min_p=0.1, top_k=5),
        state(temperature=0.0),
        state(frequency_penalty=1.0, output=[4, 4]),
    ]
    states[1].suppress_token_ids = {0, 7}
    sample(logits, states)
    assert torch.equal(logits, before)


def test_empty_batch_and_row_mismatch() -> None:
    assert sample(torch.empty(0, 10), []) == SamplerOutput([], None, None)
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 10), [state()])


# --- seeded batch invariance ----------------------------------------------------------------


def request_logits(key: int, step: int, vocab: int) -> torch.Tensor:
    """A fixed logits row per (request, step), as a model would produce it."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * key + step)) * 2


OTHER_PARAMS = [
    {},
    {"seed": 7},
    {"temperature": 0.0},
    {"temperature": 0.7, "top_p": 0.8, "seed": 11},
    {"top_k": 3},
    {"min_p": 0.2, "repetition_penalty": 1.3},
    {"top_k": 10, "top_p": 0.5, "temperature": 1.5},
    {"presence_penalty": 1.0, "frequency_penalty": 0.5, "seed": 3, "logprobs": 2},
]


def run_batches(target: dict, batches: list[list[int]], steps: int = 6, vocab: int = 64):
    """Run the target request (key -1) for `steps` steps, each step inside a batch of other
    requests given by keys into OTHER_PARAMS (order = position); returns its tokens."""
    me = SamplingState.new(SamplingParams(**target), prompt_token_ids=[1, 2, 3])
    others = {
        k: SamplingState.new(SamplingParams(**OTHER_PARAMS[k % len(OTHER_PARAMS)]), [5, 6])
        for b in batches
        for k in b
        if k >= 0
    }
    for step in range(steps):
        keys = batches[step % len(batches)]
        states = [me if k < 0 else others[k] for k in keys]
        logits = torch.stack([request_logits(k, step, vocab) for k in keys])
        torch.manual_seed(step * 31 + len(keys))  # the global RNG differs between runs
        out = sample(logits, states)
        for s, t in zip(states, out.token_ids):
            s.output_token_ids.append(t)
    return me.output_token_ids


@pytest.mark.parametrize(
    "target",
    [
        {"seed": 42},
        {"seed": 42, "temperature": 0.6, "top_p": 0.9},
        {"seed": 42, "top_k": 8, "min_p": 0.05},
        {"seed": 42, "repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.3},
        {"seed": 42, "temperature": 1.3, "top_k": 20, "top_p": 0.7, "min_p": 0.01, "logprobs": 3},
    ],
)
def test_seeded_request_is_batch_invariant(target: dict) -> None:
    alone = run_batches(target, [[-1]])
    assert run_batches(target, [[-1]]) == alone  # reproducible across runs
    assert run_batches(target, [[0, -1, 2]]) == alone
    assert run_batches(target, [[-1, 1, 2, 3, 4, 5, 6, 7]]) == alone
    assert run_batches(target, [[7, 6, 5, 4, 3, 2, 1, 0, -1]]) == alone
    # batch composition and position change from step to step
    assert run_batches(target, [[3, -1], [-1], [10, 12, -1, 9, 8], [4, 5, 6, -1, 0]]) == alone
    other_seed = run_batches({**target, "seed": 43}, [[-1]])
    assert other_seed != alone


@pytest.mark.parametrize("top_p", [0.05, 0.95])
def test_seeded_top_p_is_batch_invariant_past_the_cpu_candidates(top_p: float) -> None:
    # vocab 4096 > the CPU top-p candidates: small p finds the nucleus among them, large p
    # sorts the full row (randn · 2 logits over 4096 tokens have a wide nucleus)
    target = {"seed": 5, "top_p": top_p}
    alone = run_batches(target, [[-1]], vocab=4096)
    assert run_batches(target, [[3, -1, 6]], vocab=4096) == alone
    assert run_batches(target, [[6, 5, 4, 3, 2, 1, 0, -1], [-1, 11]], vocab=4096) == alone


# --- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_matches_softmax(temperature: float) -> None:
    counts = draw(LOGITS, 20_000, temperature=temperature)
    assert_matches(counts, torch.softmax(LOGITS / temperature, -1))


def test_seeded_rows_match_softmax() -> None:
    """The per-row generator path, one seed per row."""
    n = 10_000
    logits = LOGITS.expand(n, -1)
    out = sample(logits, [state(seed=s, temperature=0.8) for s in range(n)])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=len(PROBS))
    assert_matches(counts, torch.softmax(LOGITS / 0.8, -1))


# ids on both sides of the 256-id block edges and in the padded last block of a 1000-id row
SPREAD_IDS = [0, 255, 256, 511, 700, 767, 768, 999]


def test_categorical_across_blocks_matches_the_weights() -> None:
    """The two-stage draw over several blocks (the last one padded): each id in proportion to
    its weight, ids of weight 0 never."""
    n = 40_000
    weights = torch.zeros(1000)
    weights[SPREAD_IDS] = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02]) * 7.0  # unnormalised
    torch.manual_seed(5)
    ids = categorical(weights.expand(n, -1), draw_uniforms(None, n, torch.device("cpu")))
    counts = torch.bincount(ids, minlength=1000)
    assert_matches(counts, weights / weights.sum())


@settings(max_examples=200, deadline=None)
@given(
    vocab=st.integers(1, 700),
    positive=st.lists(st.integers(0, 699), min_size=1, max_size=6),
    tiny=st.booleans(),
    u=st.lists(st.sampled_from([0.0, 0.5, 1 - 2**-53, 2**-53]), min_size=2, max_size=2),
)
def test_categorical_never_takes_an_id_of_zero_weight(vocab, positive, tiny, u) -> None:
    """Whatever the uniforms (their extremes included) and however small the positive weights,
    the id drawn has positive weight."""
    weights = torch.zeros(vocab)
    ids = sorted({i % vocab for i in positive})
    weights[ids] = 1e-30 if tiny else 1.0
    got = categorical(weights, torch.tensor(u, dtype=torch.float64)).item()
    assert got in ids


def test_top_k_stays_in_top_k_and_renormalises() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    counts = draw(logits, 20_000, top_k=5, temperature=1.5)
    allowed = logits.topk(5).indices
    probs = torch.zeros(50)
    probs[allowed] = torch.softmax(logits[allowed] / 1.5, -1)
    assert_matches(counts, probs)  # also asserts nothing outside the top 5


def test_top_p_samples_the_nucleus_in_proportion() -> None:
    # mass before each token: 0, .40, .65, .80 → the nucleus for p = .75 is {0, 1, 2}
    counts = draw(LOGITS, 20_000, top_p=0.75)
    assert_matches(counts, torch.tensor([0.4, 0.25, 0.15, 0, 0, 0, 0]) / 0.8)
    assert set(counts.nonzero().flatten().tolist()) == {0, 1, 2}


def test_top_p_applies_after_top_k() -> None:
    # top-k 2 renormalises to (.615, .385): p = .6 keeps one token; without top-k, two.
    assert draw(LOGITS, 2000, top_k=2, top_p=0.6).nonzero().flatten().tolist() == [0]
    assert draw(LOGITS, 2000, top_p=0.6).nonzero().flatten().tolist() == [0, 1]


def test_top_p_candidate_path_equals_full_sort() -> None:
    """The CPU shortcuts (nucleus among the top 64, then the top 256 candidates, else a full
    sort) change nothing, for nuclei inside and past each count, with excluded (-inf) tokens."""
    g = torch.Generator().manual_seed(4)
    scale = torch.tensor([0.1, 0.5, 1.0, 3.0, 8.0, 20.0]).repeat(4)  # flat ... peaked
    x = torch.randn(24, 3000, generator=g) * scale.unsqueeze(1)
    x[::3, :500] = float("-inf")
    top_p = torch.rand(24, generator=g) * 0.98 + 0.01
    full = top_p_cutoff(x, top_p, candidates=())
    shortcut = top_p_cutoff(x, top_p, candidates=(64, 256))
    assert torch.equal(full, shortcut)
    nucleus_sizes = (x >= full.unsqueeze(1)).sum(-1)
    assert (nucleus_sizes < 64).any() and ((nucleus_sizes > 64) & (nucleus_sizes < 256)).any()
    assert (nucleus_sizes > 256).any()  # every path ran


def test_top_p_on_a_flat_row_stays_in_a_wide_nucleus() -> None:
    # a nucleus of ~2500 tokens: past the CPU candidates, so the full-sort path samples
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(6)) * 0.3
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(descending=True)
    size = int(((sorted_probs.cumsum(-1) - sorted_probs) < 0.5).sum())
    assert size > 1024
    counts = draw(logits, 1000, top_p=0.5)
    assert counts[order[size:]].sum() == 0
    assert counts[order[:size]].sum() == 1000


def test_min_p_threshold() -> None:
    # min_p .3 of p_max .4 = .12: keeps .40, .25, .15
    counts = draw(LOGITS, 20_000, min_p=0.3)
    assert_matches(counts, torch.tensor([0.4, 0.25, 0.15, 0, 0, 0, 0]) / 0.8)


def test_min_p_applies_after_temperature() -> None:
    t = 3.0
    probs = torch.softmax(LOGITS / t, -1)
    expected = torch.where(probs >= 0.6 * probs.max(), probs, 0)
    counts = draw(LOGITS, 20_000, min_p=0.6, temperature=t)
    assert_matches(counts, expected / expected.sum())
    assert (expected > 0).sum() > 3  # the flatter distribution keeps more than at t = 1


# --- penalties ------------------------------------------------------------------------------


def test_penalties_hand_worked() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -2.0]])

    def penalised(**kw) -> list[float]:
        s = state(prompt=[0], output=[1, 3, 3], **kw)
        return apply_penalties(logits, [s])[0].tolist()

    # repetition over prompt + output: divide positive, multiply negative; 2 and 4 unseen
    assert penalised(repetition_penalty=2.0) == [1.0, -2.0, 0.5, 0.5, -2.0]
    # presence over output only: once per seen token, the prompt token 0 untouched
    assert penalised(presence_penalty=0.5) == [2.0, -1.5, 0.5, 0.5, -2.0]
    # frequency counts occurrences: token 3 twice
    assert penalised(frequency_penalty=0.25) == [2.0, -1.25, 0.5, 0.5, -2.0]
    # negative penalties encourage
    assert penalised(presence_penalty=-1.0) == [2.0, 0.0, 0.5, 2.0, -2.0]
    # all three: repetition first, then the subtractions
    both = penalised(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    assert both == [1.0, -2.0 - 0.5 - 0.25, 0.5, 0.5 - 0.5 - 0.5, -2.0]


def test_penalties_steer_greedy() -> None:
    def greedy(row: list[float], **kw) -> int:
        return sample(torch.tensor([row]), [state(temperature=0, **kw)]).token_ids[0]

    assert greedy([2.0, 1.9], prompt=[0]) == 0
    assert greedy([2.0, 1.9], prompt=[0], repetition_penalty=1.2) == 1
    # presence and frequency ignore the prompt
    assert greedy([2.0, 1.9], prompt=[0], presence_penalty=2) == 0
    assert greedy([2.0, 1.9], output=[0], presence_penalty=0.5) == 1
    # repetition multiplies negative logits: -1.0 · 1.5 = -1.5 < -1.1
    assert greedy([-1.0, -1.1], output=[0], repetition_penalty=1.5) == 1
    # frequency counts every occurrence: 2 - 0.4·2 = 1.2 > 1, 2 - 0.4·3 = 0.8 < 1
    assert greedy([2.0, 1.0], output=[0, 0], frequency_penalty=0.4) == 0
    assert greedy([2.0, 1.0], output=[0, 0, 0], frequency_penalty=0.4) == 1


def test_repetition_penalty_lowers_probability_of_seen_token() -> None:
    base = draw(LOGITS, 10_000, prompt=[1])
    penalised = draw(LOGITS, 10_000, prompt=[1], repetition_penalty=1.5)
    assert penalised[1] < 0.8 * base[1]  # .25 → .16
    x = LOGITS.clone()
    x[1] /= 1.5
    assert_matches(penalised, torch.softmax(x, -1))


def test_penalty_cache_follows_output_across_steps() -> None:
    """The incremental counts equal a fresh count after every step, and after a shrink."""
    rng = random.Random(0)
    vocab = 40
    kw = {"repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.2}
    live = [state(prompt=[rng.randrange(vocab) for _ in range(5)], **kw) for _ in range(4)]
    for step in range(12):
        batch = rng.sample(live, rng.randint(1, len(live)))
        x = torch.randn(len(batch), vocab)
        got = apply_penalties(x, batch)
        fresh = [state(prompt=s.prompt_token_ids, output=s.output_token_ids, **kw) for s in batch]
        torch.testing.assert_close(got, apply_penalties(x, fresh), rtol=0, atol=0)
        for s in batch:
            s.output_token_ids.append(rng.randrange(vocab))
        if step == 6:
            del live[0].output_token_ids[1:]  # e.g. a rejected speculative suffix


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_are_raw_and_top_n_sorted() -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(5)) * 3
    states = [
        state(logprobs=5, temperature=0.7, repetition_penalty=1.5, prompt=list(range(50))),
        state(),  # did not ask
        state(logprobs=0, top_k=4),
        state(logprobs=20, temperature=0.0, presence_penalty=2.0, output=[1, 2, 3]),
        state(logprobs=1, seed=3, top_p=0.5),
        state(logprobs=3),
    ]
    states[5].suppress_token_ids = set(logits[5].topk(3).indices.tolist())
    out = sample(logits, states)
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs is not None and out.top_logprobs is not None
    want = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs), want, rtol=0, atol=1e-5)
    assert [len(t) for t in out.top_logprobs] == [5, 0, 0, 20, 1, 3]
    for row, top in enumerate(out.top_logprobs):
        ids = [i for i, _ in top]
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert ids == ref[row].topk(len(ids)).indices.tolist()
        torch.testing.assert_close(torch.tensor(values), ref[row, ids], rtol=0, atol=1e-5)
    # raw: the suppressed tokens of row 5 still head its top list
    assert {i for i, _ in out.top_logprobs[5]} == states[5].suppress_token_ids


# --- min_tokens -----------------------------------------------------------------------------


def test_suppressed_tokens_are_never_sampled() -> None:
    n = 2000
    states = [state(temperature=1.0) for _ in range(n)] + [state(temperature=0.0)]
    for s in states:
        s.suppress_token_ids = {0, 2, 99}  # 99 is outside the vocab: ignored
    torch.manual_seed(0)
    out = sample(LOGITS.expand(n + 1, -1), states)
    assert out.token_ids[-1] == 1  # greedy falls to the best allowed token
    counts = torch.bincount(torch.tensor(out.token_ids[:-1]), minlength=len(PROBS))
    allowed = PROBS.clone()
    allowed[[0, 2]] = 0
    assert_matches(counts, allowed / allowed.sum())


# --- scale ----------------------------------------------------------------------------------


MIXED = [
    {"temperature": 0.0},
    {},
    {"temperature": 0.8, "top_k": 50},
    {"top_p": 0.9, "seed": 1},
    {"min_p": 0.05, "temperature": 1.2},
    {"repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.3, "top_p": 0.95},
    {"top_k": 40, "top_p": 0.9, "min_p": 0.02, "seed": 2, "logprobs": 5},
    {"temperature": 0.0, "repetition_penalty": 1.2, "logprobs": 1},
]


def mixed_batch(n: int, vocab: int) -> tuple[torch.Tensor, list[SamplingState]]:
    rng = random.Random(n)
    states = []
    for i in range(n):
        kw = dict(MIXED[i % len(MIXED)])
        if "seed" in kw:
            kw["seed"] += i
        s = state(prompt=[rng.randrange(vocab) for _ in range(500)], **kw)
        s.output_token_ids.extend(rng.randrange(vocab) for _ in range(100))
        if i % 5 == 0:
            s.suppress_token_ids = {0, 1, 2}
        states.append(s)
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(n)) * 4
    return logits, states


def test_large_mixed_batch() -> None:
    logits, states = mixed_batch(37, 49152)
    for _ in range(2):  # the second call runs on warm penalty caches
        out = sample(logits, states)
        assert len(out.token_ids) == 37
        assert all(0 <= t < 49152 for t in out.token_ids)
        assert out.logprobs is not None and len(out.logprobs) == 37
        assert out.top_logprobs is not None
        assert [len(t) for t in out.top_logprobs] == [s.params.logprobs or 0 for s in states]
        for s, t in zip(states, out.token_ids):
            s.output_token_ids.append(t)
