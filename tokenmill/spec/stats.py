"""SpecStats: speculative decoding counters, on `LLMEngine.stats.spec` (the server exports them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpecStats:
    """Counters since the engine started. A *pass* is one request verifying >= 1 draft in a step.

    acceptance_rate       accepted drafts / drafts scored
    mean_accepted_tokens  accepted drafts per pass
    tokens_per_pass       tokens a pass emits (accepted drafts + the target's own), the upper
                          bound of the speedup: a pass costs at least one plain decode step
    """

    method: str = "none"
    num_speculative_tokens: int = 0  # configured k
    current_k: int = 0  # k of the latest step (0: speculation switched off)
    num_passes: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # tokens the passes produced, after stops
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: draft j accepted
    num_switches: int = 0  # adaptive on/off transitions
    propose_seconds: float = 0.0  # time spent in the proposer

    def record(self, num_drafts: int, num_accepted: int, num_emitted: int) -> None:
        self.num_passes += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        self.num_emitted_tokens += num_emitted
        if len(self.accepted_per_position) < num_drafts:
            self.accepted_per_position += [0] * (num_drafts - len(self.accepted_per_position))
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        return self.num_accepted_tokens / self.num_passes if self.num_passes else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.num_emitted_tokens / self.num_passes if self.num_passes else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_tokens": self.mean_accepted_tokens,
            "tokens_per_pass": self.tokens_per_pass,
        }
