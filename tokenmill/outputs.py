"""Stage contracts: what the scheduler hands the model runner, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: tokens [start, start + num_tokens) get their KV computed.

    `token_ids` are those tokens; `block_table` maps positions to KV blocks; `sample` is True
    when this chunk reaches the end of the known tokens, so the step samples the next one.

    Speculative decoding: `spec_token_ids` (k drafts) are the last k of `token_ids`, after the
    request's last real token; the step scores all k + 1 positions and keeps the accepted
    prefix of the drafts plus one token of its own (ModelRunnerOutput.accepted / .sampled)."""

    request_id: str
    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    requests: list[ScheduledRequest]
    preempted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # freed since the last step

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass(frozen=True)
class ModelRunnerOutput:
    """Sampled token per request that sampled this step (request order of the schedule).

    A request that verified drafts also has `accepted`: the drafts the target kept, which come
    before its `sampled` token (the token at the first rejected position, or the bonus token
    when all were kept). Logprobs of accepted tokens are in `accepted_logprobs` (same order)."""

    sampled: dict[str, int]
    logprobs: dict[str, float] = field(default_factory=dict)
    top_logprobs: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    accepted: dict[str, list[int]] = field(default_factory=dict)
    accepted_logprobs: dict[str, list[float]] = field(default_factory=dict)
    accepted_top_logprobs: dict[str, list[list[tuple[int, float]]]] = field(default_factory=dict)

    def new_tokens(self, request_id: str) -> list[int]:
        """The tokens this step produced for the request, in order ([] if it did not sample)."""
        token = self.sampled.get(request_id)
        if token is None:
            return []
        return self.accepted.get(request_id, []) + [token]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {id: logprob} (sampled + top-n)
    cumulative_logprob: float | None = None
    delta: str = ""  # text added by the latest step (streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    # output tokens so far, whatever the output kind (a "delta" output's token_ids are the step's)
    num_output_tokens: int = 0


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
