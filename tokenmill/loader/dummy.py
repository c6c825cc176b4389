"""`--load-format dummy`: a model of the right shape with random weights, for speed and memory
measurements of models whose weights are not at hand (decode cost does not depend on the values).

The shape comes from a planner catalog id (`tokenmill plan`'s models, e.g. llama-3-8b), a
Hugging Face directory or config.json, or a GGUF file's header (no tensor is read). Weights are
drawn per tensor on the target device: norms 1, matrices N(0, 1/fan_in). With no tokenizer
beside the config, the default model's tokenizer is used (its ids are a subset of any llama
vocabulary we benchmark).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from tokenmill.config import ModelConfig
from tokenmill.loader.resolve import ModelLoadError


def dummy_model_config(ref: str) -> ModelConfig:
    from tokenmill.plan import catalog

    path = Path(ref)
    if path.is_dir() and (path / "config.json").is_file():
        from tokenmill.loader.hf_loader import hf_model_config

        return hf_model_config(path)
    if path.suffix == ".gguf" and path.is_file():
        from tokenmill.loader.gguf_loader import gguf_model_config, open_gguf

        return gguf_model_config(open_gguf(path), path)
    try:
        spec = catalog.model(ref)
    except ValueError as e:
        raise ModelLoadError(f"--load-format dummy: {e}".splitlines()[0]) from None
    if spec.experts > 1:
        raise ModelLoadError(f"--load-format dummy: {ref} is a mixture of experts; supported: dense llama-family")
    return ModelConfig(arch="llama", vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                       num_layers=spec.layers, num_heads=spec.heads, num_kv_heads=spec.kv_heads,
                       head_dim=spec.head_dim, max_position_embeddings=spec.context, tie_word_embeddings=spec.tied,
                       rope_theta=500000.0)


def dummy_state_dict(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                     seed: int = 0) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(name, random tensor, its bytes) for every parameter shape (this rank's, under tensor
    parallelism)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=dtype, device=device)
        else:
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(shape[1] ** -0.5).to(dtype)
        yield name, t, t.numel() * t.element_size()
