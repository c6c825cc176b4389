"""Drafts through the pure-Python core: the scheduler hands them out as extra tokens, `update`
keeps the accepted prefix, and the KV cache manager rolls back the rest. Random runs with
speculative steps never leak, double-free or hash a rejected slot (hypothesis)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.factories import fake_outputs, make_request, make_scheduler, run_workload
from tokenmill.core.scheduler import Scheduler
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.request import RequestStatus

DRAFT = 8  # the token every fabricated draft guesses
TOKEN = 7  # the token the fabricated target samples


def propose(s: Scheduler, k: int) -> None:
    """What the engine does before a step: drafts for the running requests in decode position."""
    for r in s.running:
        r.spec_token_ids = [DRAFT] * k if r.num_tokens - r.num_computed_tokens == 1 else []


def spec_outputs(sched: SchedulerOutput, accept: dict[str, int] | random.Random) -> ModelRunnerOutput:
    """The target keeps a prefix of each request's drafts (fixed counts, or random), then samples TOKEN."""
    out = fake_outputs(sched, TOKEN)
    for r in sched.requests:
        if r.spec_token_ids:
            n = accept.randint(0, len(r.spec_token_ids)) if isinstance(accept, random.Random) else accept[r.request_id]
            out.accepted[r.request_id] = r.spec_token_ids[:n]
    return out


