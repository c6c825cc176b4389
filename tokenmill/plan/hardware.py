"""One accelerator chip as the planner sees it: capacity, bandwidth, FLOP/s, links, power, price.

The numbers come from `hardware.yaml` (see `catalog.py`); this module only holds their shape and
checks them. Every figure is per chip; a deployment multiplies by its chip count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("gpu", "tpu", "neuron", "apple", "cpu", "sram")
DTYPES = ("bf16", "fp8", "int8", "fp4")


@dataclass(frozen=True)
class Reference:
    """A public document a number comes from."""

    key: str
    title: str
    url: str
    date: str


@dataclass(frozen=True)
class Price:
    """USD per chip-hour. basis: on-demand | amortised | estimate | measured."""

    usd_per_hour: float
    basis: str
    source: str
    confidence: str = "recalled"

    def __post_init__(self) -> None:
        if self.usd_per_hour < 0:
            raise ValueError(f"price must be >= 0, got {self.usd_per_hour}")


@dataclass(frozen=True)
class Hardware:
    """One chip. For kind == "sram" memory is the on-chip SRAM and its bandwidth.

    Invariants (checked): positive capacity and bandwidth, a bf16 rate, tp_domain >= 1.
    """

    id: str
    name: str
    kind: str
    family: str
    memory_gb: float
    memory_gbs: float
    tflops: dict[str, float]
    interconnect_gbs: float = 0.0
    interconnect_latency_us: float | None = None
    tp_domain: int = 1
    power_w: float | None = None
    price: Price | None = None
    sources: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    # Measured machines (`local`) carry their own per-layer dispatch overhead.
    layer_overhead_us: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.id}: kind {self.kind!r} not in {KINDS}")
        if self.memory_gb <= 0 or self.memory_gbs <= 0:
            raise ValueError(f"{self.id}: memory capacity and bandwidth must be > 0")
        if "bf16" not in self.tflops:
            raise ValueError(f"{self.id}: needs a bf16 rate (the dense 16-bit matmul peak)")
        unknown = set(self.tflops) - set(DTYPES)
        if unknown:
            raise ValueError(f"{self.id}: unknown dtypes {sorted(unknown)}; known: {DTYPES}")
        if self.tp_domain < 1:
            raise ValueError(f"{self.id}: tp_domain must be >= 1")

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.memory_gbs * 1e9

    @property
    def is_sram(self) -> bool:
        return self.kind == "sram"

    def flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype`, falling back to the bf16 rate where the chip has no
        faster path (an fp8 matmul on an A100 runs as bf16)."""
        return max(self.tflops.get(dtype, 0.0), self.tflops["bf16"]) * 1e12

    def best_dtype(self, weight_bits: float) -> str:
        """The matmul dtype a deployment with these weights would use by default.

        8-bit weights use the chip's fp8/int8 path where it has one (W8A8); 4-bit weights use fp4
        only where it exists (Blackwell), else weight-only dequant to bf16 (W4A16, as AWQ/GGUF do).
        """
        if weight_bits <= 4.0 and "fp4" in self.tflops:
            return "fp4"
        if 6.0 <= weight_bits < 12.0:
            for dtype in ("fp8", "int8"):
                if dtype in self.tflops:
                    return dtype
        return "bf16"
