"""How close a family of chips (with its usual software) gets to its datasheet peaks.

The factors are data (`efficiency.yaml`), fitted to the published measurements in
`validation.csv` whose `fitted` column is yes. Everything else in the planner is physics.
"""

from __future__ import annotations

from dataclasses import dataclass

BITS_CLASSES = (16, 8, 4)


def bits_class(weight_bits: float) -> int:
    """Map any bits-per-weight (4.5 for Q4_0, 8.5 for Q8_0, 4.89 for Q4_K_M) to 16, 8 or 4."""
    if weight_bits >= 12:
        return 16
    if weight_bits >= 6:
        return 8
    return 4


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of peak for one family of chips.

    bandwidth[b]   fraction of peak memory bandwidth reached while streaming b-bit weights in
                   decode (low-bit kernels pay for dequantisation; KV reads use the 16-bit entry)
    compute        fraction of dense peak FLOP/s reached by large matmuls (prefill, big batches)
    link           fraction of interconnect bandwidth reached by all-reduces
    collective_overhead_us  software cost of one all-reduce (kernel launch, synchronisation)
    expert_bandwidth  extra factor on bandwidth while streaming routed MoE expert weights
                   (gathers and small per-expert matmuls)
    step_overhead_us   fixed cost per decode step (sampling, scheduling, host round trip)
    layer_overhead_us  fixed cost per layer per step (kernel launches, synchronisation; on SRAM
                       machines the per-layer fabric/pipeline latency that dominates decode)
    memory_usable  fraction of capacity that may hold weights + KV cache
    """

    family: str
    bandwidth: dict[int, float]
    compute: float
    link: float = 0.7
    collective_overhead_us: float = 0.0
    expert_bandwidth: float = 1.0
    step_overhead_us: float = 0.0
    layer_overhead_us: float = 0.0
    memory_usable: float = 0.9
    fitted_on: tuple[str, ...] = ()
    fit_params: tuple[str, ...] = ()
    derived_from: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if set(self.bandwidth) != set(BITS_CLASSES):
            raise ValueError(f"{self.family}: bandwidth needs entries for {BITS_CLASSES}")
        fractions = (
            *self.bandwidth.values(),
            self.compute,
            self.link,
            self.memory_usable,
            self.expert_bandwidth,
        )
        for value in fractions:
            if not 0.0 < value <= 1.0:
                raise ValueError(
                    f"{self.family}: efficiency factors must be in (0, 1], got {value}"
                )
        if min(self.step_overhead_us, self.layer_overhead_us, self.collective_overhead_us) < 0:
            raise ValueError(f"{self.family}: overheads must be >= 0")

    def weight_bandwidth(self, weight_bits: float) -> float:
        return self.bandwidth[bits_class(weight_bits)]

    @property
    def kv_bandwidth(self) -> float:
        return self.bandwidth[16]
