"""tokenmill's C++ kernels for the CPU, compiled on this machine on first use.

    csrc/decode_attention.cpp   tokenmill::paged_decode_attention(_quantized) (attention/paged.py's
                                decode path, plain and quantized KV pools)
    csrc/layer_ops.cpp          tokenmill::rms_norm, tokenmill::rope (model/layers.py, eager steps)
    csrc/decode_layers.cpp      tokenmill::decode_layers_int4 (model/eager_plan.py: every layer of
                                an int4 decode step in one call)
    csrc/int4_mm.cpp            tokenmill::int4_mm, tokenmill::int8_mm (quant/int4.py, int8.py:
    csrc/int8_mm.cpp            packed weights x bf16 for CPUs without AVX-512, where torch's
                                kernels convert bf16 in software)
    csrc/int4_q8_mm.cpp         tokenmill::int4_q8_mm (quant/int4.py, opt-in: int4 weights x
                                int8-quantized activations, AVX2 integer dot products)

Built with torch's extension builder (g++ and ninja; `-O3 -march=native`, so the code is tuned to
the CPU it runs on; one build per kind of CPU) into torch's extension cache (~10 s once;
TORCH_EXTENSIONS_DIR moves it) and loaded as torch ops, which torch.compile graphs call like any
aten op (a fake implementation below gives their output shapes). Where no compiler is found, or
TOKENMILL_CPU_KERNELS=0, the torch code runs instead; the engine logs which.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger("tokenmill")


def _isa_tag() -> str:
    """Short hash of this CPU's instruction-set flags: `-march=native` code built on one CPU may
    not run on another, so a shared extension directory keeps one build per kind of CPU."""
    flags = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


NAME = f"tokenmill_cpu_kernels_{_isa_tag()}"
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("decode_attention.cpp", "layer_ops.cpp",
                                                                   "decode_layers.cpp", "int4_mm.cpp",
                                                                   "int8_mm.cpp", "int4_q8_mm.cpp")]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
ENV_SWITCH = "TOKENMILL_CPU_KERNELS"  # "0": never build or use them

_loaded: bool | None = None  # None: not tried yet


def load() -> bool:
    """Build (first time on this machine) and load the kernels; whether they can be used.
    Never raises: a failed build is logged once and the torch reference is used."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = False
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("C++ CPU kernels off (%s=0): attention, norms and RoPE run the torch code", ENV_SWITCH)
        return False
    try:
        from torch.utils import cpp_extension

        _put_pip_ninja_on_path()
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            return _unavailable(f"no C++ compiler {compiler!r}")
        if not cpp_extension.is_ninja_available():
            return _unavailable("no ninja (pip install ninja)")
        t0 = time.perf_counter()
        build_dir = Path(cpp_extension._get_build_directory(NAME, verbose=False))
        if not any(build_dir.glob("*.so")):
            log.info("building tokenmill's C++ CPU kernels (first use on this machine, ~10 s) in %s", build_dir)
        cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                           is_python_module=False, verbose=False)
        _register_fakes()
        log.debug("C++ CPU kernels loaded in %.1f s", time.perf_counter() - t0)
        _loaded = True
    except Exception as e:  # noqa: BLE001 -- any failed build: run the reference instead
        return _unavailable(str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__)
    return True


def _unavailable(why: str) -> bool:
    log.warning("C++ CPU kernels unavailable (%s); attention, norms and RoPE run the torch code", why)
    return False


def _put_pip_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; pip puts the one tokenmill depends on next to the
    interpreter's scripts, which need not be on PATH (a --user install, an unactivated venv)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join(filter(None, [ninja.BIN_DIR, os.environ.get("PATH")]))


