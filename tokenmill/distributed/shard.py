"""Which slice of every weight a tensor-parallel rank holds (Megatron-style splits).

    column-parallel (split output rows)      row-parallel (split input columns, all-reduce after)
    q/k/v_proj: this rank's heads            o_proj:    columns of this rank's q heads
    gate/up_proj: this rank's FFN rows       down_proj: columns of this rank's FFN rows
    embed_tokens, lm_head: this rank's vocabulary rows (lookups masked + all-reduced,
                           logits all-gathered)
    norms: whole on every rank

Heads go by KV group so that each rank's attention is ordinary GQA over its own KV heads:

    Hkv >= ranks: KV heads split as evenly as possible (9 q / 3 kv heads on 2 ranks: rank 0
                  holds kv 0-1 with q 0-5, rank 1 kv 2 with q 6-8: uneven, like llama.cpp's
                  row split, rather than refusing a model whose heads do not divide)
    Hkv <  ranks: each KV head is replicated on ranks / Hkv ranks, which split its q heads
                  (needs ranks % Hkv == 0 and (H / Hkv) % (ranks / Hkv) == 0)

FFN rows and vocabulary split in whole 256- or 32-wide units where the size allows, so packed
4-bit blocks (32 wide, 256 for K-quants) are never cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from tokenmill.config import ConfigError, ModelConfig


def split(n: int, parts: int, index: int, align: int = 1) -> tuple[int, int]:
    """[start, end) of part `index` when n splits into `parts` near-equal runs of whole `align`
    units; a coarser unit than n allows (one that does not divide n, or gives a part nothing)
    falls back to 32, then to 1."""
    while align > 1 and (n % align or n // align < parts):
        align = 32 if align > 32 else 1
    base, rem = divmod(n // align, parts)
    start = index * base + min(index, rem)
    return start * align, (start + base + (index < rem)) * align


def _align(n: int) -> int:
    return next(a for a in (256, 32, 1) if n % a == 0)


@dataclass(frozen=True)
class TPShard:
    """Rank `rank` of `size`: the [start, end) ranges of q heads, KV heads, FFN rows, vocabulary."""

    rank: int
    size: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]

    @classmethod
    def plan(cls, cfg: ModelConfig, rank: int, size: int) -> TPShard:
        h, hkv = cfg.num_heads, cfg.num_kv_heads
        g = h // hkv
        if hkv >= size:
            kv = split(hkv, size, rank)
            heads = (kv[0] * g, kv[1] * g)
        else:
            replicas = size // hkv
            if size % hkv or g % replicas:
                raise ConfigError(
                    f"tensor_parallel_size={size}: a model with {h} heads and {hkv} KV heads needs "
                    f"a size that is at most {hkv}, or a multiple of {hkv} that divides its {g}-head groups")
            kv_head, part = divmod(rank, replicas)
            per = g // replicas
            kv = (kv_head, kv_head + 1)
            heads = (kv_head * g + part * per, kv_head * g + (part + 1) * per)
        f, v = cfg.intermediate_size, cfg.vocab_size
        return cls(rank, size, heads, kv, split(f, size, rank, _align(f)), split(v, size, rank, _align(v)))

    @staticmethod
    def check(cfg: ModelConfig, size: int) -> None:
        """Raise ConfigError if the model cannot be split over `size` ranks."""
        if size > cfg.num_heads:
            raise ConfigError(f"tensor_parallel_size={size} exceeds the model's {cfg.num_heads} attention heads")
        for rank in range(size):
            TPShard.plan(cfg, rank, size)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The sizes this rank's modules are built with (vocab_size: its rows of the table)."""
        return replace(cfg, num_heads=self.heads[1] - self.heads[0], num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
                       intermediate_size=self.ffn[1] - self.ffn[0], vocab_size=self.vocab[1] - self.vocab[0])

    def slice_of(self, name: str, head_dim: int) -> tuple[int, int, int] | None:
        """(dim, start, end) of the Hugging Face-named weight `name` this rank holds; None: all of it."""
        d = head_dim
        rules = (
            (r"self_attn\.q_proj\.(weight|bias)$", 0, self.heads, d),
            (r"self_attn\.[kv]_proj\.(weight|bias)$", 0, self.kv_heads, d),
            (r"self_attn\.o_proj\.weight$", 1, self.heads, d),
            (r"mlp\.(gate|up)_proj\.weight$", 0, self.ffn, 1),
            (r"mlp\.down_proj\.weight$", 1, self.ffn, 1),
            (r"(embed_tokens|lm_head)\.weight$", 0, self.vocab, 1),
        )
        for pattern, dim, (start, end), unit in rules:
            if re.search(pattern, name):
                return dim, start * unit, end * unit
        return None


def max_local_kv_heads(cfg: ModelConfig, size: int) -> int:
    """KV heads of the rank holding most: every rank sizes its KV pool for it, so all ranks have
    the same number of blocks (one scheduler's block tables serve them all)."""
    return max(end - start for start, end in (TPShard.plan(cfg, r, size).kv_heads for r in range(size)))
