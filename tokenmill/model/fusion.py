"""Merge the linear layers that read the same input into one: q/k/v -> qkv_proj, gate/up -> gate_up_proj.

A decoder layer of a small model spends more time launching matmuls than streaming weights
(SmolLM2-135M at batch 1: seven ~11 us int4 kernels per layer, each reading 50-500 KB).
Merging concatenates the weights along the output dimension, so one kernel reads them all:

    x [T, hidden] --qkv_proj--> [T, (H + 2 Hkv) D] --split--> q [T, H D], k [T, Hkv D], v [T, Hkv D]
    x [T, hidden] --gate_up_proj--> [T, 2 F] --chunk--> gate [T, F], up [T, F]

Runs after loading (and after tensor-parallel sharding: each rank merges its own slices), on
whatever the layers are: float nn.Linear, or packed int4 (CPU layout) / int8 modules, whose
codes and scales concatenate exactly. Layers of different kinds (a Q4_K q next to a Q6_K v in a
GGUF file) stay separate; the model code reads whichever it has. Each output row is computed
from its own weight row as before, so merging changes no value beyond GEMM blocking order.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.quant.base import QuantLinear
from tokenmill.quant.int4 import Int4Linear
from tokenmill.quant.int8 import Int8Linear


def _bias(mods: list[nn.Module]) -> torch.Tensor | None:
    biases = [m.bias for m in mods]
    if all(b is None for b in biases):
        return None
    ref = next(b for b in biases if b is not None)  # zeros where one has none, beside the others
    return torch.cat([b.data if b is not None else torch.zeros(m.out_features, dtype=ref.dtype, device=ref.device)
                      for b, m in zip(biases, mods)])


def merge_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing cat([m(x) for m in mods], -1), or None where they cannot merge."""
    kind = type(mods[0])
    if any(type(m) is not kind or m.in_features != mods[0].in_features for m in mods):
        return None
    bias = _bias(mods)
    if kind is nn.Linear:
        w = torch.cat([m.weight.data for m in mods])  # [sum N, K]
        merged = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        merged.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            merged.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)
        return merged
    if kind is Int4Linear and all(m.fusable for m in mods) and len({m.group for m in mods}) == 1:
        if Int4Linear.can_concat_packed(mods):  # whole packed row blocks: no unpacking and repacking
            return Int4Linear.concat_packed(mods, bias)
        sz = [m.scale_rows()[:, : m.out_features].transpose(0, 1).float() for m in mods]  # [N, K/g, 2] each
        sz = torch.cat(sz)
        return Int4Linear(torch.cat([m.codes() for m in mods]), sz[..., 0], sz[..., 1], mods[0].group, bias)
    if kind is Int8Linear:
        k = mods[0].in_features
        return Int8Linear(torch.cat([m.qweight[:, :k] for m in mods]), torch.cat([m.scale for m in mods]).float(),
                          bias)
    return None


def fuse_projections(model: nn.Module) -> int:
    """Merge every layer's q/k/v and gate/up projections in place; returns how many merged."""
    merged = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            attn.qkv_proj = qkv
            del attn.q_proj, attn.k_proj, attn.v_proj
            merged += 1
        gate_up = merge_linears([mlp.gate_proj, mlp.up_proj])
        if gate_up is not None:
            mlp.gate_up_proj = gate_up
            del mlp.gate_proj, mlp.up_proj
            merged += 1
    return merged


def unfused_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A float model's state dict under the Hugging Face names (merged weights split again)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if ".qkv_proj." in name:
            attn = model.get_submodule(name.split(".qkv_proj.")[0])
            for part, piece in zip("qkv", t.split([attn.q_size, attn.kv_size, attn.kv_size])):
                out[name.replace(".qkv_proj.", f".{part}_proj.")] = piece
        elif ".gate_up_proj." in name:
            for part, piece in zip(("gate", "up"), t.chunk(2)):
                out[name.replace(".gate_up_proj.", f".{part}_proj.")] = piece
        else:
            out[name] = t
    return out


__all__ = ["QuantLinear", "fuse_projections", "merge_linears", "unfused_state_dict"]
