"""The claims checker on the shipped example table and on rows built to trip each verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.plan import claims
from tokenmill.plan.claims import Claim

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "claims_llama3_70b.csv"


@pytest.fixture(scope="module")
def checked():
    return {c.claim.label: c for c in claims.check_file(EXAMPLE)}


def test_example_table_verdicts(checked):
    # 8 H100s hold 70B easily and 45 ms is above the 5.2 ms bound, but $1.20/1M at 22 tok/s
    # on 8 chips means $0.012 per H100-hour: the price only works at a batch of ~150.
    h100 = checked["8x H100"]
    assert h100.verdict == claims.INCONSISTENT
    assert h100.lower_bound_ms < 45 and any("chip-hour" in r for r in h100.reasons)
    # One LPU has 230 MB of SRAM; 141 GB of weights need >= 614 of them.
    groq = checked["1 Groq LPU"]
    assert groq.verdict == claims.NEEDS_CHIPS and any(
        ">= 615" in r or ">= 614" in r for r in groq.reasons
    )
    # One wafer holds 44 GB: 16-bit 70B needs 4.
    assert checked["Cerebras WSE-3"].verdict == claims.NEEDS_CHIPS
    # Chip count not stated: at least 6 x 32 GB Inferentia2 make 30 ms possible; the price is not.
    inf2 = checked["AWS Inferentia2"]
    assert inf2.verdict == claims.INCONSISTENT and inf2.chips_used >= 5


def _claim(**kw) -> Claim:
    base = {
        "label": "t",
        "model": "llama-3-70b",
        "hardware": "h100-sxm",
        "chips": 8,
        "batch": 1,
        "ms_per_token": 12.0,
        "tokens_per_s": 83.0,
        "usd_per_million": 100.0,
    }
    return Claim(**{**base, **kw})


def test_each_verdict():
    assert claims.check(_claim()).verdict == claims.CONSISTENT
    assert claims.check(_claim(ms_per_token=2.0, tokens_per_s=500)).verdict == claims.BEYOND_PHYSICS
    assert claims.check(_claim(ms_per_token=45, tokens_per_s=50)).verdict == claims.INCONSISTENT
    assert claims.check(_claim(chips=1)).verdict == claims.NEEDS_CHIPS
    # 4-bit weights (35 GB) fit one H100; the bound then allows fewer milliseconds.
    assert (
        claims.check(_claim(chips=1, weight_bits=4, ms_per_token=25, tokens_per_s=40)).verdict
        == claims.CONSISTENT
    )
