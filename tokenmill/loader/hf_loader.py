"""Load a llama-family model from a Hugging Face directory (config.json + *.safetensors)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from tokenmill.config import ConfigError, ModelConfig
from tokenmill.loader.resolve import ModelLoadError

_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_ROPE_TYPES = ("default", "linear", "llama3")


def _rope(c: dict, path: Path) -> tuple[float, dict | None]:
    """(theta, scaling) from config.json: transformers >= 5 writes both in "rope_parameters",
    earlier versions write "rope_theta" and "rope_scaling" at the top level."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ModelLoadError(
            f"{path.name}: unsupported rope scaling {kind!r}; supported: {', '.join(_ROPE_TYPES)}"
        )
    return theta, None if kind == "default" else params


def hf_model_config(path: Path) -> ModelConfig:
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path / 'config.json'} is unreadable: {e}") from None
    model_type = c.get("model_type")
    if model_type not in _ARCHS:
        raise ModelLoadError(f"{path.name}: unsupported model_type {model_type!r}; supported: {', '.join(_ARCHS)}")
    try:
        heads = c["num_attention_heads"]
        rope_theta, rope_scaling = _rope(c, path)
        return ModelConfig(
            arch=_ARCHS[model_type],
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or c.get("attention_bias", False),
        )
    except KeyError as e:
        raise ModelLoadError(f"{path / 'config.json'} lacks the key {e}") from None
    except ConfigError as e:
        raise ModelLoadError(f"{path / 'config.json'}: {e}") from None


def hf_state_dict(path: Path, dtype: torch.dtype, shard=None,
                  head_dim: int = 0) -> Iterator[tuple[str, torch.Tensor, int]]:
    """Yield (name, tensor in dtype, bytes read). shard (a TPShard): read only this
    tensor-parallel rank's slice of each split weight (safetensors reads just those bytes)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    cut = shard.slice_of(name, head_dim) if shard is not None else None
                    if cut is None:
                        t = f.get_tensor(name)
                    else:
                        dim, start, end = cut
                        part = f.get_slice(name)
                        t = part[start:end] if dim == 0 else part[:, start:end]
                    yield name, t.to(dtype), t.numel() * t.element_size()
        except Exception as e:
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(f"{file.name} is truncated or corrupt: {e}".splitlines()[0]) from None


def hf_num_tensors(path: Path) -> int:
    from safetensors import safe_open

    n = 0
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                n += len(list(f.keys()))
        except Exception as e:
            raise ModelLoadError(f"{file.name} is truncated or corrupt: {e}".splitlines()[0]) from None
    return n
