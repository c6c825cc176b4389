"""Triton where it is installed, for the Triton kernels (attention/triton_decode.py,
quant/triton_int4.py): one import, and whether a kernel can run on a device.

Triton's CPU interpreter is chosen when TRITON_INTERPRET=1 is set before the kernels are
defined (@triton.jit decides at decoration, i.e. when their module is imported); the tests run
the kernels that way on CPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # optional dependency: callers check available() and use the torch path
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of `device`."""
    return HAS_TRITON and (INTERPRET or torch.device(device).type == "cuda")
