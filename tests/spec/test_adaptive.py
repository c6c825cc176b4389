"""The adaptive switch: the cost model's choice of k, thresholds, logging of transitions."""

from __future__ import annotations

import pytest

from tokenmill.spec.adaptive import Acceptance, PassCost, SpecController, expected_tokens

# a machine where 4 drafts cost 10% at batch 1 and 4x at batch 64 (compute-bound)
COST = PassCost(k=4, batches=(1, 4, 16, 64), plain_s=(0.010, 0.012, 0.020, 0.060),
                spec_s=(0.011, 0.016, 0.050, 0.240))


def test_expected_tokens_per_pass():
    assert expected_tokens(0.0, 4) == 1
    assert expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_pass_cost_interpolates_in_log_batch():
    assert COST.relative(1, 4) == pytest.approx(1.1)
    assert COST.relative(1, 0) == 1
    assert COST.relative(2, 4) == pytest.approx((1.1 + 16 / 12) / 2)
    assert COST.relative(256, 2) == pytest.approx(1 + (4 - 1) / 2)  # held past the last batch


def test_speculation_pays_at_low_batch_and_not_at_high():
    k1, gain1 = COST.best_k(1, 0.8)
    assert k1 == 4 and gain1 > 2
    assert COST.best_k(64, 0.8)[0] == 0
    assert COST.best_k(1, 0.02)[0] == 0  # drafts that are never right cost more than they bring
    assert COST.best_k(1, 0.05) == (0, 1.0)  # a 3% gain is within the model's error: off
    assert COST.break_even_batch(0.8) in (4, 16)


def step(c: SpecController, batch: int, request: Acceptance | None = None) -> int:
    """One engine step with one candidate request."""
    c.begin_step(batch)
    return c.drafts(request or Acceptance())


def test_controller_switches_off_past_the_measured_batch_and_logs_once(spec_log):
    c = SpecController(4, COST)
    assert step(c, 1) == 4
    assert step(c, 64) == 0
    assert step(c, 64) == 0
    assert step(c, 1) > 0
    messages = [r.getMessage() for r in spec_log.records]
    assert sum("speculation off" in m for m in messages) == 1
    assert sum("speculation on" in m for m in messages) == 1 and c.num_switches == 2


def test_a_request_whose_drafts_fail_stops_and_later_tries_again():
    c = SpecController(4, COST)
    good, bad = Acceptance(), Acceptance()
    for _ in range(20):
        c.observe(good, 4, 4)
        c.observe(bad, 4, 0)
    c.begin_step(4)
    assert c.drafts(good) == 4 and c.drafts(bad) == 0
    for _ in range(100):  # no evidence while off: its estimate drifts back to everyone's
        c.begin_step(4)
        k = c.drafts(bad)
    assert k > 0 and c.num_switches == 0  # a request's own decisions are not the batch's


def test_everyones_acceptance_is_each_requests_prior():
    c = SpecController(4, COST)
    for _ in range(200):
        c.observe(None, 4, 0)
    assert c.alpha < 0.1 and step(c, 1) == 0
    for _ in range(600):
        c.begin_step(1)
    assert c.alpha > 0.5 and step(c, 1) > 0


def test_fixed_threshold_and_always_on():
    c = SpecController(3, None, max_batch=8)
    assert step(c, 8) == 3 and step(c, 9) == 0
    always = SpecController(3, COST, max_batch=8, adaptive=False)
    assert step(always, 10_000) == 3


def test_the_first_draft_may_cost_most():
    """Measured on a CPU: 2 tokens per request run a matrix-matrix kernel instead of a
    matrix-vector one, and cost nearly as much as 5."""
    cost = PassCost(4, (1,), (0.040,), (0.064,), one_s=(0.059,))
    assert cost.relative(1, 1) == pytest.approx(0.059 / 0.040)
    assert cost.relative(1, 4) == pytest.approx(1.6)
    assert cost.best_k(1, 0.3)[0] == 0  # one cheap-looking draft is not cheap
    assert cost.best_k(1, 0.8)[0] == 4


def test_a_draft_model_costs_its_passes():
    with_draft = PassCost(4, COST.batches, COST.plain_s, COST.spec_s, draft_s=(0.004, 0.004, 0.005, 0.010))
    assert with_draft.relative(1, 4) == pytest.approx(1.1 + 4 * 0.4)
    assert with_draft.best_k(1, 0.6)[0] < COST.best_k(1, 0.6)[0]
