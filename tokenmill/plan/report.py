"""Rich tables that show the planner's work: the plan breakdown, claims, comparisons, validation."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tokenmill.plan.claims import ClaimCheck
from tokenmill.plan.deployment import Deployment
from tokenmill.plan.perf import Prediction
from tokenmill.plan.validation import Result, Summary


def _money(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.2f}" if x >= 0.1 else f"${x:.4f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def plan_table(dep: Deployment, p: Prediction) -> Table:
    m, hw = dep.model, dep.hardware
    title = (
        f"{m.name} on {dep.chips} x {hw.id} (tp {p.tp}, pp {p.pp}, replicas {p.replicas}), "
        f"{dep.weight_bits:g}-bit weights, {dep.kv_bits:g}-bit KV, batch {p.batch}, "
        f"{dep.input_len} in / {dep.output_len} out"
    )
    t = Table(title=title, show_lines=False)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("how", style="dim")
    d = p.decode
    fit_text = "yes" if p.fits else f"[red]no: needs {p.min_chips} x {hw.id}[/red]"
    t.add_row(
        "fits",
        fit_text,
        f"{p.memory_per_chip_gb:.1f} GB/chip needed of {p.usable_per_chip_gb:.1f} usable",
    )
    t.add_row(
        "fewest chips that hold it", str(p.min_chips), "weights + KV at this batch and context"
    )
    t.add_row(
        "weights streamed / step / chip",
        f"{d.weight_bytes / 1e9:.3f} GB",
        "active weights x bits/8 / (tp*pp)",
    )
    t.add_row(
        "KV read / step / chip",
        f"{d.kv_bytes / 1e9:.3f} GB",
        "batch x context x KV bytes/token / split",
    )
    t.add_row(
        "FLOPs / step / chip",
        f"{d.flops / 1e12:.3f} TFLOP",
        f"2 x active params per token ({p.dtype})",
    )
    t.add_row(
        "  time: weights", f"{_ms(d.weights_s)} ms", f"/ ({hw.memory_gbs:g} GB/s x efficiency)"
    )
    t.add_row("  time: KV cache", f"{_ms(d.kv_s)} ms", "")
    t.add_row(
        "  time: compute",
        f"{_ms(d.compute_s)} ms",
        f"/ ({hw.flops(p.dtype) / 1e12:g} TFLOP/s x efficiency)",
    )
    t.add_row(
        "  time: all-reduce + pipeline hops",
        f"{_ms(d.comm_s)} ms",
        f"{hw.interconnect_gbs:g} GB/s links",
    )
    t.add_row(
        "  time: per-step overheads", f"{_ms(d.overhead_s)} ms", "launches, sync, sampling (fitted)"
    )
    t.add_row("decode step", f"{_ms(d.total_s)} ms", f"bound: {p.bound}")
    if dep.spec_tokens:
        t.add_row("accepted tokens / step", f"{p.accepted_per_step:.2f}", "(1 - a^(k+1)) / (1 - a)")
    t.add_row(
        "[bold]ms / token[/bold]",
        f"[bold]{p.ms_per_token:.2f}[/bold]",
        f"physical lower bound {p.lower_bound_ms:.2f} ms",
    )
    t.add_row(
        "time to first token",
        f"{p.ttft_ms:.1f} ms",
        f"prefill of {dep.input_len} tokens, bound: {p.prefill.bound}",
    )
    t.add_row("tokens/s per user", f"{p.tokens_per_s_per_user:.1f}", "1000 / ms per token")
    t.add_row(
        "tokens/s total",
        f"{p.tokens_per_s_total:,.0f}",
        "batch / (step + prefill share), x replicas",
    )
    price = hw.price
    price_text = f"{dep.chips} x ${price.usd_per_hour:g}/h ({price.basis})" if price else "no price"
    t.add_row(
        "[bold]$ / 1M output tokens[/bold]",
        f"[bold]{_money(p.usd_per_million_tokens)}[/bold]",
        price_text,
    )
    energy = "n/a" if p.joules_per_token is None else f"{p.joules_per_token:.3f} J"
    t.add_row("energy / token", energy, f"{hw.power_w or '?'} W per chip, board power")
    return t


def claims_table(checks: list[ClaimCheck]) -> Table:
    t = Table(title="claims vs physics and the planner", show_lines=True)
    for col in (
        "claim",
        "chips",
        "claimed ms",
        "lower bound ms",
        "planner ms",
        "claimed $/1M",
        "planner $/1M",
        "verdict",
    ):
        t.add_column(col, justify="left" if col in ("claim", "verdict") else "right")
    for c in checks:
        color = {"consistent": "green"}.get(c.verdict, "red")
        verdict = f"[{color}]{c.verdict}[/{color}]\n" + "\n".join(f"- {r}" for r in c.reasons)
        chips = str(c.claim.chips) if c.claim.chips is not None else f"({c.chips_used})"
        t.add_row(
            f"{c.claim.label}\n{c.claim.model} on {c.claim.hardware}, batch {c.claim.batch}",
            chips,
            f"{c.claim.ms_per_token:g}",
            f"{c.lower_bound_ms:.2f}",
            f"{c.predicted_ms:.2f}",
            _money(c.claim.usd_per_million),
            _money(c.predicted_usd_per_million),
            verdict,
        )
    return t


def compare_table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in (
        "rank",
        "hardware",
        "chips x replicas",
        "batch",
        "ms/token",
        "tok/s/user",
        "tok/s total",
        "$/1M",
        "J/token",
        "note",
    ):
        t.add_column(col, justify="left" if col in ("hardware", "note") else "right")
    for i, r in enumerate(rows, start=1):
        ok = r["meets_slo"]
        t.add_row(
            str(i) if ok else "-",
            r["hardware"],
            f"{r['chips']} x {r['replicas']}",
            str(r["batch"]),
            f"{r['ms_per_token']:.1f}",
            f"{r['tokens_per_s_per_user']:.1f}",
            f"{r['tokens_per_s_total']:,.0f}",
            _money(r["usd_per_million_tokens"]),
            "n/a" if r["joules_per_token"] is None else f"{r['joules_per_token']:.2f}",
            r["note"] if ok else f"[red]{r['note']}[/red]",
        )
    return t


def validation_table(results: list[Result], summary: Summary) -> Table:
    t = Table(
        title=f"planner vs published measurements: median |error| fitted {summary.fitted_median:.1%} "
        f"({summary.fitted_count} rows), hold-out {summary.holdout_median:.1%} ({summary.holdout_count} rows)"
    )
    for col in ("row", "fit", "metric", "measured", "predicted", "error", "source"):
        t.add_column(col, justify="right" if col in ("measured", "predicted", "error") else "left")
    for r in results:
        color = "green" if abs(r.error) <= 0.2 else "yellow" if r.ratio <= 2 else "red"
        t.add_row(
            r.row.id,
            "yes" if r.row.fitted else "",
            r.row.metric,
            f"{r.row.measured:,.2f}",
            f"{r.predicted:,.2f}",
            f"[{color}]{r.error:+.0%}[/{color}]",
            f"{r.row.date} {r.row.confidence}",
        )
    return t


def print_table(table: Table) -> None:
    Console(width=max(Console().width, 160)).print(table)
