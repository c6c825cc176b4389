"""A real `tokenmill serve` subprocess on 127.0.0.1, and helpers to talk to it.

The model runs in float32 (GGUF blocks dequantized at load), the precision tests/golden.py's
near-tie rule is calibrated for.

One server (`server`) is shared by the whole package; the lifecycle tests start their own,
because they signal or kill it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

MODEL = "smollm2-135m"
KEYS = {"alice": "sk-test-alice", "bob": "sk-test-bob", "bench": "sk-test-bench"}
PLAIN_KEY = "sk-test-plain"  # given with --api-key: labelled key-<sha256 prefix>
PRICE_INPUT, PRICE_CACHED, PRICE_OUTPUT = 0.5, 0.25, 2.0  # $ per 1M tokens
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m tokenmill.cli serve` with the test model; stdout+stderr go to a log file."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.ledger = workdir / "usage.sqlite"
        self.log_path = workdir / "server.log"
        keys_file = workdir / "keys.txt"
        keys_file.write_text("# label key\n" + "".join(f"{k} {v}\n" for k, v in KEYS.items()))
        cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--model", MODEL, "--device", "cpu",
               "--dtype", "float32", "--quantization", "none", "--port", str(self.port),
               "--max-model-len", str(MAX_MODEL_LEN),
               "--kv-cache-memory-gb", "0.15", "--ledger", str(self.ledger), "--api-keys-file", str(keys_file),
               "--api-key", PLAIN_KEY, "--price-input", str(PRICE_INPUT), "--price-cached-input",
               str(PRICE_CACHED), "--price-output", str(PRICE_OUTPUT), *args]
        env = os.environ | {"TOKENMILL_LOG_LEVEL": "INFO"}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open as long as the process runs
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=Path(__file__).resolve().parents[2])
        self.wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"the server did not start in {STARTUP_TIMEOUT_S} s:\n{self.log()[-3000:]}")

    def client(self, key: str = KEYS["alice"], **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=300, **kw)

    def async_client(self, key: str = KEYS["alice"]):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=300)

    def post(self, path: str, body=None, key: str | None = KEYS["alice"], **kw) -> httpx.Response:
        headers = kw.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.post(self.url + path, json=body, headers=headers, timeout=kw.pop("timeout", 300), **kw)

    def metrics(self) -> dict[str, float]:
        """`name{labels}` -> value, with the model_name label dropped."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            name = re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "").replace(",}", "}")
            out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Metrics once nothing runs or waits and no KV block is in use (or fail)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["tokenmill:num_requests_running"] == 0 and m["tokenmill:num_requests_waiting"] == 0
                    and m["tokenmill:kv_cache_usage_perc"] == 0)
            if idle or time.monotonic() > deadline:
                state = {k: v for k, v in m.items() if "num_requests" in k or "kv_cache" in k}
                assert idle, f"not idle after {timeout} s: {state}"
                return m
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tokenizer():
    from tokenmill.loader.resolve import default_model_path
    from tokenmill.loader.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


def token_ids(logprobs_tokens: list[str]) -> list[int]:
    """Token ids from logprob tokens sent with return_tokens_as_token_ids ("token_id:123")."""
    return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


def margins(top_logprobs: list[dict[str, float]]) -> list[float]:
    """Top-1 minus top-2 logprob per step (logprobs differ by the same amount as logits)."""
    out = []
    for entry in top_logprobs:
        top = sorted(entry.values(), reverse=True)
        out.append(top[0] - top[1] if len(top) > 1 else float("inf"))
    return out
