"""Pictures: a roofline with the deployment's decode and prefill points, latency vs throughput
over batch sizes, and a $/1M-tokens ranking for `plan compare`. Matplotlib, Agg backend."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tokenmill.plan import perf
from tokenmill.plan.deployment import Deployment
from tokenmill.plan.perf import Prediction


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_deployment(dep: Deployment, pred: Prediction, path: Path | str) -> Path:
    """Left: roofline of one chip (attainable FLOP/s = min(peak, intensity x bandwidth)) with the
    decode and prefill steps placed at their FLOPs/byte and achieved FLOP/s. Right: ms/token vs
    total tokens/s as the batch grows to the largest that fits."""
    plt = _pyplot()
    hw = dep.hardware
    eff = perf.efficiency_for(hw)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))

    bw, peak = hw.bandwidth_bytes_per_s, hw.flops(pred.dtype)
    xs = [2 ** (i / 4) for i in range(-8, 64)]
    ax1.loglog(
        xs,
        [min(peak, x * bw) for x in xs],
        color="black",
        label=f"peak {pred.dtype}: {peak / 1e12:g} TFLOP/s, {hw.memory_gbs:g} GB/s",
    )
    e_bw, e_c = eff.weight_bandwidth(dep.weight_bits), eff.compute
    ax1.loglog(
        xs,
        [min(peak * e_c, x * bw * e_bw) for x in xs],
        "--",
        color="gray",
        label="with fitted efficiencies",
    )
    for name, step, marker in (("decode", pred.decode, "o"), ("prefill", pred.prefill, "s")):
        moved = step.weight_bytes + step.kv_bytes
        intensity = step.flops / moved if moved else 1.0
        achieved = step.flops * pred.pp / step.total_s  # step.flops is one pipeline stage's share
        ax1.loglog(
            [intensity],
            [achieved],
            marker,
            markersize=9,
            label=f"{name}: {intensity:.1f} FLOP/B, {achieved / 1e12:.2f} TFLOP/s",
        )
    ax1.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax1.set_ylabel("FLOP/s per chip")
    ax1.set_title(f"roofline: {hw.name}")
    ax1.legend(fontsize=8, loc="lower right")
    ax1.grid(True, which="both", alpha=0.3)

    limit = max(perf.largest_fitting_batch(dep, eff), 1)
    points = []
    for b in perf.batch_candidates(limit):
        p = perf.predict(replace(dep, batch=b), eff)
        points.append((b, p.tokens_per_s_total, p.ms_per_token))
    ax2.plot([t for _, t, _ in points], [ms for _, _, ms in points], "-o", markersize=3)
    ax2.plot(
        [pred.tokens_per_s_total],
        [pred.ms_per_token],
        "r*",
        markersize=14,
        label=f"batch {pred.batch}",
    )
    for b, t, ms in points[:: max(1, len(points) // 8)]:
        ax2.annotate(str(b), (t, ms), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("tokens/s, all users")
    ax2.set_ylabel("ms per token, each user")
    ax2.set_title(f"latency vs throughput, batch 1..{limit} ({dep.chips} chips)")
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)

    fig.suptitle(f"{dep.model.name}, {dep.weight_bits:g}-bit, {dep.chips} x {hw.id}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_compare(rows: list[dict], title: str, path: Path | str) -> Path:
    """Horizontal bars of $/1M tokens (log scale); chips missing the SLO are grey."""
    plt = _pyplot()
    shown = [r for r in rows if r["usd_per_million_tokens"]]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(shown) + 1.5))
    labels = [f"{r['hardware']} ({r['chips']}x, batch {r['batch']})" for r in shown]
    values = [r["usd_per_million_tokens"] for r in shown]
    colors = ["tab:blue" if r["meets_slo"] else "lightgray" for r in shown]
    ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    ax.set_xscale("log")
    ax.set_xlabel("$ per 1M output tokens (grey: misses the SLO)")
    ax.set_title(title)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
