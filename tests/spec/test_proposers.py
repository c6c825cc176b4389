"""Proposers on their own: n-gram lookup, and the draft model's paged cache staying in sync with
the target's tokens through acceptance, rollback and release (a tiny random model)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.draft import DraftProposer
from tokenmill.spec.ngram import NgramProposer

GREEDY = SamplingParams(temperature=0, max_tokens=64)


def test_ngram_prefers_the_longest_suffix():
    p = NgramProposer(1, 3)
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 1, 2, 9, 7, 3, 1, 2, 8, 6, 4, 3, 1, 2]
    # suffix (3, 1, 2) occurs at 5..7, followed by 8 6 4; (1, 2) alone would also match at 1
    assert p.lookup(tokens, 3) == [8, 6, 4]
    assert p.lookup(tokens, 10) == [8, 6, 4, 3, 1, 2]  # up to the end of the context


def test_ngram_takes_the_latest_occurrence_followed_by_k_tokens():
    p = NgramProposer(1, 2)
    tokens = [1, 2, 3, 4, 1, 2, 5, 6, 7, 1, 2]
    assert p.lookup(tokens, 2) == [5, 6]  # the latest (1, 2) followed by 2 tokens
    assert p.lookup(tokens, 6) == [3, 4, 1, 2, 5, 6]  # only the earliest is followed by 6


def test_ngram_without_a_match_proposes_nothing():
    p = NgramProposer(2, 4)
    assert p.lookup([1, 2, 3, 4, 5], 4) == []
    assert p.lookup([7], 4) == []
    assert p.propose([Request("a", [1, 2, 1], GREEDY)], [3])[0].token_ids == []  # (2, 1) is new
    assert NgramProposer(1, 4).propose([Request("a", [1, 2, 1], GREEDY)], [3])[0].token_ids == [2, 1]


def _tiny_model(seed: int = 0) -> LlamaForCausalLM:
    cfg = ModelConfig(arch="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the logits: no near-ties between code paths
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


def _proposer(model, num_blocks: int = 32) -> DraftProposer:
    return DraftProposer(model, num_blocks, 4, torch.float32, torch.device("cpu"))


def _fresh(model, tokens: list[int], k: int) -> list[int]:
    """Greedy drafts from a proposer that never saw the request: the reference."""
    return _proposer(model).propose([Request("ref", list(tokens), GREEDY)], [k])[0].token_ids


def test_draft_keeps_its_cache_in_sync_through_rollback(model):
    prop = _proposer(model)
    req = Request("a", [3, 14, 15, 92, 65, 35, 89, 79], GREEDY)
    first = prop.propose([req], [4])[0]
    assert len(first.token_ids) == 4 and first.probs is None  # greedy: deterministic drafts
    assert first.token_ids == _fresh(model, req.all_token_ids, 4)
    # the target keeps two drafts and adds a token of its own: the draft rolls back the rest
    req.output_token_ids += first.token_ids[:2] + [(first.token_ids[2] + 1) % 96]
    second = prop.propose([req], [4])[0]
    assert second.token_ids == _fresh(model, req.all_token_ids, 4)
    seq = prop._seqs["a"]
    assert seq.num_computed_tokens == req.num_tokens + 3 and seq.all_token_ids[: req.num_tokens] == req.all_token_ids
    assert len(prop.kv.get_block_table("a")) == -(-seq.num_computed_tokens // 4)
    prop.free("a")
    prop.kv.pool.check_invariants()
    assert prop.kv.pool.num_free == prop.kv.pool.num_blocks


def test_draft_batches_requests_with_different_k(model):
    prop = _proposer(model)
    reqs = [Request("a", [1, 2, 3, 4, 5], GREEDY), Request("b", [9, 8, 7], GREEDY), Request("c", [40] * 11, GREEDY)]
    out = prop.propose(reqs, [3, 1, 4])
    assert [p.token_ids for p in out] == [_fresh(model, r.all_token_ids, k) for r, k in zip(reqs, [3, 1, 4])]


def test_draft_samples_from_q_for_sampled_requests(model):
    prop = _proposer(model)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=64)
    out = prop.propose([Request("s", [1, 2, 3], params)], [3])[0]
    assert out.probs is not None and out.probs.shape == (3, 96)
    assert torch.allclose(out.probs.sum(-1), torch.ones(3))
    assert all(out.probs[j, t] > 0 for j, t in enumerate(out.token_ids))
    again = _proposer(model).propose([Request("s", [1, 2, 3], params)], [3])[0]
    assert again.token_ids == out.token_ids  # seeded: reproducible


def test_draft_pool_exhaustion_gives_no_drafts_and_leaks_nothing(model):
    prop = _proposer(model, num_blocks=3)  # 12 tokens of draft KV
    long = Request("long", list(range(20)), GREEDY)
    assert prop.propose([long], [4])[0].token_ids == []
    short = Request("short", [1, 2, 3], GREEDY)
    assert len(prop.propose([short], [4])[0].token_ids) == 4
    prop.free("short")
    prop.free("long")
    prop.kv.pool.check_invariants()
    assert prop.kv.pool.num_free == 3
