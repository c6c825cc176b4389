"""The rejection sampler keeps the target's distribution exactly (chi-square on a small
vocabulary, fixed p and q, fixed seeds), a draft equal to the target is always accepted, and the
deterministic-draft path (ordinary sampler + accepted prefix) is the same rule."""

from __future__ import annotations

import pytest
import torch

from tokenmill.sample.rejection import (
    accepted_prefix,
    rejection_sample,
    rewind_generator,
    sampling_probs,
)
from tokenmill.sample.sampler import Sampler, SamplingState
from tokenmill.sampling_params import SamplingParams

N = 200_000
ALPHA = 1e-3  # p-value under which a goodness-of-fit test fails (fixed seeds: deterministic)

# p rows: the target at positions 1, 2 and the bonus position 3; q rows: the draft at 1, 2
P = torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.07, 0.03],
                  [0.05, 0.05, 0.10, 0.20, 0.25, 0.35],
                  [0.50, 0.10, 0.10, 0.10, 0.10, 0.10]])
Q = torch.tensor([[0.10, 0.40, 0.10, 0.30, 0.05, 0.05],
                  [0.30, 0.20, 0.20, 0.10, 0.10, 0.10]])


def chi_square_p_value(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness of fit of integer samples to probs over the support of probs (a
    sample outside it fails outright); survival of chi2(support - 1)."""
    counts = torch.bincount(samples, minlength=len(probs)).double()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs.double()[support] * len(samples)
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2))


def _draws(q: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.multinomial(row, n, replacement=True, generator=g) for row in q], 1)  # [n, K]


def _noise(n: int, positions: int, g: torch.Generator) -> torch.Tensor:
    """[n, positions, 2]: the uniforms `categorical` draws the candidates with."""
    return torch.rand(n, positions, 2, dtype=torch.float64, generator=g)


def test_rejection_sample_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    k = Q.shape[0]
    drafts = _draws(Q, N, g)  # [N, K], d_j ~ q_j
    tokens = rejection_sample(P.expand(N, -1, -1), Q.expand(N, -1, -1), drafts,
                              torch.rand(N, k, generator=g), _noise(N, k + 1, g))
    accepted = torch.tensor([accepted_prefix(t, d) for t, d in zip(tokens.tolist(), drafts.tolist())])
    # the j-th emitted token exists when the j - 1 drafts before it were accepted; given that,
    # it is distributed as p_j (the rows do not depend on the prefix here)
    for j in range(k + 1):
        reached = accepted >= j
        emitted = tokens[reached, j]
        assert chi_square_p_value(emitted, P[j]) > ALPHA, f"position {j}"
    # acceptance probability of the first draft: sum_x min(p, q)
    rate = (accepted >= 1).double().mean().item()
    assert abs(rate - torch.minimum(P[0], Q[0]).sum().item()) < 0.005


def test_a_rejected_position_never_returns_its_draft():
    g = torch.Generator().manual_seed(1)
    drafts = _draws(Q, N, g)
    tokens = rejection_sample(P.expand(N, -1, -1), Q.expand(N, -1, -1), drafts,
                              torch.rand(N, 2, generator=g), _noise(N, 3, g))
    p_d = P[0][drafts[:, 0]]
    q_d = Q[0][drafts[:, 0]]
    sure = p_d >= q_d  # min(1, p/q) = 1
    assert (tokens[sure, 0] == drafts[sure, 0]).all()


def test_a_draft_equal_to_the_target_is_always_accepted():
    g = torch.Generator().manual_seed(2)
    k = 2
    drafts = _draws(P[:k], N, g)
    tokens = rejection_sample(P.expand(N, -1, -1), P[:k].expand(N, -1, -1), drafts,
                              torch.rand(N, k, generator=g), _noise(N, k + 1, g))
    assert (tokens[:, :k] == drafts).all()
    assert chi_square_p_value(tokens[:, k], P[k]) > ALPHA  # the bonus token


def test_deterministic_drafts_through_the_ordinary_sampler():
    """q one-hot: sampling every position and accepting while the sample equals the draft is
    the rejection rule: acceptance p(d), the emitted token distributed as p."""
    torch.manual_seed(3)
    n = 40_000
    logits = P.log()  # temperature 1 samples P exactly
    drafts = [1, 5]  # deterministic guesses
    states = [SamplingState.new(SamplingParams(temperature=1.0), [0])] * (n * 3)
    out = Sampler()(logits.repeat(n, 1), states).token_ids
    rows = [out[i * 3 : i * 3 + 3] for i in range(n)]
    accepted = torch.tensor([accepted_prefix(r, drafts) for r in rows])
    first = torch.tensor([r[0] for r in rows])
    assert chi_square_p_value(first, P[0]) > ALPHA
    assert abs((accepted >= 1).double().mean().item() - P[0, 1].item()) < 0.01
    second = torch.tensor([r[1] for r, a in zip(rows, accepted.tolist()) if a >= 1])
    assert chi_square_p_value(second, P[1]) > ALPHA


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.9, min_p=0.3),
    SamplingParams(temperature=1.1, top_k=4, top_p=0.8, min_p=0.1),
])
def test_sampling_probs_is_what_the_sampler_draws(params):
    torch.manual_seed(4)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    probs = sampling_probs(logits, [params])[0]
    n = 60_000
    out = torch.tensor(Sampler()(logits.repeat(n, 1), [SamplingState.new(params, [0])] * n).token_ids)
    assert chi_square_p_value(out, probs) > ALPHA


def test_sampling_probs_greedy_is_one_hot():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 1.0]])
    probs = sampling_probs(logits, [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1)])
    assert probs.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_rewind_leaves_the_generator_where_ordinary_steps_would():
    vocab = 50
    params = SamplingParams(temperature=1.0, seed=11)
    logits = torch.randn(4, vocab)
    for used in range(1, 5):
        spec = SamplingState.new(params, [0])
        state = spec.generator.get_state()
        Sampler()(logits, [spec] * 4)  # a verification sampling 4 rows
        rewind_generator(spec.generator, state, used, torch.device("cpu"))
        plain = SamplingState.new(params, [0])
        for i in range(used):  # `used` ordinary single-row steps
            Sampler()(logits[i : i + 1], [plain])
        assert torch.equal(spec.generator.get_state(), plain.generator.get_state())


def test_accepted_prefix():
    assert accepted_prefix([4, 5, 6], [4, 5]) == 2
    assert accepted_prefix([4, 9, 6], [4, 5]) == 1
    assert accepted_prefix([7], []) == 0
