"""The planner against published measurements: report every row's error, bound the medians."""

from __future__ import annotations

import pytest

from tokenmill.plan import catalog, fit, validation

# Target: median |error| <= 20% on rows the efficiency factors were NOT fitted on.
HOLDOUT_MEDIAN_BOUND = 0.20
FITTED_MEDIAN_BOUND = 0.10
# Hold-out rows on HBM machines that are off by more than 2x, each explained in docs/plan.md:
KNOWN_HBM_MISSES = {
    "trt-h100-70b-tp4-b480",  # TensorRT-LLM v0.6.1 GQA decode re-read KV per query head (pre-XQA)
    "mlperf41-mi300x-70b-offline",  # AMD's MLPerf stack is ~2.3x the vLLM runs the AMD family fits
}


@pytest.fixture(scope="module")
def results():
    return validation.evaluate()


def test_report_and_bound_errors(results, capsys):
    summary = validation.summarize(results)
    with capsys.disabled():
        print()
        for r in results:
            mark = "fit " if r.row.fitted else "hold"
            print(
                f"  {mark} {r.row.id:32s} {r.row.metric:22s} measured {r.row.measured:>10.2f} "
                f"predicted {r.predicted:>10.2f}  error {r.error:+6.0%}"
            )
        print(
            f"  median |error|: fitted {summary.fitted_median:.1%} ({summary.fitted_count} rows), "
            f"hold-out {summary.holdout_median:.1%} ({summary.holdout_count} rows)"
        )
    assert summary.holdout_count >= 40 and summary.fitted_count >= 10
    assert summary.fitted_median <= FITTED_MEDIAN_BOUND
    assert summary.holdout_median <= HOLDOUT_MEDIAN_BOUND


def test_no_new_hbm_prediction_is_off_by_more_than_2x(results):
    misses = {
        r.row.id
        for r in results
        if not r.row.fitted and not catalog.hardware(r.row.hardware).is_sram and r.ratio > 2.0
    }
    assert misses <= KNOWN_HBM_MISSES, f"new rows off by more than 2x: {misses - KNOWN_HBM_MISSES}"
    assert max(r.ratio for r in results if r.row.id in KNOWN_HBM_MISSES) < 2.6


def test_rows_cover_every_kind_of_machine(results):
    kinds = {catalog.hardware(r.row.hardware).kind for r in results}
    assert {"gpu", "tpu", "apple", "sram"} <= kinds
    for r in results:
        assert r.row.source.startswith("http") and r.row.date[:4].isdigit(), r.row.id


def test_fitted_rows_match_efficiency_yaml(results):
    for family in {r.row.family for r in results}:
        listed = set(catalog.efficiency(family).fitted_on)
        marked = {r.row.id for r in results if r.row.family == family and r.row.fitted}
        assert listed == marked, family


@pytest.mark.parametrize("family", ["groq", "apple"])
def test_yaml_factors_are_the_fit(family):
    """Refitting from the shipped values finds nothing materially better."""
    rows = [r for r in validation.load_rows() if r.fitted and r.family == family]
    shipped = fit.loss(catalog.efficiency(family), rows)
    _, refit = fit.fit_family(family, rounds=2)
    assert refit >= shipped - 0.002
