"""N-gram prompt lookup: no extra model, the request's own context is the draft.

Find the longest suffix of the request's tokens (n from ngram_max down to ngram_min) that
occurred earlier in its context, and propose the k tokens that followed its latest earlier
occurrence (the latest one followed by k tokens; failing that, the earliest). Strong wherever outputs copy their inputs: summaries, code edits, RAG answers,
rewrites.

    tokens   ... the cat sat on the mat . The cat sat on
                     └───────┬──────┘ ▲                 └──┬──┘ suffix (n = 3)
                   earlier occurrence  proposal: "the mat . The" (k = 4)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokenmill.request import Request
from tokenmill.spec.proposer import Proposal


class NgramProposer:
    """Stateless; deterministic drafts (q one-hot). O(context x n) numpy work per request."""

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4) -> None:
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, requests: Sequence[Request], num_tokens: Sequence[int]) -> list[Proposal]:
        return [Proposal(self.lookup(r.all_token_ids, k)) for r, k in zip(requests, num_tokens)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens following an earlier occurrence of the longest matching suffix."""
        ids = np.asarray(tokens, dtype=np.int64)
        length = len(ids)
        for n in range(min(self.ngram_max, length - 1), self.ngram_min - 1, -1):
            # windows [L-n, n] of ids[:-1]: window j is ids[j : j+n], and ids[j+n] exists
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == ids[length - n :]).all(axis=1))
            if len(hits):
                full = hits[hits + n + k <= length]  # occurrences followed by k tokens
                start = int(full[-1] if len(full) else hits[0]) + n
                return ids[start : start + k].tolist()
        return []

    def free(self, request_id: str) -> None:
        pass
