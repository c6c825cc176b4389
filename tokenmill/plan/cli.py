"""`tokenmill plan`: predict ms/token, tokens/s and $/1M tokens on any accelerator.

    tokenmill plan --model llama-3-70b --hardware h100-sxm --chips 8 --batch 1 [--json] [--plot out.png]
    tokenmill plan check examples/claims_llama3_70b.csv
    tokenmill plan compare --model llama-3-70b --slo-ms 50 --users 200 [--plot rank.png]
    tokenmill plan validate [--refit]

Exit codes: 0 ok; 1 the deployment does not fit (table mode; --json always exits 0 and reports
"fits" and "min_chips"); 2 bad input (unknown model or hardware id, impossible layout).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import typer

from tokenmill.plan import catalog, perf, report
from tokenmill.plan.deployment import Deployment

plan_app = typer.Typer(
    invoke_without_command=True,
    no_args_is_help=False,
    help="Predict ms/token, tokens/s and $/1M tokens for a model on any accelerator, from the memory wall up.",
)

PLAN_PLOT = typer.Option(None, "--plot", help="write a roofline + latency/throughput PNG here")
COMPARE_PLOT = typer.Option(None, "--plot", help="write a $/1M-tokens ranking PNG here")
CLAIMS_CSV = typer.Argument(
    ...,
    exists=True,
    dir_okay=False,
    help="CSV: label,model,hardware,chips,batch,ms_per_token,tokens_per_s,usd_per_million[,weight_bits]",
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


@plan_app.callback()
def plan(
    ctx: typer.Context,
    model: str = typer.Option(
        None,
        "--model",
        help=f"catalog id, a .gguf file or a config.json; ids: {', '.join(catalog.model_ids())}",
    ),
    hardware: str = typer.Option(
        "h100-sxm", "--hardware", help="hardware id (see hardware.yaml) or 'local'"
    ),
    chips: int = typer.Option(
        0, "--chips", help="chips to use; 0 = the fewest that hold the model"
    ),
    weight_bits: float = typer.Option(
        0.0,
        "--weight-bits",
        help="bits per weight: 16, 8, 4, or e.g. 4.5 (Q4_0), 4.89 (Q4_K_M); 0 = the GGUF's own or 16",
    ),
    kv_bits: float = typer.Option(16.0, "--kv-bits", help="bits per KV-cache element"),
    batch: str = typer.Option(
        "1",
        "--batch",
        help="concurrent sequences, or 'max' (largest that fits and maximises throughput)",
    ),
    input_len: int = typer.Option(512, "--input-len", help="prompt tokens"),
    output_len: int = typer.Option(256, "--output-len", help="generated tokens"),
    tensor_parallel: int = typer.Option(
        0, "--tensor-parallel", help="tensor-parallel group size; 0 = default layout"
    ),
    pipeline_parallel: int = typer.Option(
        0, "--pipeline-parallel", help="pipeline stages; 0 = default layout"
    ),
    spec_tokens: int = typer.Option(
        0, "--spec-tokens", help="speculative decoding: draft tokens per step (k)"
    ),
    acceptance: float = typer.Option(
        0.0, "--acceptance", help="speculative decoding: per-token acceptance rate (a)"
    ),
    draft_model: str = typer.Option(
        None, "--draft-model", help="draft model id; without one drafting is free (n-gram)"
    ),
    compute_dtype: str = typer.Option(
        "", "--compute-dtype", help="matmul dtype: bf16, fp8, int8, fp4; default from the weights"
    ),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    plot: Path = PLAN_PLOT,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    try:
        spec = catalog.model(model)
        hw = catalog.hardware(hardware)
        draft = catalog.model(draft_model) if draft_model else None
        bits = weight_bits or spec.file_bits_per_weight or 16.0
        if batch != "max" and not batch.isdigit():
            _fail(f"--batch must be a positive integer or 'max', got {batch!r}")
        dep = Deployment(
            model=spec,
            hardware=hw,
            chips=max(chips, 1),
            weight_bits=bits,
            kv_bits=kv_bits,
            batch=1 if batch == "max" else int(batch),
            input_len=input_len,
            output_len=output_len,
            tp=tensor_parallel,
            pp=pipeline_parallel,
            spec_tokens=spec_tokens,
            acceptance=acceptance,
            compute_dtype=compute_dtype,
            draft=draft,
        )
        if chips == 0:
            dep = (
                replace(dep, chips=perf.min_chips(dep), tp=0, pp=0)
                if not (tensor_parallel or pipeline_parallel)
                else dep
            )
        if batch == "max":
            dep = replace(dep, batch=perf.best_batch(dep))
        pred = perf.predict(dep)
    except (catalog.UnknownIdError, ValueError) as exc:
        _fail(str(exc))
        return
    if plot is not None:
        from tokenmill.plan.plot import plot_deployment

        plot_deployment(dep, pred, plot)
    if json_out:
        out = {
            "model": spec.name,
            "hardware": hw.id,
            "chips": dep.chips,
            "weight_bits": bits,
            **pred.to_json(),
        }
        typer.echo(json.dumps(out, default=_json_default))
        return
    report.print_table(report.plan_table(dep, pred))
    if plot is not None:
        typer.echo(f"plot written to {plot}")
    if not pred.fits:
        typer.echo(
            f"does not fit: {spec.name} at {bits:g}-bit with batch {dep.batch} needs {pred.min_chips} x {hw.id}, not {dep.chips}"
        )
        raise typer.Exit(1)


@plan_app.command("check")
def check_command(
    claims_csv: Path = CLAIMS_CSV,
    json_out: bool = typer.Option(False, "--json", help="print a JSON list"),
) -> None:
    """Check published claims: physical lower bound, planner prediction, verdict."""
    from tokenmill.plan import claims

    try:
        checks = claims.check_file(claims_csv)
    except (catalog.UnknownIdError, ValueError, KeyError) as exc:
        _fail(str(exc))
        return
    if json_out:
        rows = [
            {
                **c.claim.__dict__,
                "chips_used": c.chips_used,
                "lower_bound_ms": c.lower_bound_ms,
                "predicted_ms": c.predicted_ms,
                "predicted_usd_per_million": c.predicted_usd_per_million,
                "verdict": c.verdict,
                "reasons": list(c.reasons),
            }
            for c in checks
        ]
        typer.echo(json.dumps(rows, default=_json_default))
        return
    report.print_table(report.claims_table(checks))


@plan_app.command("compare")
def compare_command(
    model: str = typer.Option(..., "--model", help="catalog id, .gguf or config.json"),
    hardware: str = typer.Option(
        "", "--hardware", help="comma-separated ids; default: the whole catalog"
    ),
    weight_bits: float = typer.Option(16.0, "--weight-bits"),
    kv_bits: float = typer.Option(16.0, "--kv-bits"),
    input_len: int = typer.Option(512, "--input-len"),
    output_len: int = typer.Option(256, "--output-len"),
    slo_ms: float = typer.Option(None, "--slo-ms", help="max ms per token per user"),
    users: int = typer.Option(None, "--users", help="concurrent users to serve"),
    json_out: bool = typer.Option(False, "--json"),
    plot: Path = COMPARE_PLOT,
) -> None:
    """Rank hardware for one model (and an SLO) by $ per 1M output tokens."""
    from tokenmill.plan.compare import compare

    try:
        spec = catalog.model(model)
        ids = [h.strip() for h in hardware.split(",") if h.strip()] or [
            h for h in catalog.hardware_ids() if h != catalog.LOCAL_ID
        ]
        for hid in ids:
            catalog.hardware(hid)
        rows = compare(spec, ids, weight_bits, kv_bits, input_len, output_len, slo_ms, users)
    except (catalog.UnknownIdError, ValueError) as exc:
        _fail(str(exc))
        return
    slo = f" at <= {slo_ms:g} ms/token" if slo_ms else ""
    title = f"{spec.name}, {weight_bits:g}-bit{slo}" + (f", {users} users" if users else "")
    if plot is not None:
        from tokenmill.plan.plot import plot_compare

        plot_compare(rows, title, plot)
    if json_out:
        typer.echo(json.dumps(rows, default=_json_default))
        return
    report.print_table(report.compare_table(rows, title))


@plan_app.command("validate")
def validate_command(
    refit: bool = typer.Option(
        False, "--refit", help="re-fit each family's efficiency factors and print them"
    ),
) -> None:
    """The planner against the published measurements in validation.csv."""
    from tokenmill.plan import validation

    results = validation.evaluate()
    report.print_table(report.validation_table(results, validation.summarize(results)))
    if refit:
        from tokenmill.plan.fit import fit_family

        for family in sorted({r.row.family for r in results if r.row.fitted}):
            eff, loss = fit_family(family)
            typer.echo(
                f"{family}: loss {loss:.4f} bandwidth {eff.bandwidth} compute {eff.compute:.3f} "
                f"collective {eff.collective_overhead_us:.1f} us expert {eff.expert_bandwidth:.3f} "
                f"layer {eff.layer_overhead_us:.1f} us step {eff.step_overhead_us:.1f} us"
            )
