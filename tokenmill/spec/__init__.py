"""Speculative decoding: proposers guess tokens, the target verifies them in its normal step.

    proposer.py   the interface (Proposal, Proposer)
    ngram.py      prompt lookup: drafts copied from the request's own context
    draft.py      a draft model with its own paged KV cache; self-speculative int4 hook
    adaptive.py   when speculation pays (measured pass cost x online acceptance)
    stats.py      SpecStats counters (engine.stats.spec)

Verification lives in the engine: the scheduler hands drafts out as extra tokens, the runner
scores them (sample/rejection.py), and the scheduler keeps the accepted prefix.
"""

from __future__ import annotations

import logging

import torch

from tokenmill.config import ConfigError, SpecConfig
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.spec.proposer import Proposal, Proposer
from tokenmill.spec.stats import SpecStats

__all__ = ["Proposal", "Proposer", "SpecStats", "make_proposer"]

log = logging.getLogger("tokenmill.spec")


def make_proposer(spec: SpecConfig, target: LlamaForCausalLM, dtype: torch.dtype, device: torch.device,
                  num_blocks: int, block_size: int, show_progress: bool = True) -> Proposer:
    """The proposer `spec.method` names. A draft model gets a KV pool of `num_blocks` blocks."""
    if spec.method == "ngram":
        from tokenmill.spec.ngram import NgramProposer

        return NgramProposer(spec.ngram_min, spec.ngram_max)
    from tokenmill.spec.draft import DraftProposer, self_draft_model

    if spec.method == "self":
        model = self_draft_model(target, spec.self_quantization, dtype)
    elif spec.method == "draft":
        from tokenmill.loader.model_loader import load_model
        from tokenmill.loader.resolve import resolve_model

        model = load_model(resolve_model(spec.draft_model), dtype, device, show_progress=show_progress).model
    else:
        raise ConfigError(f"no proposer for speculative method {spec.method!r}")
    if model.config.vocab_size != target.config.vocab_size:
        raise ConfigError(f"draft model vocabulary ({model.config.vocab_size}) differs from the target's "
                          f"({target.config.vocab_size}); a draft needs the same tokenizer")
    what = f"draft model {spec.draft_model}" if spec.method == "draft" else f"the target in {spec.self_quantization}"
    log.info("speculation: drafts from %s, with its own KV pool of %d blocks", what, num_blocks)
    return DraftProposer(model, num_blocks, block_size, dtype, device)
