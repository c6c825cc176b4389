"""`tokenmill bench serve`: load any OpenAI-compatible server and measure what its users feel.

Each request streams (`stream=true`, `stream_options.include_usage`, `ignore_eos`), and the
client clocks every chunk that carries text:

    TTFT  = first text chunk - send time
    ITL   = gaps between consecutive text chunks (a chunk may carry several tokens)
    TPOT  = (E2E - TTFT) / (output tokens - 1)      output tokens from the server's usage
    E2E   = last chunk - send time
    goodput = requests/s that met every SLO given (TTFT and/or TPOT)

Arrivals are Poisson at `request_rate` (exponential gaps, seeded) or all at once, and at most
`max_concurrency` requests are in flight. Prompts are random vocabulary tokens decoded to text
when a tokenmill tokenizer is at hand (exact input_len), else random words (about input_len).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

WORDS = (
    "time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part",
    "child", "eye", "woman", "place", "work", "week", "case", "point", "government", "company",
    "number", "group", "problem", "fact", "water", "room", "mother", "area", "money", "story",
    "month", "lot", "right", "study", "book", "word", "business", "issue", "side", "kind", "head",
    "house", "service", "friend", "father", "power", "hour", "game", "line", "end", "member", "law",
    "car", "city", "community", "name", "president", "team", "minute", "idea", "kid", "body",
)


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    model: str | None = None
    endpoint: str = "completions"  # completions | chat
    api_key: str | None = None
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 64
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    tokenizer: str | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    seed: int = 0
    timeout_s: float = 600.0
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint={self.endpoint!r}: accepted completions, chat")
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate={self.request_rate}: must be > 0 (inf: all at once)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={self.max_concurrency}: must be >= 1")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r}: must start with http:// or https://")

    @property
    def api_root(self) -> str:
        url = self.base_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


@dataclass
class RequestResult:
    ok: bool
    start_s: float  # since the benchmark started
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _percentiles(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pct(q: float) -> float:  # linear interpolation, as numpy's default
        pos = (len(ordered) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return (ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)) * scale

    return {"mean": statistics.fmean(ordered) * scale, "median": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


@dataclass
class BenchResult:
    config: BenchConfig
    model: str
    duration_s: float
    requests: list[RequestResult]

    def good(self, r: RequestResult) -> bool:
        c = self.config
        if not r.ok:
            return False
        if c.slo_ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1e3 > c.slo_ttft_ms):
            return False
        tpot = r.tpot_s
        return c.slo_tpot_ms is None or tpot is None or tpot * 1e3 <= c.slo_tpot_ms

    def summary(self) -> dict:
        ok = [r for r in self.requests if r.ok]
        out_tokens = sum(r.output_tokens for r in ok)
        in_tokens = sum(r.prompt_tokens for r in ok)
        d = self.duration_s or float("nan")
        summary = {
            "base_url": self.config.base_url, "model": self.model, "endpoint": self.config.endpoint,
            "num_prompts": self.config.num_prompts, "input_len": self.config.input_len,
            "output_len": self.config.output_len,
            "request_rate": self.config.request_rate if math.isfinite(self.config.request_rate) else None,
            "max_concurrency": self.config.max_concurrency,
            "completed": len(ok), "failed": len(self.requests) - len(ok), "duration_s": self.duration_s,
            "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
            "request_throughput": len(ok) / d, "output_throughput": out_tokens / d,
            "total_token_throughput": (in_tokens + out_tokens) / d,
            "slo_ttft_ms": self.config.slo_ttft_ms, "slo_tpot_ms": self.config.slo_tpot_ms,
            "goodput": sum(self.good(r) for r in self.requests) / d,
        }
        for name, values in (("ttft_ms", [r.ttft_s for r in ok if r.ttft_s is not None]),
                             ("tpot_ms", [r.tpot_s for r in ok if r.tpot_s is not None]),
                             ("itl_ms", [x for r in ok for x in r.itl_s]),
                             ("e2el_ms", [r.e2e_s for r in ok if r.e2e_s is not None])):
            for stat, value in _percentiles(values).items():
                summary[f"{stat}_{name}"] = value
        errors = sorted({r.error for r in self.requests if r.error})
        summary["errors"] = errors[:10]
        summary["requests"] = [asdict(r) for r in self.requests]
        return summary


def make_prompts(config: BenchConfig) -> list[str]:
    rng = random.Random(config.seed)
    tokenizer = _tokenizer(config.tokenizer or config.model) if (config.tokenizer or config.model) else None
    prompts = []
    for _ in range(config.num_prompts + config.warmup):
        if tokenizer is not None:
            vocab = tokenizer.vocab_size
            ids = [rng.randrange(min(1000, vocab // 2), vocab) for _ in range(config.input_len)]
            text = tokenizer.decode(ids)
            ids = tokenizer.encode(text, add_special_tokens=False)[: config.input_len]  # re-encoding may grow
            prompts.append(tokenizer.decode(ids))
        else:
            prompts.append(" ".join(rng.choice(WORDS) for _ in range(config.input_len)))
    return prompts


def _tokenizer(name: str):
    """A tokenmill tokenizer for `name` if it resolves locally, else None (quietly)."""
    try:
        from tokenmill.loader.resolve import resolve_model
        from tokenmill.loader.tokenizer import load_tokenizer

        return load_tokenizer(resolve_model(name))
    except (ValueError, OSError):  # not a local model (ModelLoadError is a ValueError)
        return None


async def _one(client, config: BenchConfig, model: str, prompt: str, t_start: float) -> RequestResult:
    body: dict = {"model": model, "max_tokens": config.output_len, "stream": True, "temperature": 0.0,
                  "ignore_eos": True, "stream_options": {"include_usage": True}}
    if config.endpoint == "chat":
        url = config.api_root + "/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        url = config.api_root + "/completions"
        body["prompt"] = prompt
    sent = time.perf_counter()
    result = RequestResult(ok=False, start_s=sent - t_start)
    stamps: list[float] = []
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, timeout=config.timeout_s) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                result.error = f"HTTP {response.status_code}: {text}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))[:200]
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
                for choice in event.get("choices") or []:
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        stamps.append(time.perf_counter())
                        chunks += 1
    except Exception as e:  # noqa: BLE001 - network errors, timeouts, bad JSON: a failed request
        result.error = f"{type(e).__name__}: {e}"[:200]
        return result
    end = time.perf_counter()
    if not stamps:
        result.error = "no text in the response"
        return result
    result.ok = True
    result.ttft_s = stamps[0] - sent
    result.e2e_s = end - sent
    result.itl_s = [b - a for a, b in itertools.pairwise(stamps)]
    result.output_tokens = result.output_tokens or chunks
    return result


async def _run(config: BenchConfig) -> BenchResult:
    import httpx

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=config.timeout_s) as client:
        model = config.model
        if model is None:
            response = await client.get(config.api_root + "/models")
            response.raise_for_status()
            model = response.json()["data"][0]["id"]
        prompts = make_prompts(config)
        t0 = time.perf_counter()
        for prompt in prompts[: config.warmup]:
            warm = await _one(client, config, model, prompt, t0)
            if not warm.ok:
                raise ValueError(f"the warm-up request failed: {warm.error}")
        rng = random.Random(config.seed + 1)
        gate = asyncio.Semaphore(config.max_concurrency or len(prompts))
        t_start = time.perf_counter()

        async def limited(prompt: str) -> RequestResult:
            async with gate:
                return await _one(client, config, model, prompt, t_start)

        tasks = []
        for i, prompt in enumerate(prompts[config.warmup:]):
            if i and math.isfinite(config.request_rate):
                await asyncio.sleep(rng.expovariate(config.request_rate))
            tasks.append(asyncio.create_task(limited(prompt)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_start
    return BenchResult(config, model, duration, list(results))


def run_benchmark(config: BenchConfig) -> BenchResult:
    return asyncio.run(_run(config))


def plot_result(result: BenchResult, path: str | Path) -> Path:
    """Four panels: TTFT and TPOT histograms, ITL CDF, and the timeline of every request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.requests if r.ok]
    s = result.summary()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_ttft, ax_tpot), (ax_itl, ax_time) = axes
    ax_ttft.hist([r.ttft_s * 1e3 for r in ok], bins=30, color="tab:blue")
    ax_ttft.set(title=f"TTFT (p50 {s['median_ttft_ms'] or 0:.0f} ms, p99 {s['p99_ttft_ms'] or 0:.0f} ms)",
                xlabel="ms", ylabel="requests")
    ax_tpot.hist([r.tpot_s * 1e3 for r in ok if r.tpot_s is not None], bins=30, color="tab:orange")
    ax_tpot.set(title=f"TPOT (p50 {s['median_tpot_ms'] or 0:.1f} ms, p99 {s['p99_tpot_ms'] or 0:.1f} ms)",
                xlabel="ms per output token", ylabel="requests")
    itl = sorted(x * 1e3 for r in ok for x in r.itl_s)
    if itl:
        ax_itl.plot(itl, [(i + 1) / len(itl) for i in range(len(itl))], color="tab:green")
    ax_itl.set(title="inter-token latency CDF", xlabel="ms", ylabel="fraction of gaps")
    for i, r in enumerate(sorted(ok, key=lambda r: r.start_s)):
        ax_time.plot([r.start_s, r.start_s + r.ttft_s], [i, i], color="tab:red", linewidth=1)
        ax_time.plot([r.start_s + r.ttft_s, r.start_s + r.e2e_s], [i, i], color="tab:blue", linewidth=1)
    ax_time.set(title="requests: waiting for first token (red), streaming (blue)", xlabel="s", ylabel="request")
    fig.suptitle(f"{result.model} @ {result.config.base_url}: {s['completed']}/{result.config.num_prompts} ok, "
                 f"{s['output_throughput']:.1f} output tok/s, {s['request_throughput']:.2f} req/s, "
                 f"goodput {s['goodput']:.2f} req/s")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
