"""`tokenmill serve`, `tokenmill usage` and `tokenmill bench serve` (registered in tokenmill.cli)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tokenmill.loader.resolve import DEFAULT_MODEL

err = Console(stderr=True)


def _fail(e: Exception) -> None:
    # one line, never wrapped, no markup: the message may contain brackets
    err.print(f"error: {e}".splitlines()[0], highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1)


def _user_errors() -> tuple[type[Exception], ...]:
    from tokenmill.config import ConfigError
    from tokenmill.distributed.group import WorkerDiedError
    from tokenmill.loader.resolve import ModelLoadError
    from tokenmill.sampling_params import InvalidRequestError

    return (ConfigError, ModelLoadError, InvalidRequestError, ValueError, OSError, WorkerDiedError)


def serve_command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="GGUF file, Hugging Face directory, or alias"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, help="TCP port"),
    served_model_name: str | None = typer.Option(None, help="model name clients use (default: --model)"),
    api_key: list[str] = typer.Option([], "--api-key",
                                      help="accepted bearer key (repeatable; also $TOKENMILL_API_KEY)"),
    api_keys_file: Path | None = typer.Option(None, help="file of keys, one per line: 'KEY' or 'LABEL KEY'"),
    max_queue: int | None = typer.Option(None, help="requests waiting for a first token; beyond: 429"),
    ledger: Path | None = typer.Option(None, help="usage ledger (SQLite); default under the user data dir"),
    no_ledger: bool = typer.Option(False, "--no-ledger", help="do not meter usage"),
    price_input: float = typer.Option(0.0, help="$ per 1M uncached prompt tokens"),
    price_cached_input: float | None = typer.Option(None, help="$ per 1M cached prompt tokens (default: input)"),
    price_output: float = typer.Option(0.0, help="$ per 1M completion tokens"),
    price_per_hour: float | None = typer.Option(None, help="$ per hour of this machine: per-token prices "
                                                   "derived from the measured throughput"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    quantization: str = typer.Option("auto", help="weights: auto (GGUF quantized tensors packed) | none | "
                                     "int8 | int4 | fp8"),
    group_size: int = typer.Option(32, "--group-size", help="int4 group size: 32 | 64 | 128"),
    kv_cache_dtype: str = typer.Option("auto", help="auto (the compute dtype) | int8 | fp8"),
    kv_cache_memory_gb: float = typer.Option(1.0, "--kv-cache-memory-gb", help="memory budget of the KV cache"),
    max_num_seqs: int = typer.Option(64, help="requests in one batch at most"),
    max_num_batched_tokens: int = typer.Option(512, help="tokens in one engine step at most"),
    max_model_len: int = typer.Option(2048, help="context window (prompt + output tokens)"),
    threads: int | None = typer.Option(None, help="CPU threads for torch"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "-tp",
                                             help="split every layer over N ranks (gloo on CPU, NCCL on CUDA)"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step"),
    load_format: str = typer.Option("auto", "--load-format", help="auto | dummy (random weights, for load tests)"),
    cuda_graphs: bool | None = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                                            help="replay decode steps as CUDA graphs (default: wherever they can run)"),
    shutdown_timeout: float = typer.Option(30.0, help="seconds SIGTERM waits for running requests"),
) -> None:
    """Serve the model over the OpenAI HTTP API (completions, chat, streaming, metrics, metering)."""
    try:
        from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig
        from tokenmill.server.app import ServerConfig
        from tokenmill.server.keys import ApiKeys
        from tokenmill.server.ledger import default_ledger_path
        from tokenmill.server.tariff import Tariff

        keys = list(api_key) or ([os.environ["TOKENMILL_API_KEY"]] if os.environ.get("TOKENMILL_API_KEY") else [])
        config = ServerConfig(
            model_name=served_model_name or model,
            api_keys=ApiKeys.load(keys, api_keys_file),
            max_queue=max_queue,
            ledger_path=None if no_ledger else (ledger or default_ledger_path()),
            tariff=Tariff(price_input, price_output, price_cached_input, price_per_hour),
        )
        engine_config = EngineConfig(
            model=model, device=device, dtype=dtype, threads=threads, quantization=quantization,
            quant_group_size=group_size, kv_cache_dtype=kv_cache_dtype, compile=compile,
            tensor_parallel_size=tensor_parallel_size, load_format=load_format, cuda_graphs=cuda_graphs,
            cache=CacheConfig(memory_bytes=int(kv_cache_memory_gb * 2**30)),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len),
        )
        from tokenmill.engine.llm_engine import LLMEngine
        from tokenmill.server.app import build_app

        app = build_app(LLMEngine(engine_config, show_progress=False), config)
    except (*_user_errors(), sqlite3.Error) as e:  # sqlite3: the ledger cannot be opened
        _fail(e)
    run_server(app, config, host, port, shutdown_timeout)


def run_server(app, config, host: str, port: int, shutdown_timeout: float) -> None:
    """Run until SIGTERM/SIGINT; then refuse new requests, finish the running ones (at most
    `shutdown_timeout` seconds), stop the engine, and return (exit status 0)."""
    import logging

    import uvicorn

    from tokenmill.server.app import begin_drain

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            begin_drain(app, shutdown_timeout)
            super().handle_exit(sig, frame)

    log = logging.getLogger("tokenmill.server")
    auth = "API keys required" if config.api_keys.enabled else "no API key required"
    ledger = f"ledger {config.ledger_path}" if config.ledger_path else "no ledger"
    log.info("serving %s on http://%s:%d/v1 (%s; %s; %s)", config.model_name, host, port, auth, ledger,
             config.tariff.describe())
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                                   timeout_graceful_shutdown=shutdown_timeout + 10, timeout_keep_alive=5))
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes a
    # graceful SIGTERM end with exit status 0 instead of death by the signal
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        app.state.ctx.engine.engine.shutdown()
    if app.state.fatal is not None:
        _fail(RuntimeError(app.state.fatal))


def usage_command(
    ledger: Path | None = typer.Option(None, help="usage ledger (default: the server's default)"),
    key: str | None = typer.Option(None, help="only this key label"),
    since: str | None = typer.Option(None, help="only days >= YYYY-MM-DD (UTC)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON rows"),
) -> None:
    """Tokens and price per API key and day, from the usage ledger."""
    from tokenmill.server.ledger import default_ledger_path, totals_by_key_and_day

    path = ledger or default_ledger_path()
    try:
        rows = totals_by_key_and_day(path, key, since)
    except (OSError, ValueError) as e:
        _fail(e)
    except sqlite3.DatabaseError as e:
        _fail(ValueError(f"{path}: not a usage ledger ({e})"))
    if json_out:
        print(json.dumps(rows))
        return
    table = Table(title=f"tokenmill usage ({path})")
    for name in ("day", "key", "requests", "prompt", "cached", "completion", "price $"):
        table.add_column(name, justify="left" if name in ("day", "key") else "right")
    totals = [0, 0, 0, 0, 0.0]
    for r in rows:
        values = [r["requests"], r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"], r["price_usd"]]
        totals = [a + b for a, b in zip(totals, values)]
        table.add_row(r["day"], r["api_key"], *(str(v) for v in values[:4]), f"{values[4]:.6f}")
    table.add_row("total", "", *(str(v) for v in totals[:4]), f"{totals[4]:.6f}", style="bold")
    Console().print(table)


def bench_serve_command(
    base_url: str = typer.Option(..., help="server root, e.g. http://127.0.0.1:8000 (with or without /v1)"),
    model: str | None = typer.Option(None, help="model name to request (default: the server's first)"),
    endpoint: str = typer.Option("completions", help="completions | chat"),
    api_key: str | None = typer.Option(None, help="bearer key (also $OPENAI_API_KEY)"),
    num_prompts: int = typer.Option(64, help="requests to send"),
    input_len: int = typer.Option(128, help="prompt tokens per request (approximate without a tokenizer)"),
    output_len: int = typer.Option(64, help="tokens to generate per request (ignore_eos is sent)"),
    request_rate: float = typer.Option(float("inf"), help="requests/s (Poisson arrivals); inf: all at once"),
    max_concurrency: int | None = typer.Option(None, help="requests in flight at most"),
    tokenizer: str | None = typer.Option(None, help="tokenmill model (alias, GGUF, HF dir) whose tokenizer "
                                            "builds exact-length prompts; default: --model if it loads"),
    slo_ttft_ms: float | None = typer.Option(None, help="goodput SLO on time to first token"),
    slo_tpot_ms: float | None = typer.Option(None, help="goodput SLO on time per output token"),
    seed: int = typer.Option(0, help="seed of prompts and arrivals"),
    timeout: float = typer.Option(600.0, help="seconds per request"),
    output_json: Path | None = typer.Option(None, "--output-json", help="write the result JSON here"),
    plot: Path | None = typer.Option(None, help="write a PNG of latencies here"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Load any OpenAI-compatible server; report TTFT, TPOT, ITL, throughput and goodput."""
    from tokenmill.bench.serve import BenchConfig, plot_result, run_benchmark

    try:
        config = BenchConfig(
            base_url=base_url, model=model, endpoint=endpoint,
            api_key=api_key or os.environ.get("OPENAI_API_KEY"), num_prompts=num_prompts, input_len=input_len,
            output_len=output_len, request_rate=request_rate, max_concurrency=max_concurrency,
            tokenizer=tokenizer, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, seed=seed, timeout_s=timeout,
        )
        result = run_benchmark(config)
    except _user_errors() as e:
        _fail(e)
    if output_json:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(result.summary(), indent=2) + "\n")
    if plot:
        plot_result(result, plot)
    summary = result.summary()
    if json_out:
        print(json.dumps(summary))
        return
    table = Table(title=f"tokenmill bench serve ({config.base_url})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        if not isinstance(v, (dict, list)):
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)
