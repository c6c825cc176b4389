"""Rank hardware for one model and a latency SLO by $ per 1M output tokens.

For each chip: try the fewest chips that hold the model and wider tensor-parallel groups (powers
of two up to the chip's tp_domain); for each, the batch with the best throughput that still meets
the SLO; keep the cheapest per token. `users` concurrent users need ceil(users / batch) replicas.
Cost per token does not depend on the replica count; the chip total does.
"""

from __future__ import annotations

import math
from dataclasses import replace

from tokenmill.plan import catalog, perf
from tokenmill.plan.deployment import Deployment
from tokenmill.plan.model_spec import ModelSpec


def _meets(dep: Deployment, slo_ms: float | None) -> bool:
    return slo_ms is None or perf.predict(replace(dep, batch=1)).ms_per_token <= slo_ms


def _candidate_chips(hw, start: int) -> list[int]:
    """The fewest chips that hold the model, then wider groups: powers of two up to tp_domain
    (SRAM machines: up to twice the minimum, for KV room)."""
    if hw.is_sram:
        return sorted({start, math.ceil(start * 1.25), math.ceil(start * 1.5), start * 2})
    if hw.interconnect_gbs <= 0:
        return [start]
    sizes = [start] + [2**k for k in range(1, 12) if start < 2**k <= max(hw.tp_domain, start)]
    return sizes


def plan_for(
    model: ModelSpec,
    hardware_id: str,
    weight_bits: float,
    kv_bits: float,
    input_len: int,
    output_len: int,
    slo_ms: float | None,
    users: int | None,
) -> dict:
    """The cheapest layout of one chip type: over candidate chip counts, the batch with the best
    throughput that meets the SLO, ranked by $/1M tokens (or, if none meets it, the fastest)."""
    hw = catalog.hardware(hardware_id)
    base = Deployment(
        model=model,
        hardware=hw,
        chips=1,
        weight_bits=weight_bits,
        kv_bits=kv_bits,
        input_len=input_len,
        output_len=output_len,
    )
    options = []
    for chips in _candidate_chips(hw, perf.min_chips(base)):
        dep = replace(base, chips=chips)
        meets = _meets(dep, slo_ms)
        batch = perf.best_batch(dep, max_ms_per_token=slo_ms) if meets else 1
        if users:
            batch = min(batch, users)
        p = perf.predict(replace(dep, batch=batch))
        cost = p.usd_per_million_tokens if p.usd_per_million_tokens is not None else math.inf
        options.append((not meets, cost if meets else p.ms_per_token, chips, batch, meets, p))
    _, _, chips, batch, meets, p = min(options, key=lambda o: o[:2])
    replicas = math.ceil(users / batch) if users else 1
    note = f"{replicas * chips} chips for {users} users" if users else ""
    if not meets:
        note = f"misses {slo_ms:g} ms/token even at batch 1"
    return {
        "hardware": hardware_id,
        "chips": chips,
        "replicas": replicas,
        "total_chips": replicas * chips,
        "batch": batch,
        "ms_per_token": p.ms_per_token,
        "tokens_per_s_per_user": p.tokens_per_s_per_user,
        "tokens_per_s_total": p.tokens_per_s_total,
        "usd_per_million_tokens": p.usd_per_million_tokens,
        "joules_per_token": p.joules_per_token,
        "bound": p.bound,
        "meets_slo": meets,
        "note": note,
    }


def compare(
    model: ModelSpec,
    hardware_ids: list[str],
    weight_bits: float = 16,
    kv_bits: float = 16,
    input_len: int = 512,
    output_len: int = 256,
    slo_ms: float | None = None,
    users: int | None = None,
) -> list[dict]:
    """One row per chip, those meeting the SLO first, each group by $/1M tokens."""
    rows = []
    for hid in hardware_ids:
        try:
            rows.append(
                plan_for(model, hid, weight_bits, kv_bits, input_len, output_len, slo_ms, users)
            )
        except ValueError as exc:  # does not fit any layout of this chip
            rows.append(
                {
                    "hardware": hid,
                    "chips": 0,
                    "replicas": 0,
                    "total_chips": 0,
                    "batch": 0,
                    "ms_per_token": math.inf,
                    "tokens_per_s_per_user": 0.0,
                    "tokens_per_s_total": 0.0,
                    "usd_per_million_tokens": None,
                    "joules_per_token": None,
                    "bound": "",
                    "meets_slo": False,
                    "note": str(exc),
                }
            )
    return sorted(rows, key=lambda r: (not r["meets_slo"], r["usd_per_million_tokens"] or math.inf))
