"""tokenmill command line: generate | chat | bench | plan."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from tokenmill.eval.cli import eval_app
from tokenmill.loader.resolve import DEFAULT_MODEL
from tokenmill.plan.cli import plan_app
from tokenmill.server.cli import bench_serve_command, serve_command, usage_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tokenmill: an LLM inference engine built around the memory wall.")
bench_app = typer.Typer(no_args_is_help=True, help="Measure tokenmill on this machine.")
app.add_typer(bench_app, name="bench")
app.add_typer(plan_app, name="plan")
app.add_typer(eval_app, name="eval")
app.command("serve")(serve_command)
app.command("usage")(usage_command)
bench_app.command("serve")(bench_serve_command)
err = Console(stderr=True)

MODEL = typer.Option(DEFAULT_MODEL, "--model", "-m", help="GGUF file, Hugging Face directory, or alias")
DEVICE = typer.Option("auto", help="auto | cpu | cuda | cuda:N")
DTYPE = typer.Option("auto", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")
KV_GB = typer.Option(1.0, "--kv-cache-memory-gb", help="memory budget of the paged KV cache")
QUANT = typer.Option("auto", help="weights: auto (GGUF quantized tensors packed) | none | int8 | int4 | fp8")
GROUP = typer.Option(32, "--group-size", help="int4 group size: 32 | 64 | 128")
KV_DTYPE = typer.Option("auto", help="KV cache: auto (the compute dtype) | int8 | fp8")
SPEC_METHOD = typer.Option("none", "--speculative-method",
                           help="speculative decoding: none | ngram | draft (--draft-model) | self (int4 copy)")
SPEC_TOKENS = typer.Option(4, "--speculative-tokens", help="draft tokens verified per step (k)")
DRAFT_MODEL = typer.Option(None, "--draft-model", help="draft model for --speculative-method draft")
TP = typer.Option(1, "--tensor-parallel-size", "-tp", help="split every layer over N ranks (processes; gloo on "
                  "CPU, NCCL on CUDA); under torchrun, the number of processes it starts")
COMPILE = typer.Option(False, "--compile", help="torch.compile the decode step (compiles at start-up)")
CUDA_GRAPHS = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                           help="replay decode steps as CUDA graphs; default: on wherever they can run "
                           "(one CUDA device, a KV cache of auto or int8; fp8 on sm89+)")
LOAD_FORMAT = typer.Option("auto", "--load-format", help="auto | dummy (random weights of the model's shape: "
                           "a catalog id such as llama-3-8b, a config.json directory or a GGUF header)")


def _user_errors():
    from tokenmill.config import ConfigError
    from tokenmill.distributed.group import WorkerDiedError
    from tokenmill.loader.resolve import ModelLoadError
    from tokenmill.sampling_params import InvalidRequestError

    return (ConfigError, ModelLoadError, InvalidRequestError, ValueError, OSError, WorkerDiedError)


def _fail(e: Exception) -> None:
    # one line, never wrapped, no markup: the message may contain brackets
    err.print(f"error: {e}".splitlines()[0], highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1)


def _llm(model, device, dtype, kv_gb, quantization="auto", group_size=32, kv_cache_dtype="auto", **kw):
    from tokenmill.llm import LLM

    return LLM(model, device=device, dtype=dtype, kv_cache_memory_gb=kv_gb, quantization=quantization,
               quant_group_size=group_size, kv_cache_dtype=kv_cache_dtype, **kw)


def _spec(method: str, tokens: int, draft_model: str | None) -> dict | None:
    if method == "none":
        return None
    return {"method": method, "num_speculative_tokens": tokens, "draft_model": draft_model}


def _spec_figures(llm) -> dict:
    s = llm.engine.stats.spec
    if s.method == "none":
        return {}
    return {"spec_method": s.method, "spec_acceptance_rate": s.acceptance_rate,
            "spec_mean_accepted_tokens": s.mean_accepted_tokens, "spec_tokens_per_pass": s.tokens_per_pass}


def _params(max_tokens, temperature, top_p, top_k, min_p, seed, stop, ignore_eos=False, repetition_penalty=1.0):
    from tokenmill.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          seed=seed, stop=stop or None, ignore_eos=ignore_eos,
                          repetition_penalty=repetition_penalty, output_kind="delta")  # streams print deltas


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the prompt text"),
    model: str = MODEL, device: str = DEVICE, dtype: str = DTYPE, kv_cache_memory_gb: float = KV_GB,
    quantization: str = QUANT, group_size: int = GROUP, kv_cache_dtype: str = KV_DTYPE,
    max_tokens: int = typer.Option(64, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0, repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    ignore_eos: bool = False,
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
    stream: bool = typer.Option(True, help="print tokens as they come"),
    speculative_method: str = SPEC_METHOD, speculative_tokens: int = SPEC_TOKENS,
    draft_model: Optional[str] = DRAFT_MODEL,
    tensor_parallel_size: int = TP, compile: bool = COMPILE, load_format: str = LOAD_FORMAT,
    cuda_graphs: bool | None = CUDA_GRAPHS,
) -> None:
    """Generate a completion for one prompt."""
    try:
        params = _params(max_tokens, temperature, top_p, top_k, min_p, seed, stop, ignore_eos, repetition_penalty)
        llm = _llm(model, device, dtype, kv_cache_memory_gb, quantization, group_size, kv_cache_dtype,
                   speculative=_spec(speculative_method, speculative_tokens, draft_model),
                   tensor_parallel_size=tensor_parallel_size, compile=compile, load_format=load_format,
                   cuda_graphs=cuda_graphs)
        source: str | dict = prompt
        if chat:
            tok = llm.get_tokenizer()
            text = tok.apply_chat_template([{"role": "user", "content": prompt}])
            source = {"prompt_token_ids": tok.encode(text, add_special_tokens=False)}
        if stream:
            for out in llm.stream(source, params):
                sys.stdout.write(out.outputs[0].delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(llm.generate(source, params, use_progress=False)[0].outputs[0].text)
    except _user_errors() as e:
        _fail(e)


@app.command()
def chat(
    model: str = MODEL, device: str = DEVICE, dtype: str = DTYPE, kv_cache_memory_gb: float = KV_GB,
    quantization: str = QUANT, group_size: int = GROUP, kv_cache_dtype: str = KV_DTYPE,
    system: Optional[str] = typer.Option(None, help="system message"),
    max_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9, top_k: int = -1, min_p: float = 0.0,
    seed: Optional[int] = None,
) -> None:
    """Talk to the model (streaming, chat template from the model). Ctrl-D or /exit ends it."""
    try:
        params = _params(max_tokens, temperature, top_p, top_k, min_p, seed, [])
        llm = _llm(model, device, dtype, kv_cache_memory_gb, quantization, group_size, kv_cache_dtype)
        tok = llm.get_tokenizer()
        messages = [{"role": "system", "content": system}] if system else []
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
            if line.strip() in ("/exit", "/quit"):
                return
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
            sys.stdout.write("assistant> ")
            reply = ""
            for out in llm.stream({"prompt_token_ids": ids}, params):
                reply += out.outputs[0].delta
                sys.stdout.write(out.outputs[0].delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": reply})
    except _user_errors() as e:
        _fail(e)


def _print_result(title: str, data: dict, json_out: bool, output: Optional[Path]) -> None:
    if output:
        output.write_text(json.dumps(data, indent=2) + "\n")
    if json_out:
        print(json.dumps(data))
        return
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in data.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


@bench_app.command("latency")
def bench_latency_cmd(
    model: str = MODEL, device: str = DEVICE, dtype: str = DTYPE,
    quantization: str = QUANT, group_size: int = GROUP, kv_cache_dtype: str = KV_DTYPE,
    input_len: int = 128, output_len: int = 64, repeats: int = 5,
    tensor_parallel_size: int = TP, compile: bool = COMPILE, load_format: str = LOAD_FORMAT,
    cuda_graphs: bool | None = CUDA_GRAPHS,
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    output: Optional[Path] = typer.Option(None, help="also write the JSON here"),
) -> None:
    """Batch-1 prefill tokens/s and decode ms/token, beside the bytes-per-token bound."""
    from tokenmill.bench.runs import as_dict, bench_latency

    try:
        llm = _llm(model, device, dtype, 0.25, quantization, group_size, kv_cache_dtype,
                   max_num_batched_tokens=max(512, input_len),
                   max_model_len=input_len + output_len + 16,
                   tensor_parallel_size=tensor_parallel_size, compile=compile, load_format=load_format,
                   cuda_graphs=cuda_graphs)
        _print_result("tokenmill bench latency", as_dict(bench_latency(llm, input_len, output_len, repeats)),
                      json_out, output)
    except _user_errors() as e:
        _fail(e)


@bench_app.command("throughput")
def bench_throughput_cmd(
    model: str = MODEL, device: str = DEVICE, dtype: str = DTYPE, kv_cache_memory_gb: float = KV_GB,
    quantization: str = QUANT, group_size: int = GROUP, kv_cache_dtype: str = KV_DTYPE,
    num_requests: int = 32, input_len: int = 128, output_len: int = 128,
    max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
    speculative_method: str = SPEC_METHOD, speculative_tokens: int = SPEC_TOKENS,
    draft_model: Optional[str] = DRAFT_MODEL,
    tensor_parallel_size: int = TP, compile: bool = COMPILE, load_format: str = LOAD_FORMAT,
    cuda_graphs: bool | None = CUDA_GRAPHS,
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    output: Optional[Path] = typer.Option(None, help="also write the JSON here"),
) -> None:
    """N requests submitted together: output tokens/s and achieved bandwidth (with speculative
    decoding: its acceptance rate and tokens per verification pass)."""
    from tokenmill.bench.runs import as_dict, bench_throughput

    try:
        llm = _llm(model, device, dtype, kv_cache_memory_gb, quantization, group_size, kv_cache_dtype,
                   max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=input_len + output_len + 16,
                   speculative=_spec(speculative_method, speculative_tokens, draft_model),
                   tensor_parallel_size=tensor_parallel_size, compile=compile, load_format=load_format,
                   cuda_graphs=cuda_graphs)
        result = as_dict(bench_throughput(llm, num_requests, input_len, output_len))
        _print_result("tokenmill bench throughput", result | _spec_figures(llm), json_out, output)
    except _user_errors() as e:
        _fail(e)


@bench_app.command("bandwidth")
def bench_bandwidth_cmd(json_out: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """STREAM copy/triad memory bandwidth of this machine (cached for the other benchmarks)."""
    from tokenmill.bench.bandwidth import bandwidth_command

    bandwidth_command(json_out)


def main() -> None:
    from tokenmill.logs import setup_logging

    setup_logging()
    app()


if __name__ == "__main__":
    main()
