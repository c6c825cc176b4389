"""The tensor-parallel split: every head, FFN row and vocabulary row is held, each rank's
attention is plain GQA over its own KV heads, and impossible splits fail with a clear error."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenmill.config import ConfigError, ModelConfig
from tokenmill.distributed.shard import TPShard, max_local_kv_heads, split


def _cfg(heads: int, kv_heads: int, ffn: int = 1536, vocab: int = 49152) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=vocab, hidden_size=64 * heads, intermediate_size=ffn, num_layers=2,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=64)


@given(n=st.integers(1, 5000), parts=st.integers(1, 16), align=st.sampled_from([1, 32, 256]))
def test_split_partitions(n, parts, align):
    ranges = [split(n, parts, i, align) for i in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [e - s for s, e in ranges]
    if n >= parts:
        assert min(sizes) >= 1, "a rank got nothing"
    if n % align == 0 and n // align >= parts:  # whole units of `align`, near-equal
        assert max(sizes) - min(sizes) <= align and all(s % align == 0 for s in sizes)
    else:
        assert max(sizes) - min(sizes) <= 32


@pytest.mark.parametrize("heads,kv_heads,size", [
    (9, 3, 2),  # SmolLM2-135M: uneven (6 + 3 q heads)
    (9, 3, 3), (32, 8, 4), (32, 8, 8), (32, 8, 3),
    (4, 1, 2), (8, 2, 4), (32, 4, 8), (64, 8, 16),  # fewer KV heads than ranks: replicated
])
def test_heads_cover_the_model_and_stay_in_their_groups(heads, kv_heads, size):
    cfg = _cfg(heads, kv_heads)
    group = heads // kv_heads
    shards = [TPShard.plan(cfg, r, size) for r in range(size)]
    q = [h for s in shards for h in range(*s.heads)]
    assert sorted(q) == list(range(heads)) and len(q) == heads  # each q head on exactly one rank
    for s in shards:
        local = s.local_config(cfg)  # valid GQA: a ModelConfig checks heads % kv_heads
        assert local.num_heads >= 1 and local.num_kv_heads >= 1
        # local head i uses local KV head i // local group, i.e. the global KV head of its group
        local_group = local.num_heads // local.num_kv_heads
        for i, h in enumerate(range(*s.heads)):
            assert h // group == s.kv_heads[0] + i // local_group
    kv = sorted({k for s in shards for k in range(*s.kv_heads)})
    assert kv == list(range(kv_heads))
    replicas = [sum(k in range(*s.kv_heads) for s in shards) for k in range(kv_heads)]
    assert set(replicas) == ({1} if kv_heads >= size else {size // kv_heads})
    assert max_local_kv_heads(cfg, size) == max(s.kv_heads[1] - s.kv_heads[0] for s in shards)


def test_ffn_and_vocab_split_on_block_boundaries():
    cfg = _cfg(9, 3, ffn=1536, vocab=49152)
    shards = [TPShard.plan(cfg, r, 2) for r in range(2)]
    assert [s.ffn for s in shards] == [(0, 768), (768, 1536)]
    assert [s.vocab for s in shards] == [(0, 24576), (24576, 49152)]
    s = shards[1]
    assert s.slice_of("model.layers.3.self_attn.q_proj.weight", 64) == (0, 6 * 64, 9 * 64)
    assert s.slice_of("model.layers.3.self_attn.k_proj.bias", 64) == (0, 2 * 64, 3 * 64)
    assert s.slice_of("model.layers.3.self_attn.o_proj.weight", 64) == (1, 6 * 64, 9 * 64)
    assert s.slice_of("model.layers.0.mlp.down_proj.weight", 64) == (1, 768, 1536)
    assert s.slice_of("lm_head.weight", 64) == (0, 24576, 49152)
    assert s.slice_of("model.layers.0.input_layernorm.weight", 64) is None


@pytest.mark.parametrize("heads,kv_heads,size,match", [
    (6, 2, 4, "divides its 3-head groups"),
    (4, 2, 3, "a multiple of 2"),
    (4, 4, 8, "exceeds the model's 4 attention heads"),
])
def test_impossible_splits_are_refused(heads, kv_heads, size, match):
    with pytest.raises(ConfigError, match=match):
        TPShard.check(_cfg(heads, kv_heads), size)
