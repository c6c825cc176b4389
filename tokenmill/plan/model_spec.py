"""The shape of a decoder-only transformer, and what one token costs in bytes and FLOPs.

Counts follow the Llama layout (RMSNorm, GQA attention, gated MLP with three matrices):

    per layer   attention  = hidden * head_dim * (2 * heads + 2 * kv_heads)   # q, o + k, v
                expert     = 3 * hidden * ffn                                   # gate, up, down
                router     = hidden * experts            (MoE only)
                norms      = 2 * hidden
    model       embedding  = vocab * hidden ; lm_head = vocab * hidden unless tied ; final norm

Sources: the counting is the standard one of Kaplan et al. 2020 ("Scaling Laws", table 1) and
"Transformer Inference Arithmetic" (kipp.ly, 2022): a forward pass costs 2 FLOPs per weight per
token plus 4 * layers * heads * head_dim * context FLOPs for QK^T and PV.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of one model. Frozen; derived sizes are properties."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool = False
    experts: int = 1
    active_experts: int = 1
    context: int = 4096
    head_dim_override: int | None = None
    source: str = ""
    # A GGUF file knows its own bits per weight (packing and scales included).
    file_bits_per_weight: float | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "experts", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.name}: {name} must be >= 1")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads ({self.heads}) not a multiple of kv_heads")
        if not 1 <= self.active_experts <= self.experts:
            raise ValueError(f"{self.name}: need 1 <= active_experts <= experts")

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.heads

    @property
    def attention_params(self) -> int:
        """Per layer: q and o are hidden x (heads*head_dim); k and v are hidden x (kv_heads*head_dim)."""
        return self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    @property
    def expert_params(self) -> int:
        """One gated MLP (gate, up, down)."""
        return 3 * self.hidden * self.ffn

    @property
    def router_params(self) -> int:
        return self.hidden * self.experts if self.experts > 1 else 0

    @property
    def shared_layer_params(self) -> int:
        """Per-layer weights every token reads: attention, router, two norms."""
        return self.attention_params + self.router_params + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        lm_head = 0 if self.tied else self.embedding_params
        per_layer = self.shared_layer_params + self.experts * self.expert_params
        return self.layers * per_layer + self.embedding_params + lm_head + self.hidden

    @property
    def active_params(self) -> int:
        """Weights one token multiplies by: every layer with its k routed experts, plus the lm_head
        (the input embedding is a row gather, not a matmul)."""
        per_layer = self.shared_layer_params + self.active_experts * self.expert_params
        return self.layers * per_layer + self.embedding_params + self.hidden

    def experts_touched(self, tokens: float) -> float:
        """Expected distinct experts per layer hit by `tokens` tokens, each routed to k of E experts
        uniformly: E * (1 - (1 - k/E)^tokens) (occupancy of E bins). Dense models: 1."""
        if self.experts == 1:
            return 1.0
        e, k = self.experts, self.active_experts
        return e * (1.0 - (1.0 - k / e) ** max(tokens, 1.0))

    def streamed_params(self, tokens: float = 1.0) -> float:
        """Weights read from memory by one forward step over `tokens` tokens: all shared layer
        weights, the experts those tokens touch, and the lm_head (a tied embedding is read in full
        as the lm_head). The input embedding is gathered one row per token: not counted."""
        per_layer = self.shared_layer_params + self.experts_touched(tokens) * self.expert_params
        return self.layers * per_layer + self.embedding_params + self.hidden

    def weight_bytes(self, weight_bits: float) -> float:
        """Bytes to hold every weight at `weight_bits` bits each."""
        return self.total_params * weight_bits / 8

    def kv_bytes_per_token(self, kv_bits: float) -> float:
        """K and V for one token of one sequence: 2 * layers * kv_heads * head_dim * bits/8."""
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_bits / 8

    def matmul_flops_per_token(self) -> float:
        """2 FLOPs (multiply + add) per active weight."""
        return 2.0 * self.active_params

    def attention_flops_per_token(self, context: float) -> float:
        """QK^T and PV against `context` cached positions: 2 * 2 * layers * heads * head_dim * ctx."""
        return 4.0 * self.layers * self.heads * self.head_dim * context


def from_hf_config(config: dict[str, Any], name: str = "hf-model", source: str = "") -> ModelSpec:
    """Build a spec from a Hugging Face config.json dictionary (Llama, Mistral, Mixtral, Qwen2)."""
    heads = int(config["num_attention_heads"])
    return ModelSpec(
        name=name,
        layers=int(config["num_hidden_layers"]),
        hidden=int(config["hidden_size"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        ffn=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", False)),
        experts=int(config.get("num_local_experts") or config.get("num_experts") or 1),
        active_experts=int(config.get("num_experts_per_tok") or 1),
        context=int(config.get("max_position_embeddings") or 4096),
        head_dim_override=config.get("head_dim"),
        source=source,
    )


def from_hf_config_file(path: Path) -> ModelSpec:
    config = json.loads(Path(path).read_text())
    return from_hf_config(config, name=Path(path).parent.name or "hf-model", source=str(path))


def from_gguf(path: Path) -> ModelSpec:
    """Read architecture numbers from GGUF metadata (`{arch}.block_count` etc.) and the file's
    real bits per weight (tensor bytes * 8 / tensor elements, packing and scales included)."""
    from tokenmill.loader.gguf_loader import open_gguf

    reader = open_gguf(Path(path))

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture", "llama")
    tensors = {t.name: t for t in reader.tensors}
    vocab = field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens", []) or [])
    hidden = int(field(f"{arch}.embedding_length"))
    heads = int(field(f"{arch}.attention.head_count"))
    elements = sum(int(t.n_elements) for t in reader.tensors)
    file_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    key_len = field(f"{arch}.attention.key_length")
    return ModelSpec(
        name=Path(path).stem,
        layers=int(field(f"{arch}.block_count")),
        hidden=hidden,
        heads=heads,
        kv_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
        ffn=int(field(f"{arch}.feed_forward_length")),
        vocab=int(vocab),
        tied="output.weight" not in tensors,
        experts=int(field(f"{arch}.expert_count", 1) or 1),
        active_experts=int(field(f"{arch}.expert_used_count", 1) or 1),
        context=int(field(f"{arch}.context_length", 4096)),
        head_dim_override=int(key_len) if key_len else None,
        source=str(path),
        file_bits_per_weight=8.0 * file_bytes / elements if elements else None,
    )
