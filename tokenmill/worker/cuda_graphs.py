"""CUDA graphs for decode steps: the forward of a decode-only batch replayed as one launch.

A decode step of a small model on a GPU is launch-bound (hundreds of small kernels, each a few
microseconds of work and ~5 us of CPU to launch). Capturing the forward once per batch-size
bucket and replaying it makes the step one launch. Everything the graph reads lives in static
buffers, refilled before each replay:

    ids, positions, slot_mapping   [B_max]              rows n..bucket-1: padding
    block_tables                   [B_max, max_blocks]  fixed width: the whole context window
    ctx_lens                       [B_max]              padding rows: 1

Padding rows write their K/V into a scratch block that no request owns (the pool has one block
more than the scheduler hands out) and attend over that one slot; their outputs are dropped.
The fixed-width tables suit the Triton decode kernel, which visits only the blocks below each
ctx_len; the torch reference would gather the whole width every step, so graphs are used only
where that kernel runs. Logits are computed after the replay, eagerly, for the rows that sample.
"""

from __future__ import annotations

import logging
import time

import torch

from tokenmill.attention import triton_decode
from tokenmill.attention.paged import AttentionMetadata

log = logging.getLogger("tokenmill")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def usable(device: torch.device, kv_caches: list) -> bool:
    """Graphs need CUDA, plain KV pools and the Triton decode kernel."""
    return (device.type == "cuda" and triton_decode.available(device)
            and all(isinstance(k, torch.Tensor) for k, _ in kv_caches))


class CudaGraphDecoder:
    """Captured decode forwards, one per bucket up to `max_batch`. `scratch_block`: the block
    index padding rows write to (never in a block table)."""

    def __init__(self, model, kv_caches: list, block_size: int, max_model_len: int, max_batch: int,
                 scratch_block: int, device: torch.device) -> None:
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        b_max = self.buckets[-1]
        self.scratch_block = scratch_block
        self.pad_slot = scratch_block * block_size
        self.ids = torch.zeros(b_max, dtype=torch.long, device=device)
        self.positions = torch.zeros(b_max, dtype=torch.long, device=device)
        self.slots = torch.full((b_max,), self.pad_slot, dtype=torch.long, device=device)
        self.tables = torch.full((b_max, self.max_blocks), scratch_block, dtype=torch.long, device=device)
        self.ctx_lens = torch.ones(b_max, dtype=torch.long, device=device)
        self.rows = torch.arange(b_max, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        self._capture()
        log.info("captured CUDA graphs for decode batch sizes %s in %.1f s", self.buckets, time.perf_counter() - t0)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:b], decode_token_idx=self.rows[:b],
                                 decode_block_tables=self.tables[:b], decode_ctx_lens=self.ctx_lens[:b],
                                 prefills=[], num_tokens=b)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
            args = (self.ids[:b], self.positions[:b], self.kv_caches, self._meta(b))
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
                for _ in range(2):
                    self.model(*args)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[b] = self.model(*args)  # [b, hidden], a static output
            pool = graph.pool()
            self.graphs[b] = graph

    def can_run(self, step) -> bool:
        """A decode-only step that fits a bucket and the fixed table width."""
        return (not step.prefills and 0 < len(step.decode_idx) == len(step.token_ids) <= self.buckets[-1]
                and step.table_width <= self.max_blocks)

    @torch.inference_mode()
    def run(self, step) -> torch.Tensor:
        """Hidden states [n, hidden] of the step's n decode tokens (a view of the graph's output:
        read it before the next replay)."""
        n = len(step.token_ids)
        b = next(x for x in self.buckets if x >= n)
        dev = self.device
        self.ids[:n].copy_(torch.tensor(step.token_ids, device=dev))
        self.positions[:n].copy_(torch.tensor(step.positions, device=dev))
        self.slots[:n].copy_(torch.tensor(step.slots, device=dev))
        self.ctx_lens[:n].copy_(torch.tensor(step.decode_lens, device=dev))
        width = step.table_width
        self.tables[:n, :width].copy_(torch.tensor(step.decode_tables, device=dev).view(n, width))
        self.tables[:n, width:] = self.scratch_block  # unread: past every ctx_len
        if b > n:  # padding rows: the scratch slot, one token of context
            self.ids[n:b] = 0
            self.positions[n:b] = 0
            self.slots[n:b] = self.pad_slot
            self.ctx_lens[n:b] = 1
            self.tables[n:b] = self.scratch_block
        self.graphs[b].replay()
        return self.hidden[b][:n]
