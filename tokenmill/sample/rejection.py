"""Rejection sampling for speculative decoding: keep a prefix of the drafts, and the output
distribution is exactly the target's.

The rule (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding",
alg. 1; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling", alg. 2). The
draft proposed d_1..d_k, d_j drawn from q_j; the target scored all k + 1 positions, giving
p_1..p_{k+1}. For j = 1, 2, ...

    accept d_j with probability min(1, p_j(d_j) / q_j(d_j))
    on the first rejection emit a sample of  normalize(max(0, p_j - q_j))  and stop
    if all k are accepted, emit a bonus sample of p_{k+1}

Each emitted token is distributed as p given the tokens before it, whatever q is: accepting
gives min(q, p) mass to each token, the residual adds the missing max(0, p - q) (proof in
Leviathan et al., appendix A.1).

Two realisations, one rule:

  * `rejection_sample` — any q (a draft model that samples its drafts). Vectorised over N
    requests with K drafts each.
  * deterministic drafts (n-gram lookup, greedy draft models): q_j is one-hot at d_j, so the
    rule reads "accept d_j with probability p_j(d_j), else sample p_j with d_j removed". The
    engine realises it by sampling every position from p_j with the ordinary sampler and
    accepting while the sample equals the draft (`accepted_prefix`): P(sample = d_j) = p_j(d_j),
    and given sample != d_j the sample is distributed as p_j without d_j, which is exactly the
    normalised residual. A greedy request is the temperature-0 case: accept while
    argmax == draft, then emit the argmax. Because the k + 1 rows draw the same noise as k + 1
    ordinary steps would, a seeded request gives the same tokens with or without speculation
    once `rewind_generator` has given back the noise of the positions that were not used.

`sampling_probs` is the distribution the sampler draws from (temperature, min-p, top-k, top-p,
in the sampler's order); requests with penalties or suppressed tokens do not speculate, so it
needs neither.
"""

from __future__ import annotations

import torch

from tokenmill.sample.sampler import categorical, draw_uniforms, top_p_cutoff
from tokenmill.sampling_params import SamplingParams

_MIN_TEMPERATURE = 1e-6  # as the sampler


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [R, V] (raw), params one per row -> probabilities [R, V] float32 the sampler draws
    from. A greedy row is one-hot at its argmax."""
    x = logits.float()
    r, vocab = x.shape
    greedy = torch.tensor([p.greedy for p in params], device=x.device)  # [R]
    temperature = torch.tensor([max(p.temperature, _MIN_TEMPERATURE) for p in params], device=x.device)
    x = x / temperature.unsqueeze(1)
    cutoff = x.new_full((r,), float("-inf"))
    if any(p.min_p > 0 for p in params):  # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)
        min_p = torch.tensor([p.min_p for p in params], device=x.device)
        cutoff = torch.maximum(cutoff, x.amax(-1) + min_p.log())
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        k = torch.tensor(ks, device=x.device)
        kth = x.topk(max(ks), dim=-1).values.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        cutoff = torch.maximum(cutoff, kth.masked_fill(k == 0, float("-inf")))
    if any(p.top_p < 1 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=x.device)
        nucleus = top_p_cutoff(x.masked_fill(x < cutoff.unsqueeze(1), float("-inf")), top_p)
        cutoff = torch.where(top_p < 1, torch.maximum(cutoff, nucleus), cutoff)
    probs = x.masked_fill(x < cutoff.unsqueeze(1), float("-inf")).softmax(-1)  # [R, V]
    one_hot = torch.zeros_like(probs).scatter_(1, x.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy.unsqueeze(1), one_hot, probs)


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_ids: torch.Tensor,
                     uniform: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The standard rule for drafts drawn from q, one candidate token per position.

    target_probs p [N, K+1, V]; draft_probs q [N, K, V] (d_j must have been drawn from q_j);
    draft_ids d [N, K] long; uniform u [N, K] in [0, 1); noise [N, K+1, 2] from `draw_uniforms`.
    Returns tokens [N, K+1]: at j < K, d_j if u_j * q_j(d_j) <= p_j(d_j) (accepted: u < p/q),
    else a sample of max(0, p_j - q_j); at K, a sample of p_K (the bonus). The emitted tokens
    are the drafts up to the first position whose token differs from the draft, then that
    token (`accepted_prefix`): a rejected position never returns its draft, because the
    residual is 0 where p < q, and p >= q always accepts.
    """
    k = draft_ids.shape[1]
    ids = draft_ids.unsqueeze(-1)  # [N, K, 1]
    p_d = target_probs[:, :k].gather(-1, ids).squeeze(-1)  # [N, K]
    q_d = draft_probs.gather(-1, ids).squeeze(-1)  # [N, K]
    accept = uniform * q_d <= p_d  # [N, K]
    residual = (target_probs[:, :k] - draft_probs).clamp_min(0)  # [N, K, V], normalised by the draw
    candidates = categorical(torch.cat([residual, target_probs[:, k:]], 1), noise)  # [N, K+1]
    tokens = candidates.clone()
    tokens[:, :k] = torch.where(accept, draft_ids, candidates[:, :k])
    return tokens


def accepted_prefix(tokens: list[int], drafts: list[int]) -> int:
    """How many drafts are accepted: the length of the common prefix of the per-position tokens
    ([K+1]) and the drafts ([K]). The token emitted after them is tokens[that length]."""
    n = 0
    for token, draft in zip(tokens, drafts):
        if token != draft:
            break
        n += 1
    return n


def uniforms(generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniforms in [0, 1) from the request's generator (seeded requests) or the global RNG."""
    return torch.rand(shape, generator=generator, device=device)


def rewind_generator(generator: torch.Generator, state: torch.Tensor, rows_used: int,
                     device: torch.device) -> None:
    """Set a seeded request's generator to where `rows_used` ordinary sampling steps from `state`
    leave it: the sampler draws two float64 uniforms per step and row (`draw_uniforms`), so a
    verification that sampled k + 1 rows but emitted only rows_used tokens gives the rest back."""
    generator.set_state(state)
    for _ in range(rows_used):  # one call per row, as the sampler draws (a CUDA generator's
        draw_uniforms(generator, 1, device)  # offset advances per call, not per number)
