"""Prometheus metrics of the server, named like vLLM's (`vllm:` -> `tokenmill:`) so dashboards fit.

Everything is updated on the engine thread after each step (prometheus-client is thread-safe)
and read by GET /metrics. The decode bandwidth is the figure the engine is built around:

    bytes per decode step = weight bytes read once per step + KV bytes of every context token
    achieved GB/s         = bytes per decode step / step seconds        (decode-only steps)

`tokenmill:decode_bytes_total` and `tokenmill:decode_seconds_total` let Prometheus compute it
over any window: rate(decode_bytes_total[1m]) / rate(decode_seconds_total[1m]).
"""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokenmill.bench.bytes import kv_bytes_per_step
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.server.async_engine import StepRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST

# the buckets vLLM uses, so existing dashboards' heatmaps fit
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)


def measured_peak_gbs() -> float | None:
    """This machine's STREAM peak if `tokenmill bench bandwidth` has cached one; never measures."""
    from tokenmill.bench.bandwidth import CACHE_FILE, BandwidthResult, cache_dir, machine_signature

    try:
        result = BandwidthResult(**json.loads((cache_dir() / CACHE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return result.peak_gbs if result.machine == machine_signature() else None


class ServerMetrics:
    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        label = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"tokenmill:{name}", doc, label, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"tokenmill:{name}", doc, label, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"tokenmill:{name}", doc, label, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate", "Prefix-cache block hits / lookups.")
        self.prefix_queries = counter("prefix_cache_queries", "Prefix-cache block lookups.")
        self.prefix_hits = counter("prefix_cache_hits", "Prefix-cache block hits.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.preemptions = counter("num_preemptions", "Requests preempted (recomputed later).")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token after the first.",
                              TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", E2E_BUCKETS)
        self._success = Counter("tokenmill:request_success", "Finished requests by reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.success = {k: self._success.labels(model_name, k) for k in ("stop", "length", "abort")}
        self.decode_bytes = counter("decode_bytes", "Bytes decode-only steps had to move (weights + KV).")
        self.decode_seconds = counter("decode_seconds", "Wall time of decode-only steps.")
        self.decode_gbs = gauge("decode_bandwidth_gb_per_s", "Achieved bandwidth of the latest decode step.")
        peak = measured_peak_gbs()
        self.peak_gbs = gauge("memory_bandwidth_peak_gb_per_s", "Measured STREAM peak (0: not measured).")
        self.peak_gbs.set(peak or 0.0)
        self._weight_bytes = engine.step_weight_bytes  # every rank's, under tensor parallelism
        self._kv_bytes_per_token = kv_bytes_per_step(engine.model, 1, engine.dtype, engine.config.kv_cache_dtype)
        self._pool = engine.kv.pool
        self._seen_hits = self._seen_queries = self._seen_preemptions = 0

    def on_step(self, engine: LLMEngine, step: StepRecord) -> None:
        """Engine thread, after every step."""
        for out in step.outputs:
            o = out.outputs[0]
            self.generation_tokens.inc(len(o.delta_token_ids))
            if o.num_output_tokens == len(o.delta_token_ids):  # its first tokens: the prompt is in
                self.prompt_tokens.inc(len(out.prompt_token_ids))
        for request, out in step.finished:
            m = out.metrics
            n_out = out.outputs[0].num_output_tokens
            if m is not None and m.first_token_time is not None and m.finish_time is not None:
                self.ttft.observe(max(m.first_token_time - request.arrival_time, 0.0))
                self.e2e.observe(max(m.finish_time - request.arrival_time, 0.0))
                if n_out > 1:
                    self.tpot.observe((m.finish_time - m.first_token_time) / (n_out - 1))
            reason = out.outputs[0].finish_reason or "stop"
            self.success.get(reason, self.success["stop"]).inc()
        if step.decode_tokens and step.decode_tokens == step.computed_tokens and step.seconds > 0:
            moved = self._weight_bytes + self._kv_bytes_per_token * step.context_tokens
            self.decode_bytes.inc(moved)
            self.decode_seconds.inc(step.seconds)
            self.decode_gbs.set(moved / step.seconds / 1e9)

    def on_abort(self, n: int) -> None:
        self.success["abort"].inc(n)

    def on_refresh(self, engine: LLMEngine) -> None:
        """Engine thread: gauges and counters that mirror engine state."""
        sched = engine.scheduler
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_usage.set(engine.kv.usage)
        self.prefix_hit_rate.set(engine.kv.prefix_hit_rate)
        pool = self._pool
        self.prefix_queries.inc(max(pool.queries - self._seen_queries, 0))
        self.prefix_hits.inc(max(pool.hits - self._seen_hits, 0))
        self.preemptions.inc(max(sched.num_preemptions - self._seen_preemptions, 0))
        self._seen_queries, self._seen_hits = pool.queries, pool.hits
        self._seen_preemptions = sched.num_preemptions

    def render(self) -> bytes:
        return generate_latest(self.registry)
