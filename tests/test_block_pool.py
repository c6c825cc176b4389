"""Block pool and KV cache manager invariants, including random workloads (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.factories import fake_outputs, make_request, make_scheduler, run_workload
from tokenmill.core.block_pool import BlockPool, NoFreeBlocksError
from tokenmill.request import RequestStatus


def test_allocate_free_roundtrip():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert pool.num_free == 1 and pool.num_used == 3
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    pool.free(blocks)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([blocks[0]])


def test_cached_blocks_are_evicted_lru():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, 111)
    pool.cache(b, 222)
    pool.free([b, a, c])  # freed order: b, a, c -> b is evicted first
    assert pool.lookup(222) == b and pool.lookup(111) == a
    (x,) = pool.allocate(1)
    assert x == b and pool.lookup(222) is None and pool.lookup(111) == a
    pool.check_invariants()


def test_shared_prefix_reuses_blocks_and_counts_hits():
    s = make_scheduler(block_size=4)
    prefix = list(range(100, 112))  # 3 full blocks
    first = make_request(prompt_len=2, prefix=prefix)
    s.add_request(first)
    s.update(sched := s.schedule(), fake_outputs(sched))
    second = make_request(prompt_len=3, prefix=prefix)
    s.add_request(second)
    sched = s.schedule()
    (entry,) = [r for r in sched.requests if r.request_id == second.request_id]
    assert entry.start == 12 and second.num_cached_tokens == 12
    assert entry.block_table[:3] == s.kv.get_block_table(first.request_id)[:3]
    assert all(s.kv.pool.ref_cnt[b] == 2 for b in entry.block_table[:3])


def test_prefix_hit_never_covers_the_whole_prompt():
    s = make_scheduler(block_size=4)
    prompt = list(range(200, 208))  # exactly 2 blocks
    for _ in range(2):
        r = make_request(prompt_len=0, prefix=prompt)
        s.add_request(r)
        sched = s.schedule()
        entry = sched.requests[-1]
        assert entry.num_tokens >= 1 and entry.sample
        s.update(sched, fake_outputs(sched))


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(1, 40), st.integers(1, 12),
                  st.integers(0, 3)),
        min_size=1, max_size=60,
    ),
    num_blocks=st.integers(10, 40),
)
def test_random_workloads_never_leak_or_double_free(ops, num_blocks):
    s = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=24, max_model_len=40)

    def step(_op: str) -> None:
        sched = s.schedule()
        s.update(sched, fake_outputs(sched))

    def check() -> None:
        pool = s.kv.pool
        pool.check_invariants()
        held = sum(len(t) for t in s.kv.block_tables.values())
        assert sum(pool.ref_cnt) == held  # every reference is a block-table entry

    live = run_workload(s, ops, step, check)
    while s.num_unfinished:
        sched = s.schedule()
        assert not sched.is_empty, "scheduler stalled with unfinished requests"
        s.update(sched, fake_outputs(sched))
    pool = s.kv.pool
    pool.check_invariants()
    assert pool.num_free == pool.num_blocks and not s.kv.block_tables
    for r in live:
        assert r.status.finished
        if r.status != RequestStatus.FINISHED_ABORTED:
            assert len(r.output_token_ids) == min(r.max_tokens, 40 - len(r.prompt_token_ids))
