"""`tokenmill plan` end to end through typer: the JSON contract, errors, plots, subcommands."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tokenmill.plan.cli import plan_app

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "claims_llama3_70b.csv"
BASE = [
    "--model",
    "llama-3-70b",
    "--hardware",
    "h100-sxm",
    "--chips",
    "8",
    "--weight-bits",
    "16",
    "--input-len",
    "512",
    "--output-len",
    "256",
]
PNG = b"\x89PNG\r\n\x1a\n"


def test_json_contract():
    result = runner.invoke(plan_app, [*BASE, "--batch", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for key in (
        "fits",
        "min_chips",
        "ttft_ms",
        "ms_per_token",
        "tokens_per_s_per_user",
        "tokens_per_s_total",
        "usd_per_million_tokens",
        "bound",
    ):
        assert key in out
    assert out["fits"] is True and out["min_chips"] == 2
    assert out["ms_per_token"] > out["lower_bound_ms"] > 5.0
    assert out["tokens_per_s_per_user"] == 1000 / out["ms_per_token"]


def test_batch_max_picks_a_large_batch():
    out = json.loads(runner.invoke(plan_app, [*BASE, "--batch", "max", "--json"]).stdout)
    assert out["batch"] > 100 and out["fits"]


def test_table_shows_the_breakdown():
    result = runner.invoke(plan_app, [*BASE, "--batch", "1"])
    assert result.exit_code == 0
    for text in ("weights streamed", "all-reduce", "physical lower bound", "$ / 1M"):
        assert text in result.output


def test_unknown_ids_fail_in_one_line_listing_valid_ids():
    for args, valid in (
        (["--model", "llama-9"], "llama-3-70b"),
        (["--model", "llama-3-70b", "--hardware", "h900"], "b200"),
    ):
        result = runner.invoke(plan_app, args)
        assert result.exit_code == 2
        assert valid in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_not_fitting_says_how_many_chips():
    result = runner.invoke(
        plan_app, ["--model", "llama-3-70b", "--hardware", "h100-sxm", "--chips", "1"]
    )
    assert result.exit_code == 1
    assert "needs 2 x h100-sxm" in result.output


def test_plot_is_a_png(tmp_path):
    path = tmp_path / "plan.png"
    result = runner.invoke(plan_app, [*BASE, "--batch", "4", "--plot", str(path), "--json"])
    assert result.exit_code == 0
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000


def test_check_subcommand():
    result = runner.invoke(plan_app, ["check", str(EXAMPLE), "--json"])
    assert result.exit_code == 0
    verdicts = [row["verdict"] for row in json.loads(result.stdout)]
    assert verdicts.count("needs more chips than stated") == 2


def test_compare_ranks_by_cost(tmp_path):
    path = tmp_path / "rank.png"
    result = runner.invoke(
        plan_app,
        [
            "compare",
            "--model",
            "llama-3-70b",
            "--hardware",
            "h100-sxm,b200,m1",
            "--slo-ms",
            "50",
            "--users",
            "200",
            "--json",
            "--plot",
            str(path),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["hardware"] for r in rows][-1] == "m1"  # cannot hold 70B
    costs = [r["usd_per_million_tokens"] for r in rows if r["meets_slo"]]
    assert costs == sorted(costs) and len(costs) == 2
    assert path.read_bytes().startswith(PNG)


def test_validate_subcommand():
    result = runner.invoke(plan_app, ["validate"])
    assert result.exit_code == 0 and "hold-out" in result.output
