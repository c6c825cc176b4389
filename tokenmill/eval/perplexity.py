"""Perplexity over a text through the engine's own model forward, paged KV pool included.

Sliding windows (the scheme of Hugging Face's "Perplexity of fixed-length models" guide):

    tokens   t0 t1 t2 ............................................ t(N-1)
    window 1 [t0 .............. t(W-1)]                 scores t1 .. t(W-1)
    window 2           [t(S) .............. t(S+W-1)]   scores the S tokens after window 1's end
    window 3                      [t(2S) .............. t(2S+W-1)] ...

Every window of W tokens is one prefill from an empty context; each token is scored once, by
the first window that contains it past the previous window's end, so every scored token after
the first window sees at least W - S tokens of context. N - 1 tokens are scored in all.

    nll        = mean over scored tokens of -log p(t_i | window tokens before i)
    perplexity = exp(nll)

K and V go through a fresh pool of the engine's KV dtype, so KV-cache quantization is measured
too. Under tensor parallelism the window runs as one step of the engine's runner on every rank
instead (blocks of the engine's own pool, logits at every scored position gathered from the
ranks), so the KV dtype is the engine's. Defaults: W = 512, S = 256.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from tokenmill.attention.paged import AttentionMetadata
from tokenmill.config import ConfigError
from tokenmill.worker.kv_cache import allocate_kv_caches

WINDOW = 512
STRIDE = 256


@dataclass(frozen=True)
class PerplexityResult:
    model: str
    quantization: str
    kv_cache_dtype: str
    dtype: str
    tokens: int  # in the text
    scored: int
    window: int
    stride: int
    nll: float
    perplexity: float
    seconds: float


@torch.inference_mode()
def prefill_hidden(model, ids: list[int], kv_cache_dtype: str = "auto", block_size: int = 16) -> torch.Tensor:
    """Final hidden states [n, hidden] of one prefill of ids through `model`, with a fresh KV
    pool of `kv_cache_dtype` (block table 0, 1, 2, ...)."""
    n = len(ids)
    blocks = -(-n // block_size)
    ref = model.model.norm.weight
    dev = ref.device
    caches = allocate_kv_caches(model.config, blocks, block_size, ref.dtype, dev, kv_cache_dtype)
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev), decode_token_idx=empty, decode_block_tables=empty.view(0, 0),
        decode_ctx_lens=empty, prefills=[(0, n, n, torch.arange(blocks, device=dev))], num_tokens=n,
    )
    return model(torch.tensor(ids, device=dev), torch.arange(n, device=dev), caches, meta)


@torch.inference_mode()
def window_nll(model, ids: list[int], first_scored: int, kv_cache_dtype: str = "auto") -> tuple[float, int]:
    """Sum of -log p(ids[i] | ids[:i]) for i >= max(first_scored, 1) over one prefill of ids.
    Returns (sum, count)."""
    hidden = prefill_hidden(model, ids, kv_cache_dtype)  # [n, hidden]
    start = max(first_scored, 1)
    return _nll_sum(model.compute_logits(hidden[start - 1 : -1]), ids, start)


def _nll_sum(logits: torch.Tensor, ids: list[int], start: int) -> tuple[float, int]:
    """logits [n - start, V] float32 predicting ids[start:] -> (sum of -log p, count)."""
    targets = torch.tensor(ids[start:], device=logits.device)
    return float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum")), len(ids) - start


def window_nll_tp(engine, ids: list[int], first_scored: int) -> tuple[float, int]:
    """window_nll for a tensor-parallel engine: one prefill step of ids broadcast to every rank,
    in blocks borrowed from the engine's pool (returned after)."""
    from tokenmill.worker.model_runner import StepInput

    n, bs = len(ids), engine.config.cache.block_size
    start = max(first_scored, 1)
    blocks = engine.kv.pool.allocate(-(-n // bs))
    try:
        step = StepInput(token_ids=list(ids), positions=list(range(n)),
                         slots=[blocks[p // bs] * bs + p % bs for p in range(n)], decode_idx=[],
                         decode_tables=[], table_width=0, decode_lens=[], prefills=[(0, n, n, blocks)],
                         logits_idx=list(range(start - 1, n - 1)))
        logits = engine.runner.run_broadcast(step)  # [n - start, V] float32
    finally:
        engine.kv.pool.free(reversed(blocks))
    return _nll_sum(logits, ids, start)


def perplexity(engine, ids: list[int], window: int = WINDOW, stride: int = STRIDE,
               kv_cache_dtype: str | None = None) -> PerplexityResult:
    """Perplexity of token ids under the engine's model (weights and dtype as loaded; the KV
    dtype as configured unless kv_cache_dtype overrides it)."""
    if not 0 < stride <= window:
        raise ValueError(f"stride={stride} must be in 1..window ({window})")
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    window = min(window, engine.model_config.max_position_embeddings)
    kv = kv_cache_dtype or engine.config.kv_cache_dtype
    if engine.tp is not None and kv != engine.config.kv_cache_dtype:
        raise ConfigError(f"under tensor parallelism perplexity uses the engine's KV cache dtype "
                          f"({engine.config.kv_cache_dtype}), not {kv}")
    t0 = time.perf_counter()
    total, count, scored_to = 0.0, 0, 0  # scored_to: tokens before it are scored
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        if engine.tp is None:
            s, c = window_nll(engine.model, ids[begin:end], scored_to - begin, kv)
        else:
            s, c = window_nll_tp(engine, ids[begin:end], scored_to - begin)
        total, count, scored_to = total + s, count + c, end
        if end == len(ids):
            break
    nll = total / count
    return PerplexityResult(
        model=engine.model_path.name, quantization=engine.quantization, kv_cache_dtype=kv,
        dtype=str(engine.dtype).removeprefix("torch."), tokens=len(ids), scored=count, window=window,
        stride=stride, nll=nll, perplexity=math.exp(nll), seconds=time.perf_counter() - t0,
    )
