"""A deployment: which model, at what precision, on how many of which chip, split how, serving what.

Layout: chips = tp * pp * replicas. Tensor parallelism (tp) splits every weight matrix, so each
chip streams 1/tp of the weights per token and the group all-reduces twice per layer. Pipeline
parallelism (pp) gives each stage 1/pp of the layers: more memory, no more bandwidth per token.
Replicas are independent copies that share the batch. On SRAM machines the whole chip count acts
as one pipeline/tensor group (see perf.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenmill.plan.hardware import DTYPES, Hardware
from tokenmill.plan.model_spec import ModelSpec


def default_layout(hw: Hardware, chips: int) -> tuple[int, int]:
    """(tp, pp) for `chips` chips: all of them in one tensor-parallel group where the fast
    interconnect reaches (largest divisor of chips <= tp_domain), pipeline stages for the rest.
    Chips without a link to each other (Apple silicon) run as independent replicas."""
    if hw.is_sram:
        return chips, 1
    if hw.interconnect_gbs <= 0:  # no chip-to-chip link: independent replicas
        return 1, 1
    tp = max(d for d in range(1, min(chips, hw.tp_domain) + 1) if chips % d == 0)
    return tp, chips // tp


@dataclass(frozen=True)
class Deployment:
    """Inputs of one plan. Frozen and validated; `tp`/`pp` of 0 mean "choose by default_layout"."""

    model: ModelSpec
    hardware: Hardware
    chips: int = 1
    weight_bits: float = 16.0
    kv_bits: float = 16.0
    batch: int = 1
    input_len: int = 512
    output_len: int = 256
    tp: int = 0
    pp: int = 0
    spec_tokens: int = 0
    acceptance: float = 0.0
    compute_dtype: str = ""
    draft: ModelSpec | None = None

    def __post_init__(self) -> None:
        if self.chips < 1:
            raise ValueError(f"chips must be >= 1, got {self.chips}")
        if not 1.0 <= self.weight_bits <= 32.0 or not 1.0 <= self.kv_bits <= 32.0:
            raise ValueError("weight and KV bits must be between 1 and 32")
        if self.batch < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("batch, input length and output length must be >= 1")
        if self.spec_tokens < 0 or not 0.0 <= self.acceptance < 1.0:
            raise ValueError("spec tokens must be >= 0 and acceptance in [0, 1)")
        if self.compute_dtype and self.compute_dtype not in DTYPES:
            raise ValueError(f"compute dtype {self.compute_dtype!r} not in {DTYPES}")
        tp, pp = self.layout
        if self.chips % (tp * pp):
            raise ValueError(f"tp ({tp}) x pp ({pp}) must divide the chip count ({self.chips})")
        if tp * pp > 1 and self.hardware.interconnect_gbs <= 0 and not self.hardware.is_sram:
            raise ValueError(
                f"{self.hardware.id} has no chip-to-chip link: tensor and pipeline parallel must be 1"
            )
        if pp > self.model.layers:
            raise ValueError(
                f"pipeline parallel ({pp}) exceeds the model's {self.model.layers} layers"
            )

    @property
    def layout(self) -> tuple[int, int]:
        if self.tp or self.pp:
            return self.tp or 1, self.pp or 1
        return default_layout(self.hardware, self.chips)

    @property
    def replicas(self) -> int:
        tp, pp = self.layout
        return self.chips // (tp * pp)

    @property
    def batch_per_replica(self) -> int:
        return math.ceil(self.batch / self.replicas)

    @property
    def dtype(self) -> str:
        return self.compute_dtype or self.hardware.best_dtype(self.weight_bits)

    @property
    def mean_context(self) -> float:
        """Average cached positions during generation: the prompt plus half the output."""
        return self.input_len + self.output_len / 2

    @property
    def max_context(self) -> int:
        return self.input_len + self.output_len

    @property
    def tokens_per_verify(self) -> int:
        """Tokens each sequence pushes through the target per step: 1, or k drafts + 1."""
        return self.spec_tokens + 1 if self.spec_tokens else 1

    @property
    def accepted_per_step(self) -> float:
        """Expected tokens kept per step with k drafts of acceptance rate a:
        (1 - a^(k+1)) / (1 - a)  (Leviathan, Kalman, Matias 2023, eq. 1)."""
        if not self.spec_tokens:
            return 1.0
        a, k = self.acceptance, self.spec_tokens
        return (1.0 - a ** (k + 1)) / (1.0 - a)
