"""Builders of tiny llama-family models in the formats tokenmill loads, for the format tests.

Weights are plain numpy arrays under Hugging Face names; from them we write a GGUF (any tensor
type gguf-py can quantize) or build a transformers model, so that each format can be checked
against the same source numbers. The tokenizer is always the real model's (49152 tokens), so
the tiny models use its vocabulary size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenmill.attention.paged import AttentionMetadata
from tokenmill.loader.resolve import default_model_path
from tokenmill.worker.kv_cache import allocate_kv_caches

VOCAB = 49152  # the real SmolLM2 tokenizer's


@dataclass(frozen=True)
class TinyConfig:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # GQA
    vocab: int = VOCAB
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_positions: int = 512
    # llama3 scaling with a short original context, so that it changes most frequencies
    llama3_scaling: dict | None = None
    tie: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


# -- weights ------------------------------------------------------------------------------------

def random_weights(cfg: TinyConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights under HF names, scaled so that logits spread over a few units (random
    tiny models otherwise have near-tied top tokens at every step)."""
    rng = np.random.default_rng(seed)
    h, f, d = cfg.hidden, cfg.intermediate, cfg.head_dim

    def mat(rows: int, cols: int, std: float | None = None) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * (std or cols**-0.5)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(cfg.vocab, h, 1.0), "model.norm.weight": norm()}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = mat(cfg.heads * d, h)
        w[p + "self_attn.k_proj.weight"] = mat(cfg.kv_heads * d, h)
        w[p + "self_attn.v_proj.weight"] = mat(cfg.kv_heads * d, h)
        w[p + "self_attn.o_proj.weight"] = mat(h, cfg.heads * d)
        w[p + "mlp.gate_proj.weight"] = mat(f, h)
        w[p + "mlp.up_proj.weight"] = mat(f, h)
        w[p + "mlp.down_proj.weight"] = mat(h, f)
    if not cfg.tie:
        w["lm_head.weight"] = mat(cfg.vocab, h, 0.4)
    return w


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite a transformers model's parameters in place: norms near 1, biases nonzero (the
    default init zeroes them, which would hide a bias that fails to load), linear weights
    ~1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.4 * noise)
            else:
                p.copy_(noise * p.shape[1] ** -0.5)


# -- transformers -------------------------------------------------------------------------------

def hf_llama_config(cfg: TinyConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta, rope_scaling=cfg.llama3_scaling,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=cfg.tie,
        bos_token_id=1, eos_token_id=2,
    )


def hf_llama(cfg: TinyConfig, weights: dict[str, np.ndarray]):
    """transformers' LlamaForCausalLM in float32 holding exactly `weights`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_llama_config(cfg)).float().eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie:
        model.tie_weights()
    return model


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float], list[torch.Tensor]]:
    """Greedy tokens, top1-top2 margins and log-softmax rows of a transformers model: a plain
    loop over raw logits that recomputes the whole sequence each step (tiny models; no cache
    API to depend on)."""
    tokens: list[int] = []
    margins, logprobs = [], []
    for _ in range(n):
        row = model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].float()
        top2 = row.topk(2)
        tokens.append(int(top2.indices[0]))
        margins.append(float(top2.values[0] - top2.values[1]))
        logprobs.append(torch.log_softmax(row, -1))
    return tokens, margins, logprobs


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[T, V] float32 logits of one prefill."""
    return model(input_ids=torch.tensor([ids])).logits[0].float()


# -- tokenmill ----------------------------------------------------------------------------------

@torch.inference_mode()
def tokenmill_logits(model, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """[T, V] float32 logits of one prefill through tokenmill's model and paged attention, with
    a fresh KV pool of just enough blocks (block table 0, 1, 2, ...)."""
    cfg = model.config
    n = len(ids)
    blocks = -(-n // block_size)
    param = model.model.embed_tokens.weight
    caches = allocate_kv_caches(cfg, blocks, block_size, param.dtype, param.device)
    empty = torch.zeros(0, dtype=torch.long)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), decode_token_idx=empty, decode_block_tables=empty.view(0, 0),
        decode_ctx_lens=empty, prefills=[(0, n, n, torch.arange(blocks))], num_tokens=n,
    )
    hidden = model(torch.tensor(ids), torch.arange(n), caches, meta)  # [T, hidden]
    return model.compute_logits(hidden)


