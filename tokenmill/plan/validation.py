"""The planner against published measurements (`validation.csv`).

Each row is one published number with its source, date and the deployment it was measured on.
Rows marked fitted=yes were used to fit efficiency.yaml; the others are hold-out tests.
Error = predicted / measured - 1, in the row's own metric.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, replace
from importlib import resources

from tokenmill.plan import catalog, perf
from tokenmill.plan.deployment import Deployment
from tokenmill.plan.efficiency import Efficiency

METRICS = (
    "tokens_per_s_per_user",  # batch-1 decode speed, e.g. llama.cpp tg128
    "ms_per_token",
    "tokens_per_s_total",  # all sequences of the deployment
    "ttft_ms",
    "prefill_tokens_per_s",  # prompt tokens / time to first token, e.g. llama.cpp pp512
    "latency_ms",  # one request end to end: ttft + output_len * ms_per_token
)


@dataclass(frozen=True)
class Row:
    id: str
    fitted: bool
    model: str
    hardware: str
    chips: int
    tp: int
    pp: int
    weight_bits: float
    kv_bits: float
    compute_dtype: str
    batch: int | None  # None: the planner's --batch max
    input_len: int
    output_len: int
    metric: str
    measured: float
    source: str
    date: str
    confidence: str
    notes: str

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"{self.id}: metric {self.metric!r} not in {METRICS}")
        if self.measured <= 0:
            raise ValueError(f"{self.id}: measured value must be > 0")

    @property
    def family(self) -> str:
        return catalog.hardware(self.hardware).family


@dataclass(frozen=True)
class Result:
    row: Row
    predicted: float

    @property
    def error(self) -> float:
        return self.predicted / self.row.measured - 1.0

    @property
    def ratio(self) -> float:
        """max(pred/meas, meas/pred): how many times off, >= 1."""
        r = self.predicted / self.row.measured
        return max(r, 1.0 / r)


def load_rows(text: str | None = None) -> list[Row]:
    text = text or resources.files("tokenmill.plan").joinpath("validation.csv").read_text()
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        rows.append(
            Row(
                id=raw["id"],
                fitted=raw["fitted"].strip().lower() == "yes",
                model=raw["model"],
                hardware=raw["hardware"],
                chips=int(raw["chips"]),
                tp=int(raw["tp"] or 0),
                pp=int(raw["pp"] or 0),
                weight_bits=float(raw["weight_bits"]),
                kv_bits=float(raw["kv_bits"] or 16),
                compute_dtype=raw["compute_dtype"],
                batch=None if raw["batch"] == "max" else int(raw["batch"]),
                input_len=int(raw["input_len"]),
                output_len=int(raw["output_len"]),
                metric=raw["metric"],
                measured=float(raw["measured"]),
                source=raw["source"],
                date=raw["date"],
                confidence=raw["confidence"],
                notes=raw["notes"],
            )
        )
    return rows


def deployment(row: Row) -> Deployment:
    return Deployment(
        model=catalog.model(row.model),
        hardware=catalog.hardware(row.hardware),
        chips=row.chips,
        tp=row.tp,
        pp=row.pp,
        weight_bits=row.weight_bits,
        kv_bits=row.kv_bits,
        compute_dtype=row.compute_dtype,
        batch=row.batch or 1,
        input_len=row.input_len,
        output_len=row.output_len,
    )


def predict_row(row: Row, eff: Efficiency | None = None) -> float:
    """The planner's value for the row's metric."""
    dep = deployment(row)
    eff = eff or perf.efficiency_for(dep.hardware)
    if row.batch is None:
        dep = replace(dep, batch=perf.best_batch(dep, eff))
    p = perf.predict(dep, eff)
    return {
        "tokens_per_s_per_user": p.tokens_per_s_per_user,
        "ms_per_token": p.ms_per_token,
        "tokens_per_s_total": p.tokens_per_s_total,
        "ttft_ms": p.ttft_ms,
        "prefill_tokens_per_s": row.input_len / (p.ttft_ms / 1e3),
        "latency_ms": p.ttft_ms + row.output_len * p.ms_per_token,
    }[row.metric]


def evaluate(rows: list[Row] | None = None) -> list[Result]:
    return [Result(row, predict_row(row)) for row in (rows if rows is not None else load_rows())]


@dataclass(frozen=True)
class Summary:
    fitted_median: float
    holdout_median: float
    holdout_hbm_max_ratio: float
    fitted_count: int
    holdout_count: int


def summarize(results: list[Result]) -> Summary:
    fitted = [abs(r.error) for r in results if r.row.fitted]
    held = [r for r in results if not r.row.fitted]
    hbm = [r.ratio for r in held if not catalog.hardware(r.row.hardware).is_sram]
    return Summary(
        fitted_median=statistics.median(fitted) if fitted else 0.0,
        holdout_median=statistics.median(abs(r.error) for r in held) if held else 0.0,
        holdout_hbm_max_ratio=max(hbm) if hbm else 1.0,
        fitted_count=len(fitted),
        holdout_count=len(held),
    )
