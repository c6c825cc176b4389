"""The proposer interface: guess the next tokens of running requests, cheaply.

A proposer sees requests in decode position and returns up to k drafts for each. It never
changes a request: the engine puts the drafts on `Request.spec_token_ids`, the scheduler hands
them out, the runner scores them, and the scheduler keeps the accepted prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tokenmill.request import Request


@dataclass(frozen=True)
class Proposal:
    """Drafts continuing one request. `probs` [len(token_ids), V] is the distribution each
    draft was drawn from; None means the drafts are deterministic (q one-hot at the draft)."""

    token_ids: list[int]
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, requests: Sequence[Request], num_tokens: Sequence[int]) -> list[Proposal]:
        """Up to num_tokens[i] (>= 1) drafts continuing requests[i].all_token_ids, in order.
        An empty proposal is fine (nothing to guess). Does not mutate the requests."""
        ...

    def free(self, request_id: str) -> None:
        """Forget everything held for the request (it finished or was aborted). Idempotent."""
        ...
