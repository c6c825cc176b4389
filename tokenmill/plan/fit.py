"""Fit a family's efficiency factors to the validation rows marked fitted=yes.

Objective: mean squared log error, mean(log(pred / measured)^2), over the family's fitted rows.
Search: coordinate descent over multiplicative steps, fractions kept in (0, 1]. Small, slow-ish
(each step re-runs the planner), deterministic. `tokenmill plan validate --refit` prints the result
for a human to copy into efficiency.yaml, next to the rows it was fitted on.
"""

from __future__ import annotations

import math
from dataclasses import replace

from tokenmill.plan import catalog
from tokenmill.plan.efficiency import Efficiency
from tokenmill.plan.validation import Row, load_rows, predict_row

PARAMS = (
    "bw16",
    "bw8",
    "bw4",
    "compute",
    "link",
    "collective_overhead_us",
    "expert_bandwidth",
    "layer_overhead_us",
    "step_overhead_us",
)
STEPS = (0.5, 0.7, 0.85, 0.95, 1.05, 1.18, 1.4, 2.0)


def _get(eff: Efficiency, name: str) -> float:
    if name == "bw":  # one bandwidth factor for every precision
        return eff.bandwidth[16]
    if name.startswith("bw"):
        return eff.bandwidth[int(name[2:])]
    return getattr(eff, name)


def _set(eff: Efficiency, name: str, value: float) -> Efficiency:
    if name == "bw":
        return replace(eff, bandwidth={b: min(value, 1.0) for b in eff.bandwidth})
    if name.startswith("bw"):
        return replace(eff, bandwidth={**eff.bandwidth, int(name[2:]): min(value, 1.0)})
    if name in ("compute", "link", "expert_bandwidth"):
        value = min(value, 1.0)
    return replace(eff, **{name: value})


def loss(eff: Efficiency, rows: list[Row]) -> float:
    errs = [math.log(predict_row(r, eff) / r.measured) ** 2 for r in rows]
    return sum(errs) / len(errs)


def fit_family(family: str, rounds: int = 6) -> tuple[Efficiency, float]:
    """Best factors for `family` (starting from efficiency.yaml, varying the parameters its `fit`
    list names) and their loss on the family's fitted rows."""
    rows = [r for r in load_rows() if r.fitted and r.family == family]
    if not rows:
        raise ValueError(f"no fitted rows for family {family!r}")
    eff = catalog.efficiency(family)
    params = eff.fit_params or PARAMS
    best = loss(eff, rows)
    for _ in range(rounds):
        improved = False
        for name in params:
            current = _get(eff, name)
            base = current if current > 0 else 1.0
            for step in STEPS:
                trial = _set(eff, name, base * step if current > 0 else base * (step - 0.5) * 20)
                value = loss(trial, rows)
                if value < best - 1e-9:
                    eff, best, improved = trial, value, True
        if not improved:
            break
    return eff, best
