"""The llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GQA, Qwen2 with QKV bias).

A plain nn.Module over flattened tokens: the step's T tokens from all requests form one
[T, hidden] batch, so every linear layer runs once per step without padding. Parameter names
follow Hugging Face's, so a safetensors checkpoint loads as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.attention.paged import AttentionMetadata, paged_attention, write_kv
from tokenmill.config import ModelConfig
from tokenmill.distributed.group import TPGroup
from tokenmill.distributed.shard import TPShard
from tokenmill.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rope, apply_rope_qk


class Attention(nn.Module):
    """cfg: this rank's sizes (its heads only, under tensor parallelism); o_proj then holds
    the matching columns and its partial output is summed over ranks."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if hasattr(self, "qkv_proj"):  # merged after loading (model/fusion.py)
            qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) D]
            qk = apply_rope_qk(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), cos_sin)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H, D], [T, Hkv, D]
            v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(t, self.num_heads, self.head_dim)  # [T, H, D]
            k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
            v = v.view(t, self.num_kv_heads, self.head_dim)
            q, k = apply_rope(q, k, cos_sin)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale, k, v)  # [T, H, D]
        out = self.o_proj(o.reshape(t, self.num_heads * self.head_dim))  # [T, hidden]
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp)

    def forward(self, x, cos_sin, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LayerGroup(nn.Module):
    """Consecutive decoder layers as one callable: one region for torch.compile, so its guard
    and call overhead is paid once per group instead of once per layer."""

    def __init__(self, layers: Sequence[DecoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, cos_sin, kv_caches, meta):
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos_sin, kv_cache, meta)
        return x


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """With `shard` and `tp` (tensor parallelism, tokenmill/distributed/): built with this rank's
    slice of every split dimension; `config` stays the whole model's, `local_config` is the
    slice's. The embedding and LM head hold this rank's vocabulary rows."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None, shard: TPShard | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.tp, self.shard = tp, shard
        self.local_config = cfg if shard is None else shard.local_config(cfg)
        # vocabulary rows of every rank, for gathering the logits (tensor parallelism)
        self.vocab_sizes = None if tp is None else [
            end - start for start, end in (TPShard.plan(cfg, r, tp.size).vocab for r in range(tp.size))]
        local = self.local_config
        self.model = LlamaBody(local, tp)
        self.lm_head = nn.Linear(local.hidden_size, local.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                groups: Sequence[tuple[Callable, int]] | None = None) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final hidden states [T, hidden] (not logits).
        `groups`: run these instead of model.layers: (f, n) runs the next n layers as
        f(x, cos_sin, their kv_caches, meta) (a compiled LayerGroup)."""
        x = self._embed(input_ids)  # [T, hidden]
        cos_sin = self.rope.cos_sin(positions)
        if groups is None:
            for layer, kv_cache in zip(self.model.layers, kv_caches):
                x = layer(x, cos_sin, kv_cache, meta)
        else:
            first = 0
            for group, n in groups:
                x = group(x, cos_sin, kv_caches[first : first + n], meta)
                first += n
        return self.model.norm(x)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.model.embed_tokens(input_ids)
        start, end = self.shard.vocab
        local = input_ids - start
        mine = (local >= 0) & (local < end - start)  # [T]: ids in this rank's rows
        x = self.model.embed_tokens(local.clamp(0, end - start - 1)) * mine[:, None]
        return self.tp.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32 (gathered from every rank's rows)."""
        logits = F.linear(hidden, self.lm_head.weight).float()  # [N, local vocab]
        if self.tp is None:
            return logits
        return self.tp.all_gather_last(logits, self.vocab_sizes)
