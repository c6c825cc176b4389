"""Keys, tariff and the usage ledger: pure units first, then the ledger of the running server
against the usage its clients received, and `tokenmill usage`."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys

import pytest

from tests.server.conftest import KEYS, MODEL, PLAIN_KEY, PRICE_CACHED, PRICE_INPUT, PRICE_OUTPUT
from tokenmill.config import ConfigError
from tokenmill.server.async_engine import StepRecord
from tokenmill.server.keys import ANONYMOUS, ApiKeys, default_label
from tokenmill.server.ledger import UsageLedger, UsageRecord, read_records, totals_by_key_and_day
from tokenmill.server.tariff import Prices, Tariff, ThroughputMeter


def _record(i: int, key: str = "alice", created_at: float = 1_700_000_000.0) -> UsageRecord:
    return UsageRecord(request_id=f"r{i}", created_at=created_at, api_key=key, user=None, model="m",
                       endpoint="completions", n=1, prompt_tokens=10 + i, cached_tokens=i, completion_tokens=5,
                       finish_reason="length", ttft_s=0.1, e2e_s=0.5, input_per_mtok=1.0,
                       cached_input_per_mtok=0.5, output_per_mtok=2.0, price_usd=0.001 * i)


# -- units ---------------------------------------------------------------------------------------

def test_keys_file_labels_and_bearer_parsing(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\n\nalice sk-a\nsk-b\n")
    keys = ApiKeys.load(["sk-c"], path)
    assert keys.label_for("Bearer sk-a") == "alice"
    assert keys.label_for("bearer  sk-b") == default_label("sk-b") == keys.label_for("Bearer sk-b")
    assert keys.label_for("Bearer sk-c") == default_label("sk-c")
    assert default_label("sk-c").startswith("key-") and "sk-c" not in default_label("sk-c")
    for bad in (None, "", "Bearer", "Bearer sk-x", "sk-a", "Basic sk-a"):
        assert keys.label_for(bad) is None
    assert ApiKeys().label_for(None) == ANONYMOUS
    path.write_text("a b c\n")
    with pytest.raises(ConfigError, match="LABEL KEY"):
        ApiKeys.load([], path)
    with pytest.raises(ConfigError):
        ApiKeys.load([], tmp_path / "missing")


def test_fixed_tariff_prices():
    prices = Tariff(input_per_mtok=1.0, output_per_mtok=4.0, cached_input_per_mtok=0.5).prices()
    assert prices.cost(prompt_tokens=1000, cached_tokens=400, completion_tokens=100) == pytest.approx(
        (600 * 1.0 + 400 * 0.5 + 100 * 4.0) / 1e6)
    assert Tariff(input_per_mtok=2.0).prices().cached_input_per_mtok == 2.0
    with pytest.raises(ConfigError):
        Tariff(input_per_mtok=-1)
    with pytest.raises(ConfigError):
        Tariff(input_per_mtok=1, usd_per_hour=2)


def _step(seconds: float, computed: int, decode: int) -> StepRecord:
    return StepRecord(seconds, computed, decode, context_tokens=0, outputs=[], finished=[])


def test_hourly_tariff_derives_prices_from_measured_step_times():
    meter = ThroughputMeter()
    for _ in range(5):
        meter.on_step(None, _step(0.010, computed=8, decode=8))  # decode-only: 1.25 ms per token
    meter.on_step(None, _step(0.110, computed=104, decode=8))  # 96 prompt tokens in 0.1 s extra
    prefill_s, decode_s = meter.seconds_per_token()
    assert decode_s == pytest.approx(0.010 / 8)
    assert prefill_s == pytest.approx(0.100 / 96)
    prices = Tariff(usd_per_hour=3.6).prices(meter)  # $0.001 per second
    assert prices == Prices(input_per_mtok=pytest.approx(0.001 * prefill_s * 1e6), cached_input_per_mtok=0.0,
                            output_per_mtok=pytest.approx(0.001 * decode_s * 1e6))
    assert Tariff(usd_per_hour=3.6).prices(ThroughputMeter()).output_per_mtok == 0.0  # nothing measured yet


def test_ledger_commits_groups_and_totals_per_key_and_day(tmp_path):
    path = tmp_path / "sub" / "usage.sqlite"
    ledger = UsageLedger(path)
    futures = [ledger.record(_record(i, key="alice" if i % 2 else "bob")) for i in range(50)]
    for f in futures:
        f.result(timeout=30)
    day2 = _record(99, created_at=1_700_000_000.0 + 86_400)
    asyncio.run(ledger.commit(day2))
    ledger.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    records = read_records(path)
    assert len(records) == 51 and records[0] == _record(0, key="bob")
    totals = totals_by_key_and_day(path)
    assert [(t["day"], t["api_key"], t["requests"]) for t in totals] == [
        ("2023-11-14", "alice", 25), ("2023-11-14", "bob", 25), ("2023-11-15", "alice", 1)]
    bob = totals[1]
    assert bob["prompt_tokens"] == sum(10 + i for i in range(0, 50, 2))
    assert bob["price_usd"] == pytest.approx(sum(0.001 * i for i in range(0, 50, 2)))
    assert totals_by_key_and_day(path, api_key="alice", since="2023-11-15")[0]["requests"] == 1


# -- the running server ------------------------------------------------------------------------------

@pytest.mark.slow
def test_ledger_rows_match_what_the_clients_received(server):
    received = {}
    for key in ("alice", "bob"):
        client = server.client(KEYS[key])
        for i in range(2):
            out = client.completions.create(model=MODEL, prompt=f"Count to {i + 3}:", max_tokens=4 + i,
                                            temperature=0, n=1 + i, user=f"user-{i}")
            received[out.id] = (key, out.usage, 1 + i, "completions")
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi " + key}],
                                                max_completion_tokens=5, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        received[chunks[-1].id] = (key, chunks[-1].usage, 1, "chat.completions")
    plain = server.client(PLAIN_KEY).completions.create(model=MODEL, prompt="Plain", max_tokens=2)
    received[plain.id] = (default_label(PLAIN_KEY), plain.usage, 1, "completions")

    rows = {r.request_id: r for r in read_records(server.ledger)}  # the server keeps running: WAL reader
    for request_id, (key, usage, n, endpoint) in received.items():
        row = rows[request_id]
        cached = usage.prompt_tokens_details.cached_tokens
        assert (row.api_key, row.model, row.endpoint, row.n) == (key, MODEL, endpoint, n)
        assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (
            usage.prompt_tokens, cached, usage.completion_tokens)
        assert row.finish_reason == "length" and 0 <= row.ttft_s <= row.e2e_s
        assert (row.input_per_mtok, row.cached_input_per_mtok, row.output_per_mtok) == (
            PRICE_INPUT, PRICE_CACHED, PRICE_OUTPUT)
        expected = ((usage.prompt_tokens - cached) * PRICE_INPUT + cached * PRICE_CACHED
                    + usage.completion_tokens * PRICE_OUTPUT) / 1e6
        assert row.price_usd == pytest.approx(expected)
    assert rows[next(k for k, v in received.items() if v[0] == "alice")].user == "user-0"

    done = subprocess.run([sys.executable, "-m", "tokenmill.cli", "usage", "--ledger", str(server.ledger),
                           "--key", "bob", "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    (bob,) = json.loads(done.stdout)
    mine = [v for v in received.values() if v[0] == "bob"]
    assert bob["requests"] == len(mine)
    assert bob["completion_tokens"] == sum(u.completion_tokens for _, u, _, _ in mine)
    assert bob["prompt_tokens"] == sum(u.prompt_tokens for _, u, _, _ in mine)
    table = subprocess.run([sys.executable, "-m", "tokenmill.cli", "usage", "--ledger", str(server.ledger)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert table.returncode == 0 and "alice" in table.stdout and "bob" in table.stdout
