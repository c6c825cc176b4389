"""CUDA graphs for decode steps: the forward of a decode-only batch replayed as one launch.

A decode step of a small model on a GPU is launch-bound (hundreds of small kernels, each a few
microseconds of work and ~5 us of CPU to launch). Capturing the forward once per batch-size
bucket and replaying it makes the step one launch. Everything the graph reads lives in static
buffers, refilled before each replay:

    ids, positions, slot_mapping   [B_max]              rows n..bucket-1: padding
    block_tables                   [B_max, max_blocks]  fixed width: the whole context window
    ctx_lens                       [B_max]              padding rows: 1

The per-step inputs travel as one host-to-device copy: all five live in one int64 device
buffer, mirrored by a pinned host buffer that each step refills row by row (the step ends by
reading its sampled tokens back, so the copy has usually landed before the host buffer is reused;
an event recorded after the copy covers a step without sampled rows).

With a compiled decode step (--compile), the graphs capture the compiled layer groups: their
Inductor kernels fuse the norms, RoPE and activations, so each layer replays a few kernels
instead of ~30 small ones.

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
from tokenmill.worker.model_runner import long_tensor

log = logging.getLogger("tokenmill")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def buckets_for(max_batch: int) -> list[int]:
    """Batch sizes to capture: the powers of two below max_num_seqs, then max_num_seqs itself (so
    a full batch of, say, 100 replays a graph rather than running eagerly), up to 256."""
    top = min(max(max_batch, 1), BUCKETS[-1])
    return [b for b in BUCKETS if b < top] + [top]


def usable(device: torch.device, kv_cache_dtype: str) -> bool:
    """Graphs need CUDA and a Triton decode kernel for the KV cache: a plain pool, or codes it
    reads (attention/triton_decode.py)."""
    if device.type != "cuda" or not triton_decode.available(device):
        return False
    return kv_cache_dtype == "auto" or triton_decode.quantized_available(device, kv_cache_dtype)


class CudaGraphDecoder:
    """Captured decode forwards, one per bucket up to `max_batch`. `scratch_block`: the block
    index padding rows write to (never in a block table)."""

    def __init__(self, model, kv_caches: list, block_size: int, max_model_len: int, max_batch: int,
                 scratch_block: int, device: torch.device, groups: list | None = None) -> None:
        self.model, self.kv_caches, self.device, self.groups = model, kv_caches, device, groups
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.buckets = buckets_for(max_batch)
        b_max = self.buckets[-1]
        self.scratch_block = scratch_block
        self.pad_slot = scratch_block * block_size
        # Inference tensors, as every input of the compiled layer groups was when they were traced
        # (model_runner's dummy decodes): a normal tensor fails the guards, and each bucket's
        # warm-up would compile every group again.
        with torch.inference_mode():
            # host rows: ids, positions, slots, ctx_lens, then the block tables [b_max, max_blocks]
            self.host = torch.zeros(b_max * (4 + self.max_blocks), dtype=torch.long,
                                    pin_memory=device.type == "cuda")
            self.buffer = torch.zeros_like(self.host, device=device)
            self.ids, self.positions, self.slots, self.ctx_lens, tables = self.buffer.split(
                [b_max] * 4 + [b_max * self.max_blocks])
            self.tables = tables.view(b_max, self.max_blocks)
            h_ids, h_pos, h_slots, h_ctx, h_tables = self.host.split([b_max] * 4 + [b_max * self.max_blocks])
            self.host_rows = (h_ids, h_pos, h_slots, h_ctx, h_tables.view(b_max, self.max_blocks))
            self._pad_rows(0, b_max)
            self.buffer.copy_(self.host)
            self.rows = torch.arange(b_max, device=device)
        self.copied = None  # a CUDA event: the last step's host-to-device copy has landed
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        self._capture()
        log.info("captured CUDA graphs for decode batch sizes %s%s in %.1f s", self.buckets,
                 " (compiled layers)" if groups else "", time.perf_counter() - t0)

    def _pad_rows(self, start: int, end: int) -> None:
        """Host rows start..end-1 as padding: the scratch slot, one token of context."""
        ids, pos, slots, ctx, tables = self.host_rows
        ids[start:end] = 0
        pos[start:end] = 0
        slots[start:end] = self.pad_slot
        ctx[start:end] = 1
        tables[start:end] = self.scratch_block

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
            # should a compiled group still recompile here, float settings stay constants (as
            # in model_runner's compile)
            with torch._dynamo.config.patch(specialize_float=True):
                with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
                    for _ in range(2):
                        self.model(*args, self.groups)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.hidden[b] = self.model(*args, self.groups)  # [b, hidden], a static output
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
        if self.copied is not None:  # a step whose rows all sampled has waited already; others not
            self.copied.synchronize()
        ids, pos, slots, ctx, tables = self.host_rows
        ids[:n] = long_tensor(step.token_ids)
        pos[:n] = long_tensor(step.positions)
        slots[:n] = long_tensor(step.slots)
        ctx[:n] = long_tensor(step.decode_lens)
        width = step.table_width  # columns past it keep stale blocks: past every ctx_len, never read
        tables[:n, :width] = long_tensor(step.decode_tables).view(n, width)
        if b > n:
            self._pad_rows(n, b)
        self.buffer.copy_(self.host, non_blocking=True)
        if self.device.type == "cuda":
            self.copied = self.copied or torch.cuda.Event()
            self.copied.record()
        self.graphs[b].replay()
        return self.hidden[b][:n]