def available() -> bool:
    """Whether the kernels are loaded (cheap; does not build)."""
    return bool(_loaded)


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing, which never runs the C++ code (once: load()
    runs once per process)."""

    @torch.library.register_fake("tokenmill::paged_decode_attention")
    def _(q, k_cache, v_cache, block_tables, ctx_lens, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("tokenmill::paged_decode_attention_quantized")
    def _(q, k_codes, k_scale, v_codes, v_scale, block_tables, ctx_lens, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("tokenmill::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("tokenmill::rope")
    def _(x, cos, sin):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("tokenmill::int4_mm")
    def _(x, packed, group, scales_zeros, tile, scalar=False):  # Np: packed holds Np x K nibbles
        return x.new_empty((x.shape[0], packed.numel() * 2 // x.shape[1]))

    @torch.library.register_fake("tokenmill::int4_q8_mm")
    def _(x, packed, group, scales_zeros, scalar=False):
        return x.new_empty((x.shape[0], packed.shape[0] * 8))

    @torch.library.register_fake("tokenmill::int8_mm")
    def _(x, q, scale, scalar=False):
        return x.new_empty((x.shape[0], q.shape[0]))

    @torch.library.register_fake("tokenmill::fp8_mm")
    def _(x, q, scale, scalar=False):
        return x.new_empty((x.shape[0], q.shape[0]))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D]; caches [blocks, block_size, Hkv, D] (plain tensors, q's dtype); block_tables
    [B, W] and ctx_lens [B] int64. Returns [B, H, D]; the same math as paged._decode_attention."""
    return torch.ops.tokenmill.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale)


def paged_decode_attention_quantized(q: torch.Tensor, k_pool, v_pool, block_tables: torch.Tensor,
                                     ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """paged_decode_attention over QuantizedKVPools (quant/kv.py): each row read as codes * scale."""
    return torch.ops.tokenmill.paged_decode_attention_quantized(q, k_pool.data, k_pool.scale, v_pool.data,
                                                                v_pool.scale, block_tables, ctx_lens, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D], weight [D] of x's dtype: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype), in float32."""
    return torch.ops.tokenmill.rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, N, D] rotated (rotate-half) by cos/sin [T, 1, D/2] float32; contiguous output."""
    return torch.ops.tokenmill.rope(x, cos, sin)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_zeros: torch.Tensor, tile: int,
            scalar: bool = False) -> torch.Tensor:
    """x [M, K] bf16 times a packed int4 weight of torch's CPU layout with `tile`-row tiles
    (quant/int4.py; scales tiled [Np/tile, K/g, tile, 2] or torch's [K/g, Np, 2]), [M, Np] bf16;
    float32 arithmetic, the same for every M (csrc/int4_mm.cpp).
    `scalar` runs the plain C++ form instead of the AVX2 one (same bits; tests)."""
    return torch.ops.tokenmill.int4_mm(x, packed, group, scales_zeros, tile, scalar)


def int4_q8_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_zeros: torch.Tensor,
               scalar: bool = False) -> torch.Tensor:
    """x [M, K] bf16 quantized to int8 per row and 32 columns, times a packed int4 weight of the
    int8-activation layout (quant/int4.py: pack_q8; scales [Np/8, K/g, 8, 2] or [K/g, Np, 2]),
    [M, Np] bf16; integer dot products, the same
    for every M (csrc/int4_q8_mm.cpp). `scalar`: the plain C++ form (same bits)."""
    return torch.ops.tokenmill.int4_q8_mm(x, packed, group, scales_zeros, scalar)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scalar: bool = False) -> torch.Tensor:
    """x [M, Kp] bf16 times int8 q [N, Kp] with one bf16 scale per row, [M, N] bf16; float32
    arithmetic, the same for every M (csrc/int8_mm.cpp). `scalar`: the plain C++ form (same bits)."""
    return torch.ops.tokenmill.int8_mm(x, q, scale, scalar)


def fp8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scalar: bool = False) -> torch.Tensor:
    """x [M, K] bf16 times float8_e4m3fn q [N, K] (K a multiple of 16) with one float32 scale per
    row, [M, N] bf16: int8_mm's arithmetic over exactly widened e4m3 codes (csrc/int8_mm.cpp)."""
    return torch.ops.tokenmill.fp8_mm(x, q, scale, scalar)

