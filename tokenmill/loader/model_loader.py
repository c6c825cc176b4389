"""load_model: a path (GGUF file or HF directory) -> an nn.Module on the device, with a progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from tokenmill.config import ModelConfig
from tokenmill.distributed.group import TPGroup
from tokenmill.distributed.shard import TPShard
from tokenmill.loader.resolve import ModelLoadError
from tokenmill.model.layers import RotaryEmbedding
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.quant.gguf import GGUFWeight


def read_model_config(path: Path, load_format: str = "auto") -> ModelConfig:
    """The architecture of the model at `path` from its header or config.json (no weights read)."""
    if load_format == "dummy":
        from tokenmill.loader.dummy import dummy_model_config

        return dummy_model_config(str(path))
    if path.is_dir():
        from tokenmill.loader.hf_loader import hf_model_config

        return hf_model_config(path)
    from tokenmill.loader.gguf_loader import gguf_model_config, open_gguf

    return gguf_model_config(open_gguf(path), path)


def _shard(cfg: ModelConfig, tp: TPGroup | None) -> TPShard | None:
    if tp is None:
        return None
    TPShard.check(cfg, tp.size)
    return TPShard.plan(cfg, tp.rank, tp.size)


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    file_bytes: int  # bytes of weights in the file (packed size for quantized GGUF)
    gguf_reader: object | None  # kept for the tokenizer, which reads the same file


def load_model(path: Path, dtype: torch.dtype, device: torch.device, show_progress: bool = True,
               quantization: str = "none", group_size: int = 32, tp: TPGroup | None = None,
               load_format: str = "auto") -> LoadedModel:
    """quantization: a resolved scheme (tokenmill.quant): none | gguf | int8 | int4 | fp8.
    gguf keeps the file's quantized matrices packed; int8/int4/fp8 quantize float weights
    (read in float32) at load. Everything not packed ends in `dtype`.
    tp: this process is one tensor-parallel rank; it reads and holds only its shard
    (file_bytes then counts the bytes it read).
    load_format dummy: random weights of the shape `path` names (loader/dummy.py)."""
    load_dtype = torch.float32 if quantization in ("int8", "int4", "fp8") else dtype
    if load_format == "dummy":
        from tokenmill.loader.dummy import dummy_model_config, dummy_state_dict

        cfg = dummy_model_config(str(path))
        shard = _shard(cfg, tp)
        tensors = None  # drawn below, in the shapes of the model built for this rank
        reader = None
    elif path.is_dir():
        from tokenmill.loader.hf_loader import hf_model_config, hf_num_tensors, hf_state_dict

        cfg = hf_model_config(path)
        shard = _shard(cfg, tp)
        total = hf_num_tensors(path)
        tensors = hf_state_dict(path, load_dtype, shard, cfg.head_dim)
        reader = None
    else:
        from tokenmill.loader.gguf_loader import gguf_model_config, gguf_state_dict, open_gguf

        reader = open_gguf(path)
        cfg = gguf_model_config(reader, path)
        shard = _shard(cfg, tp)
        total = len(reader.tensors)
        tensors = gguf_state_dict(reader, cfg, load_dtype, keep_packed=quantization == "gguf", shard=shard)

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, tp, shard)
    expected = {n for n, _ in model.named_parameters()}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if tensors is None:  # dummy weights
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in expected}
        total = len(shapes)
        tensors = dummy_state_dict(shapes, dtype, device, seed=1 + (tp.rank if tp else 0))
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, GGUFWeight] = {}  # quantized GGUF matrices, still raw blocks
    file_bytes = 0
    with Progress(
        TextColumn(f"loading {path.name}"), BarColumn(), TextColumn("{task.completed}/{task.total} tensors"),
        TimeRemainingColumn(), transient=True, disable=not show_progress,
    ) as progress:
        task = progress.add_task("load", total=total)
        for name, tensor, nbytes in tensors:
            progress.advance(task)
            if name not in expected:
                continue
            if isinstance(tensor, GGUFWeight):
                packed[name] = tensor
            else:
                state[name] = tensor.to(device)
            file_bytes += nbytes
    missing = expected - state.keys() - packed.keys()
    if missing:
        raise ModelLoadError(f"{path.name} lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")
    for name, param in model.named_parameters():
        got = state[name] if name in state else packed.get(name)
        if got is not None and tuple(got.shape) != tuple(param.shape):
            raise ModelLoadError(f"{path.name}: weight {name} has shape {tuple(got.shape)}, expected {tuple(param.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if quantization == "none":
        model.tie_weights()
    else:
        from tokenmill.quant import quantize_model

        quantize_model(model, quantization, dtype, group_size, packed)
        for p in model.parameters():  # float params read in float32 for quantizing end in dtype
            p.data = p.data.to(dtype)
    model.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling).to(device)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, config=cfg, file_bytes=file_bytes, gguf_reader=reader)
