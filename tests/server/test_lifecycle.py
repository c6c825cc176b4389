"""Servers of their own: a full queue answers 429, SIGTERM drains in-flight streams and exits 0,
and kill -9 under load loses no request that completed at the client."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.conftest import MODEL, ServerProcess
from tokenmill.server.ledger import read_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("small"), "--max-queue", "1", "--max-num-seqs", "1",
                        "--shutdown-timeout", "120")
    yield srv
    srv.stop()


def _until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_full_queue_answers_429_with_retry_after(small_server):
    bodies = [{"model": MODEL, "prompt": f"{i} little pigs went to", "max_tokens": 12, "ignore_eos": True}
              for i in range(6)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: small_server.post("/v1/completions", b), bodies))
    codes = [r.status_code for r in responses]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            error = r.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert int(r.headers["Retry-After"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 12
    small_server.wait_idle()


def _consume(client, max_tokens: int, into: dict) -> None:
    try:
        stream = client.completions.create(model=MODEL, prompt="The history of the printing press", stream=True,
                                           max_tokens=max_tokens, temperature=0,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = list(stream)
        into.update(id=chunks[-1].id, usage=chunks[-1].usage,
                    reasons=[c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason])
    except Exception as e:  # noqa: BLE001 - reported by the assertions below
        into["error"] = repr(e)


def test_sigterm_drains_in_flight_streams_then_exits_0(small_server):
    client = small_server.client()
    running, waiting = {}, {}
    threads = [threading.Thread(target=_consume, args=(client, 24, running))]
    threads[0].start()
    _until(lambda: small_server.metrics()["tokenmill:num_requests_running"] == 1, what="a running request")
    threads.append(threading.Thread(target=_consume, args=(client, 6, waiting)))
    threads[1].start()
    _until(lambda: small_server.metrics()["tokenmill:num_requests_waiting"] == 1, what="a waiting request")

    small_server.signal(signal.SIGTERM)
    time.sleep(0.5)
    try:  # the listening socket is closed: no new requests
        refused = small_server.post("/v1/completions", {"prompt": "late", "max_tokens": 2}, timeout=5)
        assert refused.status_code == 503, refused.text  # had a socket been left open: "draining"
    except httpx.ConnectError:
        pass
    for t in threads:
        t.join(180)
    assert running.get("reasons") == ["length"] and running["usage"].completion_tokens == 24, running
    assert waiting.get("reasons") == ["length"] and waiting["usage"].completion_tokens == 6, waiting
    assert small_server.proc.wait(120) == 0
    assert "Traceback" not in small_server.log()
    ids = {r.request_id for r in read_records(small_server.ledger)}
    assert {running["id"], waiting["id"]} <= ids


def test_kill_9_under_load_loses_no_completed_request(tmp_path):
    srv = ServerProcess(tmp_path, "--max-num-seqs", "8")
    completed: dict[str, object] = {}
    failed: list[str] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        client = srv.client()
        max_tokens = 400 if i < 4 else 3 + 2 * i  # the first four cannot finish before the kill
        try:
            if i % 2:
                chunks = list(client.completions.create(
                    model=MODEL, prompt=f"Story number {i}:", max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
                request_id, usage = chunks[-1].id, chunks[-1].usage
            else:
                out = client.completions.create(model=MODEL, prompt=f"Story number {i}:", max_tokens=max_tokens,
                                                extra_body={"ignore_eos": True})
                request_id, usage = out.id, out.usage
            with lock:
                completed[request_id] = usage
        except Exception as e:  # noqa: BLE001 - the kill breaks requests in many ways
            with lock:
                failed.append(repr(e))

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        _until(lambda: len(completed) >= 5, timeout=240, what="five completed requests")
        os.kill(srv.proc.pid, signal.SIGKILL)
        for t in threads:
            t.join(60)
        srv.proc.wait(30)
    finally:
        srv.stop()
    assert failed, "every request finished before the kill: the test did not kill under load"
    rows = {r.request_id: r for r in read_records(srv.ledger)}
    for request_id, usage in completed.items():
        assert request_id in rows, f"{request_id} completed at the client but is not in the ledger"
        row = rows[request_id]
        assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
