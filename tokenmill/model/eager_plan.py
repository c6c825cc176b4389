"""Eager CPU steps without module dispatch: each decoder layer resolved once into a closure.

A small model's decode step on the CPU is short (SmolLM2-135M at batch 1: ~4.5 ms of kernels per
token), and the module path spends ~1.7 ms more per token in Python around those kernels:
`nn.Module.__call__` and attribute lookups on eight modules per layer, and checks that cannot
change between steps (which kernel a layer was packed for, whether a norm's dtype suits the C++
op, which attention kernel a KV pool takes). `EagerPlan` makes those choices once, after
loading, and a step then calls the same ops in the same order on the same tensors: the values
are those of the modules, bit for bit (tests/test_eager_plan.py).

Steps whose every token is a decode attend through the C++ decode kernel directly; steps with
prefill chunks or draft verification (speculative decoding) go through `paged_attention` and
`write_kv`, as the modules do. Where every projection is a packed int4 layer of the CPU layout
without padding rows or bias, and activations and KV pools are bfloat16 (GGUF Q4 models such as
the default), decode-only steps run the whole loop in C++ (kernels/csrc/decode_layers.cpp: the
same ops, called without Python; ~0.8 ms less per token for SmolLM2).

The model runner runs it for every eager step on the CPU with the C++ kernels; `--compile`
removes this overhead by itself (its compiled groups serve decode-only steps), and CUDA graphs
do on GPUs. Layers it cannot resolve (q/k/v or gate/up left unmerged) leave the model on the
module path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.attention.paged import AttentionMetadata, paged_attention, write_kv
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.model.layers import RMSNorm
from tokenmill.model.llama import DecoderLayer, LlamaForCausalLM
from tokenmill.quant.base import ACT_DTYPE, QuantLinear
from tokenmill.quant.int4 import Q8_LAYOUT, Int4Linear
from tokenmill.quant.kv import QuantizedKVPool

Tensor = torch.Tensor
Linear = Callable[[Tensor], Tensor]


class EagerPlan:
    """Callable as a layer group of the model's forward: plan(x, cos_sin, kv_caches, meta) runs
    every decoder layer of a step. `build` returns None where it does not apply."""

    def __init__(self, layers: list[Callable], modules: list[DecoderLayer], dtype: torch.dtype,
                 fused: Callable | None = None) -> None:
        self.layers = layers
        self.modules = modules
        self.dtype = dtype  # the activations it was resolved for
        self.fused = fused  # every layer in one C++ call, where they qualify (_fused_int4)

    @classmethod
    def build(cls, model: LlamaForCausalLM, kv_caches: list[tuple[Tensor, Tensor]]) -> EagerPlan | None:
        layers = list(model.model.layers)
        if not layers or not cpu_kernels.available() or next(model.parameters()).device.type != "cpu":
            return None
        if any(not hasattr(layer.self_attn, "qkv_proj") or not hasattr(layer.mlp, "gate_up_proj") for layer in layers):
            return None
        dtype = layers[0].input_layernorm.weight.dtype
        return cls([_layer(layer, kv, dtype) for layer, kv in zip(layers, kv_caches)], layers, dtype,
                   _fused_int4(layers, kv_caches, dtype))

    def __call__(self, x: Tensor, cos_sin: tuple[Tensor, Tensor], kv_caches, meta: AttentionMetadata) -> Tensor:
        if x.dtype != self.dtype:  # not what it was resolved for: the modules decide everything
            for layer, kv_cache in zip(self.modules, kv_caches):
                x = layer(x, cos_sin, kv_cache, meta)
            return x
        cos, sin = cos_sin
        if self.fused is not None and not meta.prefills:
            return self.fused(x, cos, sin, meta)
        for layer in self.layers:
            x = layer(x, cos, sin, meta)
        return x


def _layer(layer: DecoderLayer, kv_cache: tuple[Tensor, Tensor], dtype: torch.dtype) -> Callable:
    """DecoderLayer.forward (with Attention's merged-qkv branch and GatedMLP's merged gate/up
    branch) as one closure over this layer's tensors and kernels."""
    attn, mlp = layer.self_attn, layer.mlp
    norm1, norm2 = _norm(layer.input_layernorm, dtype), _norm(layer.post_attention_layernorm, dtype)
    qkv_proj, o_proj = _linear(attn.qkv_proj, dtype), _linear(attn.o_proj, dtype)
    gate_up_proj, down_proj = _linear(mlp.gate_up_proj, dtype), _linear(mlp.down_proj, dtype)
    h, hkv, d, scale = attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale
    qk_size = attn.q_size + attn.kv_size
    inter = mlp.gate_up_proj.out_features // 2
    k_cache, v_cache = kv_cache
    reduce = (lambda y: y) if attn.tp is None else attn.tp.all_reduce
    rope = cpu_kernels.rope
    # a plain pool of the activations' dtype: the C++ decode kernel paged_attention would pick,
    # and K/V stored without a cast; any other pool goes through the generic functions
    plain = not isinstance(k_cache, QuantizedKVPool) and k_cache.dtype == dtype
    decode = torch.ops.tokenmill.paged_decode_attention
    k_rows = k_cache.view(-1, hkv, d) if plain else None
    v_rows = v_cache.view(-1, hkv, d) if plain else None

    def forward(x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata) -> Tensor:
        t = x.shape[0]
        qkv = qkv_proj(norm1(x))  # [T, (H + 2 Hkv) D]
        q, k = rope(qkv[:, :qk_size].view(t, -1, d), cos, sin).split([h, hkv], dim=1)
        v = qkv[:, qk_size:].view(t, hkv, d)
        if plain and not meta.prefills:  # all decodes: paged_attention's first branch, without its checks
            k_rows.index_copy_(0, meta.slot_mapping, k)
            v_rows.index_copy_(0, meta.slot_mapping, v)
            o = decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens, scale)
        else:
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            o = paged_attention(q, k_cache, v_cache, meta, scale, k, v)
        x = x + reduce(o_proj(o.reshape(t, h * d)))
        gate_up = gate_up_proj(norm2(x))
        return x + reduce(down_proj(F.silu(gate_up[:, :inter]) * gate_up[:, inter:]))

    return forward


