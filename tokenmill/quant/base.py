"""QuantLinear: what a float nn.Linear is swapped for. Its weight stays packed in memory.

A subclass stores its packed weight as buffers and implements two things:

    matmul(x)     x [M, K] bfloat16 -> y [M, N] bfloat16, reading the packed weight
    dequantize()  the weight it represents, float32 [N, K]: the reference the tests check against

`forward` takes activations of any float dtype, runs the kernel in bfloat16 (the packed CPU
kernels are fast only with bfloat16 activations) and returns the input's dtype, so a float32
model runs with packed linears too. Biases stay float.

Quantization is a module swap: the model code is unchanged. The model reads its LM head as
`F.linear(h, lm_head.weight)`, so `.weight` of a QuantLinear is a `PackedWeight`: a tensor that
holds no data and routes `F.linear` back to the module's kernel; any other use of it raises.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ConfigError

ACT_DTYPE = torch.bfloat16  # activations of every packed kernel


class PackedWeight(torch.Tensor):
    """Stands for a QuantLinear's weight: metadata ([N, K], dtype) only, no storage.
    `F.linear(x, w, b)` runs the owning module; every other op raises TypeError."""

    @staticmethod
    def __new__(cls, owner: QuantLinear, device: torch.device):
        t = torch.Tensor._make_wrapper_subclass(
            cls, (owner.out_features, owner.in_features), dtype=ACT_DTYPE, device=device, requires_grad=False
        )
        t.owner = owner
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = w.owner(x)
            return y if bias is None else y + bias
        with torch._C.DisableTorchFunctionSubclass():  # shape, dtype, device... are metadata
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"a packed weight supports only F.linear, not {func}; call dequantize() on its module")

    def __repr__(self) -> str:
        return f"PackedWeight({type(self.owner).__name__}, shape={tuple(self.shape)})"


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W packed. Subclasses register their packed tensors as buffers."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [M, K] bf16 -> [M, N] bf16
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:  # float32 [N, K]
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows W[ids] (float32): an embedding lookup into a tied table."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve as an embedding table")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # batch-1 decode runs ~200 of these per token: skip the no-op reshapes and casts
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self.matmul(x2 if x2.dtype == ACT_DTYPE else x2.to(ACT_DTYPE))  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> PackedWeight:
        return PackedWeight(self, next(self.buffers()).device)

    def weight_bytes(self) -> int:
        """Bytes of the packed weight and its scales (what one matmul reads), bias excluded."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """An embedding lookup served by a QuantLinear's rows: the tied LM head's table, or an
    untied table stored the same way. `table` is that module (shared, not copied)."""

    def __init__(self, table: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids).to(self.dtype)  # [T, hidden]


CPU_PACKED_KERNELS = ("auto", "tokenmill", "torch")


@functools.cache
def cpu_packed_kernel() -> str:
    """tokenmill | torch: the kernels packed int4 and int8 layers run on the CPU (and fp8 ones:
    tokenmill's, or torch's emulation). TOKENMILL_CPU_PACKED=auto (default) takes tokenmill's
    (kernels/csrc/int4_mm.cpp, int8_mm.cpp) on AVX2 CPUs without AVX-512, where torch's convert
    bf16 in software (on two Zen 3 cores, batch 1: int4 ~2x, the int8 LM head ~2.5x the bytes per
    second; docs/quantization.md), and where the C++ kernels are built; torch's elsewhere."""
    choice = os.environ.get("TOKENMILL_CPU_PACKED", "auto")
    if choice not in CPU_PACKED_KERNELS:
        raise ConfigError(f"TOKENMILL_CPU_PACKED={choice!r}: accepted {', '.join(CPU_PACKED_KERNELS)}")
    if choice == "torch":
        return "torch"
    from tokenmill.kernels import cpu as cpu_kernels

    if not cpu_kernels.load():
        if choice == "tokenmill":
            raise ConfigError("TOKENMILL_CPU_PACKED=tokenmill needs the C++ CPU kernels, which are unavailable "
                              "(see the log)")
        return "torch"
    if choice == "tokenmill" or torch.backends.cpu.get_cpu_capability() == "AVX2":
        return "tokenmill"
    return "torch"  # AVX-512 (torch's kernels are fast there), or a CPU its AVX2 code does not build for


CPU_INT4_ACTIVATIONS = ("bf16", "int8")


@functools.cache
def cpu_int4_activations() -> str:
    """bf16 | int8: what int4 CPU layers multiply their weights with. TOKENMILL_CPU_INT4_ACTIVATIONS=
    int8 (opt-in) quantizes each activation row to int8 per 32 columns, as llama.cpp does, and runs
    tokenmill's integer-dot-product kernel (kernels/csrc/int4_q8_mm.cpp; on AVX2 1.4-2x the bf16
    kernel's speed from 2 tokens per step up, docs/quantization.md), at the cost of that rounding; bf16 (default) keeps the
    activations as they are."""
    choice = os.environ.get("TOKENMILL_CPU_INT4_ACTIVATIONS", "bf16")
    if choice not in CPU_INT4_ACTIVATIONS:
        raise ConfigError(f"TOKENMILL_CPU_INT4_ACTIVATIONS={choice!r}: accepted {', '.join(CPU_INT4_ACTIVATIONS)}")
    if choice == "int8":
        from tokenmill.kernels import cpu as cpu_kernels

        if not cpu_kernels.load():
            raise ConfigError("TOKENMILL_CPU_INT4_ACTIVATIONS=int8 needs the C++ CPU kernels, which are unavailable "
                              "(see the log)")
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            raise ConfigError("TOKENMILL_CPU_INT4_ACTIVATIONS=int8 needs an x86 CPU with AVX2 (this one: "
                              f"{torch.backends.cpu.get_cpu_capability()})")
    return choice


def dense_min_tokens(device: torch.device) -> int:
    """M from which an int8 layer widens its weight to bf16 per call and runs one dense GEMM
    instead of the packed kernel. Measured on this CPU class (docs/quantization.md): the packed
    kernels' time grows ~linearly in M while a bf16 GEMM's barely does, but widening costs a
    pass over the weight, so the dense path wins only from M ~ 256. For int4 widening costs more
    than the GEMM saves at every M we measured (up to 512): int4 always runs packed."""
    return 256 if device.type == "cpu" else 1 << 30


def check_k_multiple(name: str, k: int, multiple: int, what: str) -> None:
    from tokenmill.config import ConfigError

    if k % multiple:
        raise ConfigError(f"{name}: in_features={k} is not a multiple of {what} {multiple}")
