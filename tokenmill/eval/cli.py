"""`tokenmill eval perplexity`: the quality cost of a quantization scheme, as one number."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

from tokenmill.eval.perplexity import STRIDE, WINDOW
from tokenmill.loader.resolve import DEFAULT_MODEL

eval_app = typer.Typer(no_args_is_help=True, help="Measure model quality on this machine.")


@eval_app.command("perplexity")
def perplexity_cmd(
    text: Path = typer.Option(..., "--text", exists=True, dir_okay=False, help="a UTF-8 text file"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="GGUF file, Hugging Face directory, or alias"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    quantization: str = typer.Option("auto", help="auto | none | int8 | int4 | fp8"),
    group_size: int = typer.Option(32, "--group-size", help="int4 group size: 32 | 64 | 128"),
    kv_cache_dtype: str = typer.Option("auto", help="auto | int8 | fp8"),
    window: int = typer.Option(WINDOW, help="tokens per window (one prefill each)"),
    stride: int = typer.Option(STRIDE, help="tokens the window advances; each scored token sees >= window - stride"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "-tp",
                                             help="split the model over N ranks (README: Tensor parallelism)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Perplexity of TEXT under the model, over sliding windows (tokenmill/eval/perplexity.py)."""
    from tokenmill.cli import _fail, _llm, _print_result, _user_errors
    from tokenmill.config import CacheConfig
    from tokenmill.eval.perplexity import perplexity

    try:
        # one rank keeps the window's KV in a pool of its own (eval/perplexity.py); several ranks run
        # it through the engine's runner, whose pool must then hold one window
        blocks = 1 if tensor_parallel_size == 1 else -(-window // CacheConfig.block_size)
        llm = _llm(model, device, dtype, 0.05, quantization, group_size, kv_cache_dtype, num_kv_blocks=blocks,
                   tensor_parallel_size=tensor_parallel_size)
        ids = llm.get_tokenizer().encode(text.read_text(encoding="utf-8"))
        result = asdict(perplexity(llm.engine, ids, window, stride))
    except _user_errors() as e:
        _fail(e)
    if json_out:
        print(json.dumps(result))
    else:
        _print_result("tokenmill eval perplexity", result, False, None)