def _fused_int4(layers: list[DecoderLayer], kv_caches: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Callable | None:
    """All layers as one call of tokenmill::decode_layers_int4, where they qualify: bf16
    activations, norms and plain KV pools, no tensor parallelism, and every projection a
    `_whole_int4` layer, all of one group size and one kernel (the C++ loop takes each output
    whole)."""
    if dtype != ACT_DTYPE or not hasattr(torch.ops.tokenmill, "decode_layers_int4"):
        return None
    norms, packed, scales_zeros, groups, tiles = [], [], [], set(), set()
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.tp is not None:
            return None
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != dtype:
                return None
            norms.append(norm.weight)
        for mod in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if not _whole_int4(mod):
                return None
            packed.append(mod.packed)
            scales_zeros.append(mod.scales_zeros)
            groups.add(mod.group)
            tiles.add(mod.cpu_tile)
    if len(groups) != 1 or len(tiles) != 1 or any(isinstance(k, QuantizedKVPool) or k.dtype != dtype for k, _ in kv_caches):
        return None
    k_caches, v_caches = [k for k, _ in kv_caches], [v for _, v in kv_caches]
    attn, mlp = layers[0].self_attn, layers[0].mlp
    args = (groups.pop(), tiles.pop(), attn.num_heads, attn.num_kv_heads, attn.head_dim, mlp.gate_up_proj.out_features // 2,
            layers[0].input_layernorm.eps, attn.scale)
    op = torch.ops.tokenmill.decode_layers_int4

    def fused(x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata) -> Tensor:
        return op(x, norms, packed, scales_zeros, k_caches, v_caches, cos, sin, meta.slot_mapping,
                  meta.decode_block_tables, meta.decode_ctx_lens, *args)

    return fused


def _whole_int4(mod: nn.Module) -> bool:
    """An int4 layer of the CPU layout whose kernel output is its output as is: no padding rows
    to drop, no bias to add."""
    return (isinstance(mod, Int4Linear) and mod.kernel == "cpu" and mod.bias is None
            and mod.padded_rows == mod.out_features)


def _norm(norm: RMSNorm, dtype: torch.dtype) -> Linear:
    """RMSNorm.forward for 2-D activations of `dtype`."""
    if norm.weight.dtype != dtype:  # the module's torch path
        return norm.forward
    weight, eps, op = norm.weight, norm.eps, torch.ops.tokenmill.rms_norm
    return lambda x: op(x, weight, eps)


def _linear(mod: nn.Module, dtype: torch.dtype) -> Linear:
    """The module's forward for 2-D activations of `dtype`: a packed int4 CPU layer or a float
    nn.Linear as one op over tensors read once; other packed layers through their forward."""
    if isinstance(mod, Int4Linear) and mod.kernel == "cpu" and dtype == ACT_DTYPE:
        packed, group, scales_zeros, n, bias = mod.packed, mod.group, mod.scales_zeros, mod.out_features, mod.bias
        tile = mod.cpu_tile
        if tile == Q8_LAYOUT:
            op = torch.ops.tokenmill.int4_q8_mm
        elif tile:
            own = torch.ops.tokenmill.int4_mm
            op = lambda x, packed, group, scales_zeros: own(x, packed, group, scales_zeros, tile)  # noqa: E731
        else:
            op = torch.ops.aten._weight_int4pack_mm_for_cpu
        if _whole_int4(mod):
            return lambda x: op(x.contiguous(), packed, group, scales_zeros)

        def int4(x: Tensor) -> Tensor:  # QuantLinear.forward: padding rows dropped, bias added
            y = op(x.contiguous(), packed, group, scales_zeros)[:, :n]
            return y if bias is None else y + bias

        return int4
    if isinstance(mod, QuantLinear):
        return mod.forward
    if type(mod) is nn.Linear:
        weight, bias = mod.weight, mod.bias
        return lambda x: F.linear(x, weight, bias)
    return mod.__call__