def check_kv(s: Scheduler) -> None:
    """Pool invariants, every reference a table entry, tables cover exactly the computed
    tokens, and every hashed block in a table holds computed real tokens under its own hash."""
    kv, pool = s.kv, s.kv.pool
    pool.check_invariants()
    assert sum(pool.ref_cnt) == sum(len(t) for t in kv.block_tables.values())
    for rid, table in kv.block_tables.items():
        r = s.requests[rid]
        assert len(table) == -(-r.num_computed_tokens // kv.block_size), rid
        hashes = kv._hashes.get(rid, [])
        for i, block in enumerate(table):
            h = pool.block_hash[block]
            if h is not None:
                assert i < len(hashes) and hashes[i] == h and (i + 1) * kv.block_size <= r.num_computed_tokens


def test_drafts_are_scheduled_as_extra_tokens():
    s = make_scheduler(block_size=4)
    r = make_request(prompt_len=6, max_tokens=20)
    s.add_request(r)
    s.update(sched := s.schedule(), fake_outputs(sched))  # prefill: drafts never join a prefill
    propose(s, 3)
    sched = s.schedule()
    (entry,) = sched.requests
    assert entry.token_ids == [TOKEN, DRAFT, DRAFT, DRAFT] and entry.spec_token_ids == [DRAFT] * 3
    assert entry.start == 6 and entry.sample and sched.num_tokens == 4
    assert len(entry.block_table) == 3  # positions 0..9


def test_update_keeps_the_accepted_prefix_and_trims_rejected_blocks():
    s = make_scheduler(block_size=4)
    r = make_request(prompt_len=6, max_tokens=20)
    s.add_request(r)
    s.update(sched := s.schedule(), fake_outputs(sched))
    propose(s, 5)
    sched = s.schedule()  # 6 tokens at positions 6..11: blocks 0..2
    free_before = s.kv.pool.num_free
    s.update(sched, spec_outputs(sched, {r.request_id: 1}))
    assert r.output_token_ids == [TOKEN, DRAFT, TOKEN]
    assert r.num_computed_tokens == 8  # the last real token and one accepted draft
    assert len(s.kv.get_block_table(r.request_id)) == 2 and s.kv.pool.num_free == free_before + 1
    check_kv(s)


def test_all_accepted_gives_a_bonus_token():
    s = make_scheduler(block_size=4)
    r = make_request(prompt_len=3, max_tokens=20)
    s.add_request(r)
    s.update(sched := s.schedule(), fake_outputs(sched))
    propose(s, 4)
    sched = s.schedule()
    s.update(sched, spec_outputs(sched, {r.request_id: 4}))
    assert r.output_token_ids == [TOKEN] + [DRAFT] * 4 + [TOKEN] and r.num_computed_tokens == 8
    check_kv(s)


def test_drafts_fit_the_budget_and_the_context():
    s = make_scheduler(block_size=4, max_num_batched_tokens=5, max_model_len=12)
    a, b = make_request(prompt_len=4, max_tokens=20), make_request(prompt_len=4, max_tokens=20)
    s.add_request(a)
    s.add_request(b)
    s.update(sched := s.schedule(), fake_outputs(sched))  # a's prompt (4) + 1 of b's
    s.update(sched := s.schedule(), fake_outputs(sched))  # b's rest, a decodes
    propose(s, 4)
    sched = s.schedule()
    sizes = {e.request_id: e.num_tokens for e in sched.requests}
    assert sizes == {a.request_id: 5} and sched.num_tokens <= 5  # a takes all; b waits a step
    s.update(sched, spec_outputs(sched, {a.request_id: 4}))
    check_kv(s)
    # a has 11 tokens of 12: its last token sits at position 10, and one draft fits at 11
    propose(s, 4)
    sched = s.schedule()
    entry = next(e for e in sched.requests if e.request_id == a.request_id)
    assert entry.spec_token_ids == [DRAFT] and a.num_tokens == 11
    s.update(sched, spec_outputs(sched, {a.request_id: 1, b.request_id: 0}))
    check_kv(s)


def test_drafts_never_preempt_anyone():
    s = make_scheduler(num_blocks=4, block_size=4, prefix_caching=False)
    a, b = make_request(prompt_len=7, max_tokens=20), make_request(prompt_len=7, max_tokens=20)
    s.add_request(a)
    s.add_request(b)
    s.update(sched := s.schedule(), fake_outputs(sched))  # 2 blocks each: the pool is full
    propose(s, 4)
    sched = s.schedule()
    assert not sched.preempted and all(not e.spec_token_ids for e in sched.requests)
    assert sched.num_tokens == 2


def test_a_stop_inside_the_accepted_tokens_drops_the_rest():
    s = make_scheduler(block_size=4)
    r = make_request(prompt_len=3, max_tokens=3)
    s.add_request(r)
    s.update(sched := s.schedule(), fake_outputs(sched))
    propose(s, 4)
    sched = s.schedule()
    s.update(sched, spec_outputs(sched, {r.request_id: 4}))
    assert r.output_token_ids == [TOKEN, DRAFT, DRAFT] and r.finish_reason == "length"
    assert s.kv.pool.num_free == s.kv.pool.num_blocks

    s2 = make_scheduler(block_size=4)
    eos = make_request(prompt_len=3, max_tokens=10)
    eos.eos_token_ids = frozenset({DRAFT})
    eos.params = type(eos.params)(max_tokens=10)  # eos honoured
    s2.add_request(eos)
    s2.update(sched := s2.schedule(), fake_outputs(sched))
    propose(s2, 3)
    sched = s2.schedule()
    s2.update(sched, spec_outputs(sched, {eos.request_id: 3}))
    assert eos.output_token_ids == [TOKEN, DRAFT] and eos.finish_reason == "stop"


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "step", "spec", "spec", "abort"]), st.integers(1, 40),
                  st.integers(1, 12), st.integers(0, 3)),
        min_size=1, max_size=60,
    ),
    num_blocks=st.integers(10, 40),
    seed=st.integers(0, 2**16),
)
def test_random_speculative_workloads_never_leak_or_corrupt(ops, num_blocks, seed):
    rng = random.Random(seed)
    s = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=24, max_model_len=40)

    def step(k: int) -> None:
        propose(s, k)
        sched = s.schedule()
        s.update(sched, spec_outputs(sched, rng))

    live = run_workload(s, ops, lambda op: step(rng.randint(1, 5) if op == "spec" else 0), lambda: check_kv(s))
    while s.num_unfinished:
        step(rng.randint(0, 5))
        check_kv(s)
    pool = s.kv.pool
    assert pool.num_free == pool.num_blocks and not s.kv.block_tables
    for r in live:
        assert r.status.finished
        if r.status != RequestStatus.FINISHED_ABORTED:
            assert len(r.output_token_ids) == min(r.max_tokens, 40 - len(r.prompt_token_ids))
