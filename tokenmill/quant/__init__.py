"""Weight quantization as a module swap: nn.Linear -> a QuantLinear whose weight stays packed.

    scheme  what runs                                               file
    none    float weights in the model dtype (GGUF blocks dequantized at load)
    gguf    GGUF Q4_0/Q4_1/Q4_K blocks as int4pack, other types int8  gguf.py
    int8    per-output-channel symmetric int8                        int8.py
    int4    group-wise (32/64/128) asymmetric int4; LM head int8      int4.py
    fp8     e4m3 with per-channel scales (native on sm89+)            fp8.py

`--quantization auto` (the default) is `gguf` for a GGUF file holding quantized tensors and
`none` otherwise. The LM head stays int8 under int4 (as llama.cpp's 4-bit files keep it at 6-8
bits: it is the most sensitive matrix), and a tied embedding shares the head's packed table.
The KV-cache counterpart is kv.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tokenmill.config import ConfigError, EngineConfig
from tokenmill.quant.base import QuantEmbedding, QuantLinear
from tokenmill.quant.fp8 import Fp8Linear
from tokenmill.quant.gguf import FLOAT_TYPES, GGUFWeight, gguf_linear
from tokenmill.quant.int4 import GROUP_SIZES, Int4Linear, int4pack_available
from tokenmill.quant.int8 import Int8Linear

QUANTIZATIONS = EngineConfig.QUANTIZATIONS  # what the user may ask for
FROM_FLOAT = ("int8", "int4", "fp8")  # schemes that quantize float weights at load

__all__ = [
    "FROM_FLOAT",
    "GROUP_SIZES",
    "QUANTIZATIONS",
    "GGUFWeight",
    "QuantEmbedding",
    "QuantLinear",
    "check_device",
    "quantize_model",
    "resolve_quantization",
]


def gguf_has_quantized_tensors(path: Path) -> bool:
    from tokenmill.loader.gguf_loader import open_gguf  # checks the magic, one-line errors

    return any(t.tensor_type.name not in FLOAT_TYPES and len(t.shape) == 2 for t in open_gguf(path).tensors)


def resolve_quantization(requested: str, model_path: Path) -> str:
    """The scheme that runs: none | gguf | int8 | int4 | fp8."""
    if requested not in QUANTIZATIONS:
        raise ConfigError(f"quantization={requested!r}: accepted {', '.join(QUANTIZATIONS)}")
    if requested != "auto":
        return requested
    if model_path.is_file() and gguf_has_quantized_tensors(model_path):
        return "gguf"
    return "none"


def check_device(scheme: str, device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """Raise ConfigError when `device` cannot run `scheme`. `capability` overrides the CUDA
    compute capability (for tests)."""
    if scheme == "none":
        return
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"quantization {scheme} runs on cpu or cuda, not {device.type}; use --quantization none")
    if device.type == "cuda":
        cap = capability or torch.cuda.get_device_capability(device)
        if scheme in ("int4", "gguf") and cap < (8, 0):
            raise ConfigError(f"quantization {scheme} needs the int4 tensor-core kernel (CUDA compute capability "
                              f">= 8.0); this device is {cap[0]}.{cap[1]}; use int8, fp8 or none")
    elif scheme in ("int4", "gguf") and not int4pack_available(device):
        raise ConfigError(f"quantization {scheme}: this torch build lacks the CPU int4 kernel "
                          "aten._weight_int4pack_mm_for_cpu; upgrade torch, or use int8 or none")
    if scheme == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise ConfigError("quantization fp8 needs torch.float8_e4m3fn (torch >= 2.1)")


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _from_float(scheme: str, w: torch.Tensor, group_size: int, bias, head: bool) -> QuantLinear:
    if scheme == "fp8":
        return Fp8Linear.from_float(w, bias)
    if scheme == "int4" and not head:
        return Int4Linear.from_float(w, group_size, bias)
    return Int8Linear.from_float(w, bias)


def quantize_model(model: nn.Module, scheme: str, dtype: torch.dtype, group_size: int = 32,
                   packed: dict[str, GGUFWeight] | None = None) -> None:
    """Swap the model's linear layers (and its embedding) for packed modules, in place.

    scheme gguf: every weight named in `packed` (raw GGUF blocks) becomes its packed module;
    float weights stay nn.Linear. int8/int4/fp8: every nn.Linear is quantized from its float
    weight. The embedding becomes a QuantEmbedding: the head's table when tied, else its own
    int8 table. The caller ties nothing afterwards; float parameters keep their dtype."""
    if scheme not in ("gguf", *FROM_FLOAT):
        raise ConfigError(f"quantize_model: scheme {scheme!r}: accepted gguf, {', '.join(FROM_FLOAT)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group size {group_size}: accepted {', '.join(map(str, GROUP_SIZES))}")
    packed = packed or {}
    tied = model.config.tie_word_embeddings
    embed_name = "model.embed_tokens"
    embed_w = packed.get(f"{embed_name}.weight", model.model.embed_tokens.weight)
    device = model.model.norm.weight.device
    if tied and not isinstance(embed_w, GGUFWeight):
        model.tie_weights()  # the head reads the float embedding (and is quantized from it below)
    for name, lin in _linears(model):
        head = name == "lm_head"
        source = embed_w if head and tied else packed.get(f"{name}.weight", lin.weight)
        bias = None if lin.bias is None else lin.bias.data
        if isinstance(source, GGUFWeight):
            new = gguf_linear(source, device, bias, need_rows=head and tied)
        elif scheme == "gguf":
            continue  # a float tensor in a quantized file stays float
        else:
            try:
                new = _from_float(scheme, source.data, group_size, bias, head)
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
        _set(model, name, new)
        if head and tied:
            model.model.embed_tokens = QuantEmbedding(new, dtype)
    if not tied:
        if isinstance(embed_w, GGUFWeight):
            table = gguf_linear(embed_w, device, need_rows=True)
        elif scheme != "gguf":
            table = Int8Linear.from_float(embed_w.data)
        else:
            return
        model.model.embed_tokens = QuantEmbedding(table, dtype)
