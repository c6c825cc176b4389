"""ModelRunner: a SchedulerOutput -> flat tensors -> one forward pass -> sampled tokens.

All scheduled tokens of all requests go through the model as one [T] batch:

    request   A (prefill chunk, 5 tokens)   B (decode)   C (decode)
    tokens    a0 a1 a2 a3 a4                b7           c3            T = 7
    positions 0  1  2  3  4                 7            3
    slots     from each request's block table: block_table[p // bs] * bs + p % bs

Logits are computed only at each sampling request's last token. One host transfer per step
(the sampled ids), on purpose.
"""

from __future__ import annotations

import torch

from tokenmill.attention.paged import AttentionMetadata
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.sample.sampler import Sampler, SamplingState


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()

    def _prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_idx, decode_tables, decode_lens = [], [], []
        prefills = []
        logits_idx = []
        for r in sched.requests:
            first = len(token_ids)
            pos = range(r.start, r.start + r.num_tokens)
            token_ids.extend(r.token_ids)
            positions.extend(pos)
            table = r.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            ctx_len = r.start + r.num_tokens
            if r.num_tokens == 1:
                decode_idx.append(first)
                decode_tables.append(table[: -(-ctx_len // bs)])
                decode_lens.append(ctx_len)
            else:
                blocks = torch.tensor(table[: -(-ctx_len // bs)], dtype=torch.long, device=self.device)
                prefills.append((first, r.num_tokens, ctx_len, blocks))
            if r.sample:
                logits_idx.append(len(token_ids) - 1)
        width = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            decode_token_idx=torch.tensor(decode_idx, dtype=torch.long, device=dev),
            decode_block_tables=torch.tensor(padded, dtype=torch.long, device=dev).view(len(padded), width),
            decode_ctx_lens=torch.tensor(decode_lens, dtype=torch.long, device=dev),
            prefills=prefills,
            num_tokens=len(token_ids),
        )
        ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos_t, meta, logits_idx

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, states: dict[str, SamplingState]) -> ModelRunnerOutput:
        ids, positions, meta, logits_idx = self._prepare(sched)
        hidden = self.model(ids, positions, self.kv_caches, meta)  # [T, hidden]
        sampling = [r.request_id for r in sched.requests if r.sample]
        if not sampling:
            return ModelRunnerOutput(sampled={})
        logits = self.model.compute_logits(hidden[torch.tensor(logits_idx, device=self.device)])  # [N, V]
        out = self.sampler(logits, [states[rid] for rid in sampling])
        logprobs = {}
        top = {}
        if out.logprobs is not None:
            for i, rid in enumerate(sampling):
                if states[rid].params.logprobs is not None:
                    logprobs[rid] = out.logprobs[i]
                    top[rid] = out.top_logprobs[i] if out.top_logprobs else []
        return ModelRunnerOutput(sampled=dict(zip(sampling, out.token_ids)), logprobs=logprobs, top_logprobs=top)
