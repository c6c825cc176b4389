"""Load a llama-family model from a GGUF v3 file (memory-mapped through the `gguf` package).

Quantized tensors are dequantized into the compute dtype here, or, with keep_packed, handed
on as raw blocks for tokenmill.quant to run packed. llama.cpp's converter permutes the rows
of Q and K so that RoPE rotates adjacent pairs; we undo that permutation so the model uses the
rotate-half layout of the Hugging Face checkpoints (as transformers does when it reads a GGUF).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tokenmill.config import ModelConfig
from tokenmill.loader.resolve import ModelLoadError
from tokenmill.quant.gguf import FLOAT_TYPES, GGUFWeight

# Types gguf-py can dequantize. Q8_K is left out: it is llama.cpp's intermediate for dot
# products, never a weight type, and gguf-py has no dequantizer for it.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_gguf(path: Path):
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path.name} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the gguf package raises various errors on truncated files
        raise ModelLoadError(f"{path.name} is truncated or corrupt: {type(e).__name__}: {e}".splitlines()[0]) from None
    version = reader.fields["GGUF.version"].contents()
    if version not in (2, 3):
        raise ModelLoadError(f"{path.name}: GGUF version {version} unsupported; supported: 2, 3")
    return reader


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_model_config(reader, path: Path) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"{path.name}: unsupported architecture {arch!r}; supported: llama (Llama 2/3, SmolLM2, Mistral), qwen2")
    a = lambda k, d=None: field(reader, f"{arch}.{k}", d)
    heads = a("attention.head_count")
    hidden = a("embedding_length")
    names = {t.name for t in reader.tensors}
    rope_scaling = None
    if a("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": a("rope.scaling.factor")}
    if "rope_freqs.weight" in names:  # llama3 scaling, stored as per-frequency divisors
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope_scaling = {"rope_type": "freq_factors", "factors": np.asarray(t.data, dtype=np.float32).tolist()}
    vocab = a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(a("feed_forward_length")),
        num_layers=int(a("block_count")),
        num_heads=int(heads),
        num_kv_heads=int(a("attention.head_count_kv", heads)),
        head_dim=int(a("attention.key_length", hidden // heads)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(a("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
    )


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, kind, suffix = parts[1], parts[2], parts[3]
        mapped = _LAYER_NAMES.get(kind)
        return None if mapped is None else f"model.layers.{layer}.{mapped}.{suffix}"
    mapped = _TOP_NAMES.get(parts[0])
    return None if mapped is None else f"{mapped}.{parts[-1]}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # inverse of llama.cpp's permute: rows (head, pair, half) -> (head, half, pair)
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy [rows, cols] (or [n] for vectors)."""
    from gguf import quants

    name = tensor.tensor_type.name
    if name not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"tensor {tensor.name} has type {name}, unsupported; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims fastest first
    if name == "F32":
        return np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    if name == "F16":
        return np.asarray(tensor.data).astype(np.float32).reshape(shape)
    return quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def _packed(t, cfg: ModelConfig) -> GGUFWeight:
    """A quantized matrix's raw blocks [rows, bytes per row]; un-permuting Q/K moves whole rows."""
    name = t.tensor_type.name
    if name not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"tensor {t.name} has type {name}, unsupported; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    raw = np.asarray(t.data)
    if cfg.arch == "llama":
        if t.name.endswith("attn_q.weight"):
            raw = _unpermute(raw, cfg.num_heads)
        elif t.name.endswith("attn_k.weight"):
            raw = _unpermute(raw, cfg.num_kv_heads)
    return GGUFWeight(raw=raw, type_name=name, shape=(int(t.shape[1]), int(t.shape[0])))


def gguf_state_dict(reader, cfg: ModelConfig, dtype: torch.dtype,
                    keep_packed: bool = False) -> Iterator[tuple[str, torch.Tensor | GGUFWeight, int]]:
    """Yield (hf name, tensor in dtype, bytes in file) for every weight the model uses.
    keep_packed: quantized matrices come as GGUFWeight (raw blocks, Q/K rows un-permuted)
    instead, for tokenmill.quant to run packed."""
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            continue
        if keep_packed and t.tensor_type.name not in FLOAT_TYPES and len(t.shape) == 2:
            yield hf, _packed(t, cfg), int(t.n_bytes)
            continue
        w = dequantize(t)
        if cfg.arch == "llama":
            if t.name.endswith("attn_q.weight"):
                w = _unpermute(w, cfg.num_heads)
            elif t.name.endswith("attn_k.weight"):
                w = _unpermute(w, cfg.num_kv_heads)
        if not w.flags.writeable or not w.flags.c_contiguous:  # a view of the read-only map
            w = np.array(w, dtype=np.float32, order="C")
        yield hf, torch.from_numpy(w).to(dtype), int(t.n_bytes)
