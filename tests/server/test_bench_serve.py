"""`tokenmill bench serve` against our server: the JSON summary and the PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.server.conftest import KEYS, MODEL
from tokenmill.bench.serve import BenchConfig, BenchResult, RequestResult, _percentiles


def test_percentiles_and_goodput():
    assert _percentiles([]) == {"mean": None, "median": None, "p90": None, "p99": None}
    p = _percentiles([0.001 * i for i in range(1, 101)])
    assert p["median"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)
    config = BenchConfig(base_url="http://x", slo_ttft_ms=100, slo_tpot_ms=10)
    fast = RequestResult(ok=True, start_s=0, ttft_s=0.05, e2e_s=0.05 + 9 * 0.005, output_tokens=10)
    slow_first = RequestResult(ok=True, start_s=0, ttft_s=0.5, e2e_s=0.6, output_tokens=10)
    slow_decode = RequestResult(ok=True, start_s=0, ttft_s=0.05, e2e_s=0.05 + 9 * 0.05, output_tokens=10)
    result = BenchResult(config, "m", 2.0, [fast, slow_first, slow_decode, RequestResult(ok=False, start_s=0)])
    s = result.summary()
    assert s["completed"] == 3 and s["failed"] == 1 and s["goodput"] == pytest.approx(0.5)
    assert s["request_throughput"] == pytest.approx(1.5)
    with pytest.raises(ValueError):
        BenchConfig(base_url="localhost:8000")


@pytest.mark.slow
def test_bench_serve_writes_json_and_png(server, tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    done = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--base-url", server.url, "--model", MODEL,
         "--api-key", KEYS["bench"], "--num-prompts", "8", "--input-len", "32", "--output-len", "6",
         "--max-concurrency", "4", "--request-rate", "20", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000",
         "--output-json", str(out_json), "--plot", str(out_png), "--json"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out_json.read_text())
    assert summary == json.loads(done.stdout)
    assert summary["completed"] == 8 and summary["failed"] == 0 and summary["model"] == MODEL
    assert summary["total_output_tokens"] == 8 * 6
    assert 28 <= summary["total_input_tokens"] / 8 <= 36  # 32-token prompts, re-tokenized by the server
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert summary[f"median_{name}"] > 0 and summary[f"p99_{name}"] >= summary[f"median_{name}"]
    assert summary["output_throughput"] > 0 and summary["goodput"] == pytest.approx(summary["request_throughput"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
