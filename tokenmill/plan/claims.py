"""Check published performance claims against physics and the planner.

A claim is a row (model, hardware, chips, batch, ms/token, tokens/s, $/1M tokens); chips and
weight_bits may be blank (blank bits = 16). Each row gets one verdict, the most serious that
applies, in this order:

  needs more chips than stated   the stated chips cannot hold the weights at any precision the row
                                 allows (capacity = chips * memory; ceil(bytes / capacity))
  optimistic beyond physics      ms/token below bytes/(chips * bandwidth) and FLOPs/(chips * peak)
  internally inconsistent        ms/token and tokens/s disagree (1000/ms != tok/s per user, nor
                                 batch * 1000/ms in total), or the $/1M tokens implies a chip-hour
                                 price under half the catalog's at the claimed speed and batch
  consistent                     none of the above

Claims carry no context length; the check assumes a 512-token prompt and 256 output tokens.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace
from pathlib import Path

from tokenmill.plan import catalog, cost, perf
from tokenmill.plan.deployment import Deployment

NEEDS_CHIPS = "needs more chips than stated"
BEYOND_PHYSICS = "optimistic beyond physics"
INCONSISTENT = "internally inconsistent"
CONSISTENT = "consistent"
VERDICTS = (NEEDS_CHIPS, BEYOND_PHYSICS, INCONSISTENT, CONSISTENT)

INPUT_LEN, OUTPUT_LEN = 512, 256
SPEED_TOLERANCE = 0.10  # rounding in published tables
CHEAP_FACTOR = 0.5  # implied chip-hour price below half the catalog's is not credible


@dataclass(frozen=True)
class Claim:
    label: str
    model: str
    hardware: str
    chips: int | None
    batch: int
    ms_per_token: float
    tokens_per_s: float
    usd_per_million: float | None
    weight_bits: float = 16.0


@dataclass(frozen=True)
class ClaimCheck:
    claim: Claim
    chips_used: int
    lower_bound_ms: float
    predicted_ms: float
    predicted_tokens_per_s: float
    predicted_usd_per_million: float | None
    verdict: str
    reasons: tuple[str, ...] = field(default_factory=tuple)


def load_claims(path: Path | str) -> list[Claim]:
    """Read a claims CSV (columns: label?, model, hardware, chips, batch, ms_per_token,
    tokens_per_s, usd_per_million, weight_bits?)."""
    text = Path(path).read_text()
    claims = []
    for i, raw in enumerate(csv.DictReader(io.StringIO(text)), start=1):
        get = _getter(raw)
        claims.append(
            Claim(
                label=get("label") or f"row {i}",
                model=get("model"),
                hardware=get("hardware"),
                chips=int(get("chips")) if get("chips") else None,
                batch=int(get("batch") or 1),
                ms_per_token=float(get("ms_per_token")),
                tokens_per_s=float(get("tokens_per_s")),
                usd_per_million=float(get("usd_per_million")) if get("usd_per_million") else None,
                weight_bits=float(get("weight_bits") or 16),
            )
        )
    return claims


def _getter(raw: dict[str, str | None]):
    return lambda key: (raw.get(key) or "").strip()


def _chips_for_latency(claim: Claim, model, hw, limit: int = 100_000) -> int:
    """Fewest chips for which the claimed ms/token is not below the physical lower bound."""
    ctx = INPUT_LEN + OUTPUT_LEN / 2
    for n in range(1, limit):
        lb = perf.lower_bound_s(model, hw, n, claim.weight_bits, 16, claim.batch, ctx) * 1e3
        if lb <= claim.ms_per_token:
            return n
    return limit


def check(claim: Claim) -> ClaimCheck:
    model, hw = catalog.model(claim.model), catalog.hardware(claim.hardware)
    reasons: list[str] = []
    kv = claim.batch * (INPUT_LEN + OUTPUT_LEN) * model.kv_bytes_per_token(16)
    need = {bits: perf.physical_min_chips(model, hw, bits, kv) for bits in (16, 8, 4)}
    need_here = perf.physical_min_chips(model, hw, claim.weight_bits, kv)
    verdicts = []
    if claim.chips is None:
        chips = max(need_here, _chips_for_latency(claim, model, hw))
        reasons.append(
            f"chips not stated: assumed {chips}, the fewest that hold the model and allow the claimed ms/token"
        )
    else:
        chips = claim.chips
        if chips < need_here:
            verdicts.append(NEEDS_CHIPS)
            reasons.append(
                f"{claim.weight_bits:g}-bit weights ({model.weight_bytes(claim.weight_bits) / 1e9:.0f} GB) need "
                f">= {need_here} x {hw.id} ({hw.memory_gb:g} GB each); 16-bit >= {need[16]}, "
                f"8-bit >= {need[8]}, 4-bit >= {need[4]}"
            )
    ctx = INPUT_LEN + OUTPUT_LEN / 2
    lb_ms = perf.lower_bound_s(model, hw, chips, claim.weight_bits, 16, claim.batch, ctx) * 1e3
    if claim.ms_per_token < lb_ms * (1 - 1e-9):
        verdicts.append(BEYOND_PHYSICS)
        reasons.append(
            f"{claim.ms_per_token:g} ms/token is below the physical bound {lb_ms:.2f} ms on {chips} chips"
        )
    per_user = 1e3 / claim.ms_per_token
    speeds = (per_user, per_user * claim.batch)
    if min(abs(s - claim.tokens_per_s) / claim.tokens_per_s for s in speeds) > SPEED_TOLERANCE:
        verdicts.append(INCONSISTENT)
        reasons.append(
            f"{claim.ms_per_token:g} ms/token means {per_user:.1f} tok/s per user, not {claim.tokens_per_s:g}"
        )
    total_tps = (
        claim.tokens_per_s if claim.batch == 1 else max(claim.tokens_per_s, per_user * claim.batch)
    )
    # The planner, at the stated (or assumed) chips if they fit, else at its own minimum.
    dep = Deployment(
        model=model,
        hardware=hw,
        chips=chips,
        weight_bits=claim.weight_bits,
        batch=claim.batch,
        input_len=INPUT_LEN,
        output_len=OUTPUT_LEN,
    )
    if not perf.fits(dep):
        dep = replace(dep, chips=perf.min_chips(dep), tp=0, pp=0)
        reasons.append(f"planner figures are for {dep.chips} chips, the fewest that hold it")
    pred = perf.predict(dep)
    if claim.ms_per_token > 2 * pred.ms_per_token:
        reasons.append(
            f"slower than the planner's {pred.ms_per_token:.1f} ms/token: software, precision or load not stated?"
        )
    if claim.usd_per_million is not None and hw.price is not None:
        implied = cost.implied_usd_per_chip_hour(claim.usd_per_million, total_tps, chips)
        if implied < CHEAP_FACTOR * hw.price.usd_per_hour:
            verdicts.append(INCONSISTENT)
            reasons.append(
                f"${claim.usd_per_million:g}/1M at {total_tps:g} tok/s on {chips} chips implies "
                f"${implied:.3f}/chip-hour; catalog: ${hw.price.usd_per_hour:g} ({hw.price.basis})"
                + _batch_for_cost(dep, claim.usd_per_million)
            )
    verdict = next(v for v in VERDICTS if v in verdicts or v == CONSISTENT)
    return ClaimCheck(
        claim=claim,
        chips_used=chips,
        lower_bound_ms=lb_ms,
        predicted_ms=pred.ms_per_token,
        predicted_tokens_per_s=pred.tokens_per_s_per_user,
        predicted_usd_per_million=pred.usd_per_million_tokens,
        verdict=verdict,
        reasons=tuple(reasons),
    )


def _batch_for_cost(dep: Deployment, usd_per_million: float) -> str:
    """The smallest batch at which the planner reaches the claimed cost, as a phrase."""
    limit = perf.largest_fitting_batch(dep)
    for b in perf.batch_candidates(max(limit, 1)):
        p = perf.predict(replace(dep, batch=b))
        if p.usd_per_million_tokens is not None and p.usd_per_million_tokens <= usd_per_million:
            return (
                f"; the planner reaches that cost at batch >= {b} ({p.ms_per_token:.1f} ms/token)"
            )
    return "; the planner does not reach that cost at any batch that fits"


def check_file(path: Path | str) -> list[ClaimCheck]:
    return [check(c) for c in load_claims(path)]
