"""Draft-model proposer: a second, cheaper model guesses k tokens, one step at a time.

The draft is any llama-family model with the target's tokenizer, or the target's own weights
quantized to int4 ("self-speculative": same model, a quarter of the weight bytes per pass). It
keeps its own paged KV cache (own block pool and block tables) and its own ModelRunner, and
runs k batched single-token steps per engine step over the requests that speculate:

    step 1   catch up: compute what the draft has not seen (the prompt the first time; then the
             target's last token, plus any accepted tokens whose draft KV was rolled back) -> d1
    step j   feed d_{j-1} -> d_j

Per request the draft's KV covers a token list, a *shadow* Request: the target's tokens, then
the drafts it fed itself. Before proposing, the shadow is cut back to its longest prefix that
still agrees with the target's tokens (the accepted drafts survive, the rejected ones are rolled
back with KVCacheManager.trim), so the draft stays in sync after any acceptance, preemption or
stop. Greedy requests get argmax drafts (q one-hot); sampled requests get drafts drawn from the
draft's distribution under the request's temperature/top-k/top-p, returned as q for the
rejection rule (requests asking for logprobs get argmax drafts: the runner computes logprobs
on the deterministic path only).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from tokenmill.config import ConfigError
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.outputs import ScheduledRequest, SchedulerOutput
from tokenmill.request import Request
from tokenmill.sample.rejection import sampling_probs
from tokenmill.sample.sampler import categorical, draw_uniforms
from tokenmill.spec.proposer import Proposal
from tokenmill.worker.kv_cache import allocate_kv_caches
from tokenmill.worker.model_runner import ModelRunner

_DRAFT_SEED_OFFSET = 0x5EED  # a seeded request's drafts come from seed + this (its own stream)


def self_draft_model(target: LlamaForCausalLM, scheme: str, dtype: torch.dtype,
                     group_size: int = 32) -> LlamaForCausalLM:
    """The hook for self-speculative decoding: a copy of the target with its linear layers
    swapped for `scheme` (int4) packed modules (tokenmill.quant). The target is unchanged."""
    from tokenmill.quant import check_device, quantize_model
    from tokenmill.quant.base import QuantLinear

    if any(isinstance(m, QuantLinear) for m in target.modules()):
        raise ConfigError("self-speculative decoding quantizes a float target, but this target already runs "
                          "quantized; load it with quantization='none'")
    check_device(scheme, target.model.norm.weight.device)
    draft = copy.deepcopy(target)
    quantize_model(draft, scheme, dtype, group_size)
    return draft.eval().requires_grad_(False)


class DraftProposer:
    """Proposes with `model` from its own KV pool of `num_blocks` x `block_size` tokens.

    Owns: the pool, one shadow Request per speculating request (freed by `free`), and per
    seeded sampled request a generator for its drafts. If the pool runs out, the request gets
    no drafts this step and its draft KV is released (recomputed when it next speculates)."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        caches = allocate_kv_caches(model.config, num_blocks, block_size, dtype, device)
        self.runner = ModelRunner(model, caches, block_size, device)
        self.device = device
        self._seqs: dict[str, Request] = {}
        self._generators: dict[str, torch.Generator] = {}

    def propose(self, requests: Sequence[Request], num_tokens: Sequence[int]) -> list[Proposal]:
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        feed = {i: self._sync(r) for i, r in enumerate(requests)}  # i -> tokens to compute next
        with torch.inference_mode():
            while True:
                active = [i for i in feed if len(drafts[i]) < num_tokens[i]]
                sched = []
                for i in active:
                    seq = self._seqs[requests[i].request_id]
                    if not self.kv.allocate_slots(seq, len(feed[i])):
                        self.free(seq.request_id)
                        del feed[i]
                        continue
                    sched.append(ScheduledRequest(seq.request_id, feed[i], seq.num_computed_tokens,
                                                  list(self.kv.get_block_table(seq.request_id)), True))
                if not sched:
                    break
                active = [i for i in active if i in feed]
                logits = self.runner.compute_logits(SchedulerOutput(sched))  # [A, V]
                tokens, q = self._pick(logits, [requests[i] for i in active])
                for row, (i, token) in enumerate(zip(active, tokens.tolist())):  # one transfer per step
                    seq = self._seqs[requests[i].request_id]
                    seq.num_computed_tokens += len(feed[i])
                    seq.prompt_token_ids.append(token)
                    feed[i] = [token]
                    drafts[i].append(token)
                    if q[row] is not None:
                        probs[i].append(q[row])
        return [Proposal(d, torch.stack(p) if p else None) for d, p in zip(drafts, probs)]

    def _sync(self, request: Request) -> list[int]:
        """Cut the shadow back to its longest prefix agreeing with the target's tokens (at least
        the last token stays to compute); return the tokens the draft must compute first."""
        tokens = request.all_token_ids
        seq = self._seqs.get(request.request_id)
        if seq is None:
            seq = self._seqs[request.request_id] = Request(request.request_id, tokens, request.params)
            return list(tokens)
        have = seq.prompt_token_ids
        n = min(seq.num_computed_tokens, len(tokens) - 1)
        same = n
        if have[:n] != tokens[:n]:
            same = next(j for j in range(n) if have[j] != tokens[j])
        seq.prompt_token_ids = tokens
        seq.num_computed_tokens = same
        self.kv.trim(seq)
        return tokens[same:]

    def _pick(self, logits: torch.Tensor, requests: list[Request]) -> tuple[torch.Tensor, list]:
        """Argmax drafts, or drafts sampled from q for sampled requests; returns ([A] ids, q rows)."""
        tokens = logits.argmax(-1)  # [A]
        q_rows: list[torch.Tensor | None] = [None] * len(requests)
        rows = [j for j, r in enumerate(requests) if not r.params.greedy and r.params.logprobs is None]
        if rows:
            idx = torch.tensor(rows, device=self.device)
            q = sampling_probs(logits[idx], [requests[j].params for j in rows])  # [S, V]
            noise = torch.cat([draw_uniforms(self._generator(requests[j]), 1, self.device) for j in rows])
            tokens = tokens.index_copy(0, idx, categorical(q, noise))
            for n, j in enumerate(rows):
                q_rows[j] = q[n]
        return tokens, q_rows

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.params.seed
        if seed is None:
            return None
        gen = self._generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed + _DRAFT_SEED_OFFSET)
            self._generators[request.request_id] = gen
        return gen

    def free(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.kv.free(seq)
        self._generators.pop(request_id, None)