# -- tokenizer ----------------------------------------------------------------------------------

def save_hf_tokenizer(dst: Path) -> None:
    """The real model's tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json,
    chat template), written by transformers from the GGUF."""
    from transformers import AutoTokenizer

    path = default_model_path()
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(dst))


@functools.lru_cache(maxsize=1)
def _real_reader():
    from gguf import GGUFReader

    return GGUFReader(str(default_model_path()))


@functools.lru_cache(maxsize=1)
def real_tokenizer_fields() -> tuple[tuple[str, object, object, object], ...]:
    """(key, value, value type, array item type) of every tokenizer.* key of the real GGUF."""
    from gguf import GGUFValueType

    out = []
    for key, f in _real_reader().fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
            out.append((key, f.contents(), f.types[0], sub))
    return tuple(out)


# -- GGUF ---------------------------------------------------------------------------------------

_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str) -> str:
    """llama.cpp's tensor name for a Hugging Face one."""
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, kind = stem.split(".", 3)
        return f"blk.{layer}.{_GGUF_LAYER[kind]}.{suffix}"
    return f"{_GGUF_TOP[stem]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: Q/K rows reordered per head from
    the rotate-half layout to interleaved pairs (n_head is the KV head count for K)."""
    rows = w.shape[0]
    # rows (head, half, pair) -> (head, pair, half)
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: TinyConfig) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors`: llama3 scaling as
    per-frequency divisors (the rope_freqs tensor)."""
    s = cfg.llama3_scaling
    assert s is not None
    factor, low, high, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], \
        s["original_max_position_embeddings"]
    dim = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_llama_gguf(path: Path, cfg: TinyConfig, weights: dict[str, np.ndarray], tensor_type: str,
                     arch: str = "llama", with_tokenizer: bool = True,
                     raw_types: dict[str, str] | None = None
                     ) -> dict[str, tuple[np.ndarray, object]]:
    """Write `weights` as a llama GGUF v3 with its matrices stored as `tensor_type` (norms stay
    F32, as llama.cpp stores them). Q/K rows are permuted as llama.cpp's converter does.
    `raw_types` {hf name: type} stores those tensors as random bytes of the right size for the
    type instead (for types gguf-py cannot quantize). Reading the tokenizer keys of the real
    GGUF costs seconds; leave them out where no tokenizer is loaded.
    Returns {gguf name: (data as written, GGMLQuantizationType)}."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

    qtype = GGMLQuantizationType[tensor_type]
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_positions)
    writer.add_embedding_length(cfg.hidden)
    writer.add_feed_forward_length(cfg.intermediate)
    writer.add_block_count(cfg.layers)
    writer.add_head_count(cfg.heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab)
    if with_tokenizer:
        for key, value, vtype, sub in real_tokenizer_fields():
            writer.add_key_value(key, value, vtype, sub)
    written: dict[str, tuple[np.ndarray, object]] = {}

    def add(name: str, data: np.ndarray, t) -> None:
        if t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=t)
        written[name] = (data, t)

    if cfg.llama3_scaling:
        add("rope_freqs.weight", llama3_rope_factors(cfg), GGMLQuantizationType.F32)
    for hf, w in weights.items():
        name = gguf_name(hf)
        if arch == "llama" and name.endswith("attn_q.weight"):
            w = llama_cpp_permute(w, cfg.heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            w = llama_cpp_permute(w, cfg.kv_heads)
        if raw_types and hf in raw_types:
            t = GGMLQuantizationType[raw_types[hf]]
            block, type_size = GGML_QUANT_SIZES[t]
            rows, cols = w.shape
            assert cols % block == 0, f"{hf}: {cols} columns are not whole {t.name} blocks"
            nbytes = cols // block * type_size
            raw = np.random.default_rng(0).integers(0, 256, (rows, nbytes), dtype=np.uint8)
            add(name, raw, t)
        elif w.ndim == 1:
            add(name, w, GGMLQuantizationType.F32)
        elif qtype == GGMLQuantizationType.F16:
            add(name, w.astype(np.float16), qtype)
        else:
            add(name, quants.quantize(w, qtype), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
