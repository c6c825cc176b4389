"""SamplingParams: how one request picks its tokens. Frozen and validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

OUTPUT_KINDS = ("cumulative", "delta", "final_only")


class InvalidRequestError(ValueError):
    """A request the engine cannot accept; the message is one line naming the field."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping controls, named as in vLLM and the OpenAI API.

    temperature == 0 means greedy. top_k <= 0 (or -1) and top_p == 1 and min_p == 0 disable
    those filters. `seed` makes the request's samples reproducible regardless of what else runs
    in the same batch. `logprobs=n` returns the sampled token's logprob and the n most likely.
    `speculative=False` opts a request out of speculative decoding (same output distribution).
    `output_kind`: "cumulative" (every step that adds tokens yields an output with the whole text
    and token ids so far, and the step's delta), "delta" (the same outputs carrying only what the
    step added: text, token ids and logprobs; `num_output_tokens` counts them all; no per-step
    copy of what came before, which grows with the output: what a streaming server asks for) or
    "final_only" (one output, when the request finishes; the engine then skips the per-step
    outputs, and without stop strings decodes the text once at the end). `LLM.generate` asks for
    final_only, as vLLM's does.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    speculative: bool = True  # may the engine's speculative decoding serve this request
    output_kind: str = "cumulative"  # or "delta", "final_only"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        def bad(name: str, accepted: str) -> InvalidRequestError:
            value = getattr(self, name)
            return InvalidRequestError(f"invalid {name}={value!r}: {accepted}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= 1, or 0/-1 to disable")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or None (up to the context window)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= self.MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be an integer in [0, {self.MAX_LOGPROBS}] or None")
        if not isinstance(self.speculative, bool):
            raise bad("speculative", "must be true or false")
        if self.output_kind not in OUTPUT_KINDS:
            raise bad("output_kind", "must be 'cumulative', 'delta' or 'final_only'")
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None:
            if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
                raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        object.__setattr__(self, "stop", list(stop or []))
        ids = self.stop_token_ids
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids)):
            raise bad("stop_token_ids", "must be a list of non-negative token ids")
        object.__setattr__(self, "stop_token_ids", list(ids or []))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_number(x: object) -> bool:
    """A finite int or float (NaN and infinity are rejected: every comparison with NaN is False)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
