"""benchmarks/host_overhead.py on a few requests: every phase is timed once, none twice."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import host_overhead  # noqa: E402


@pytest.mark.parametrize("kind", ["cumulative", "delta", "final_only"])
def test_phases_add_up_to_the_step(tmp_path, kind):
    from tokenmill.llm import LLM

    (tmp_path / "config.json").write_text(json.dumps(host_overhead.TINY))
    llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", max_num_seqs=4, kv_cache_memory_gb=0.05,
              threads=1, show_progress=False)
    totals = host_overhead.instrument(llm.engine)
    row = host_overhead.measure(llm.engine, totals, batch=4, prompt_len=8, output_len=6, kind=kind, seed=0)
    assert row["steps"] == 5  # the prefill step samples the first token
    assert all(row[p] >= 0 for p in host_overhead.PHASES), row
    assert sum(row[p] for p in host_overhead.PHASES) == pytest.approx(row["step_ms"])
    assert row["model"] > 0 and row["schedule"] > 0 and row["output"] > 0
    assert not llm.engine.has_unfinished_requests()
    # the engine took the objects it built out of the cyclic collector's walks (settle_memory)
    assert gc.get_freeze_count() > 0
