"""Scheduler behaviour with fabricated model outputs: budgets, chunked prefill, preemption."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.factories import fake_outputs, make_request, make_scheduler, run_to_completion
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def test_token_budget_and_chunked_prefill():
    s = make_scheduler(max_num_batched_tokens=16, block_size=4)
    long = make_request(prompt_len=40, max_tokens=3)
    s.add_request(long)
    chunks = []
    while long.num_computed_tokens < 40:
        sched = s.schedule()
        assert sched.num_tokens <= 16
        chunks.append(sched.requests[0].num_tokens)
        s.update(sched, fake_outputs(sched))
    assert chunks == [16, 16, 8] and long.output_token_ids == [7]


def test_decodes_keep_running_beside_a_long_prefill():
    s = make_scheduler(max_num_batched_tokens=16, block_size=4)
    short = make_request(prompt_len=3, max_tokens=10)
    s.add_request(short)
    s.update(sched := s.schedule(), fake_outputs(sched))
    s.add_request(make_request(prompt_len=60, max_tokens=2))
    for _ in range(4):  # the long prompt takes 4+ steps; the short request decodes in each
        sched = s.schedule()
        ids = {r.request_id: r.num_tokens for r in sched.requests}
        assert ids[short.request_id] == 1 and sched.num_tokens <= 16
        s.update(sched, fake_outputs(sched))


def test_max_num_seqs_limits_running():
    s = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    for _ in range(5):
        s.add_request(make_request(prompt_len=4, max_tokens=3))
    sched = s.schedule()
    assert len(sched.requests) == 2 and len(s.waiting) == 3
    steps = run_to_completion(s)
    assert all(len(st.requests) <= 2 for st in steps)


def test_preemption_by_recompute_loses_nothing():
    s = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64, prefix_caching=False)
    reqs = [make_request(prompt_len=6, max_tokens=8) for _ in range(3)]
    for r in reqs:
        s.add_request(r)
    steps = run_to_completion(s)
    assert s.num_preemptions > 0
    assert any(st.preempted for st in steps)
    for r in reqs:
        assert r.output_token_ids == [7] * 8 and r.finish_reason == "length"
    assert s.kv.pool.num_free == 6


def test_fcfs_order_of_admission():
    s = make_scheduler(max_num_seqs=1, max_num_batched_tokens=100)
    reqs = [make_request(prompt_len=3, max_tokens=2) for _ in range(3)]
    for r in reqs:
        s.add_request(r)
    order = []
    for step in run_to_completion(s):
        for r in step.requests:
            if r.request_id not in order:
                order.append(r.request_id)
    assert order == [r.request_id for r in reqs]


@given(prompt=st.lists(st.integers(0, 99), min_size=1, max_size=20),
       output=st.lists(st.integers(0, 99), max_size=20), data=st.data())
def test_token_ids_between_is_a_slice_of_all_token_ids(prompt, output, data):
    r = Request("r", prompt, SamplingParams(), output_token_ids=list(output))
    n = len(prompt) + len(output)
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    assert r.token_ids_between(start, stop) == r.all_token_ids[start:stop]
