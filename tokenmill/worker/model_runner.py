"""ModelRunner: a SchedulerOutput -> flat tensors -> one forward pass -> sampled tokens.

All scheduled tokens of all requests go through the model as one [T] batch:

    request   A (prefill chunk, 5 tokens)   B (decode)   C (decode)
    tokens    a0 a1 a2 a3 a4                b7           c3            T = 7
    positions 0  1  2  3  4                 7            3
    slots     from each request's block table: block_table[p // bs] * bs + p % bs

Logits are computed only at each sampling request's last token. One host transfer per step
(the sampled ids), on purpose.

Speculative decoding: a request with k drafts brings its last real token and the drafts
(k + 1 tokens, computed like a prefill chunk) and gets logits at all k + 1 positions:

    request   B (decode + 3 drafts)
    tokens    b7 d1 d2 d3         logits rows  p1 p2 p3 p4   (p_j scores d_j; p4 is the bonus)

Every row is sampled as an ordinary step would sample it, and the drafts are accepted while they
equal the sample (sample/rejection.py: for deterministic drafts this is the rejection rule);
drafts that came with their draft distribution q go through `rejection_sample` instead.
"""

from __future__ import annotations

import array
import itertools
import logging
import time
import types
from dataclasses import dataclass

import torch

from tokenmill.attention.paged import AttentionMetadata
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.model.eager_plan import EagerPlan
from tokenmill.model.llama import LayerGroup, LlamaForCausalLM
from tokenmill.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tokenmill.sample.rejection import (
    accepted_prefix,
    rejection_sample,
    rewind_generator,
    sampling_probs,
    uniforms,
)
from tokenmill.sample.sampler import Sampler, SamplingState, draw_uniforms

log = logging.getLogger("tokenmill")

MIN_TABLE_WIDTH = 2  # with a compiled decode step, block tables are padded to at least this many blocks
COMPILE_GROUP = 6  # decoder layers per compiled region (the divisor of the layer count nearest it)


@dataclass(frozen=True)
class StepInput:
    """A step's batch as plain lists (what rank 0 broadcasts to the other tensor-parallel ranks)."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    decode_idx: list[int]
    decode_tables: list[int]  # row-major [decodes, table_width], padded with block 0
    table_width: int
    decode_lens: list[int]
    prefills: list[tuple[int, int, int, list[int]]]  # (first token, tokens, context length, blocks)
    logits_idx: list[int]


def long_tensor(values: list[int]) -> torch.Tensor:
    """A host int64 tensor of a list of ints, through an array's buffer: ~4x faster than
    torch.tensor(list), which converts element by element (a batch-64 step's block tables at
    2k tokens of context: 90 instead of 350 us)."""
    if not values:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


def _structure(module: torch.nn.Module) -> tuple:
    """What a compiled graph of `module` depends on besides tensor values: each submodule's type
    and scalar settings, and each tensor's name, shape and dtype."""
    return tuple(
        (name, type(m).__name__,
         tuple((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None)))),
         tuple((t, tuple(x.shape), x.dtype) for t, x in [*m.named_parameters(recurse=False),
                                                          *m.named_buffers(recurse=False)]))
        for name, m in module.named_modules()
    )


_private_classes = itertools.count()


def _private_group_class() -> type[LayerGroup]:
    """A LayerGroup subclass whose forward runs under a code object of its own."""
    f = LayerGroup.forward
    n = next(_private_classes)
    names = {"co_name": f"forward_{n}"} | ({"co_qualname": f"LayerGroup.forward_{n}"}
                                           if hasattr(f.__code__, "co_qualname") else {})  # 3.11+
    code = f.__code__.replace(**names)
    forward = types.FunctionType(code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return type("LayerGroup", (LayerGroup,), {"forward": forward, "__module__": LayerGroup.__module__})


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device, compile_decode: bool = False) -> None:
        self.model = model
        self.tp = model.tp  # a TPGroup when the model is one tensor-parallel shard
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self.compiled_groups: list | None = None  # (compiled LayerGroup, its layer count)
        self.cuda_graphs = None  # a CudaGraphDecoder (worker/cuda_graphs.py) when enabled
        self.eager_plan: list | None = None  # eager CPU steps without module dispatch, as one group
        if device.type == "cpu":
            cpu_kernels.load()  # decode attention, norms, RoPE (built on first use; else the torch code)
        if compile_decode:
            self._compile_decode()
        elif device.type == "cpu":
            plan = EagerPlan.build(model, kv_caches)
            if plan is not None:
                self.eager_plan = [(plan, len(plan.layers))]

    def _compile_decode(self) -> None:
        """Decode-only steps run the decoder layers through torch.compile, in groups of about
        COMPILE_GROUP layers (one graph shared by all groups of the same size; dynamic in the
        batch and context sizes): the per-call guard and dispatch overhead (~45 us per region
        on this CPU class) is paid per group, not per layer. Steps with prefill chunks stay
        eager: their Python-side metadata would recompile per chunk count. Compiles here, on
        dummy decodes of batch 1 and 2 (the sizes torch specializes), so no request waits for
        the compiler; the dummies write K/V only into block 0's first slots, which no request
        owns yet."""
        t0 = time.perf_counter()
        layers = list(self.model.model.layers)
        n = len(layers)
        k = min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - COMPILE_GROUP))
        groups = [LayerGroup(layers[i : i + k]) for i in range(0, n, k)]
        # every group built alike (module types, tensor shapes and dtypes, scalar settings), one device
        private = self.tp is None and self.device.type == "cpu" and len({_structure(g) for g in groups}) == 1
        try:
            self._compile_groups(groups, k, private)
        except torch._dynamo.exc.Unsupported as e:  # a graph break: compile the guarded, breakable way
            if not private:
                raise
            log.info("decode step compiled with every guard (%s)", str(e).splitlines()[0][:120])
            self._compile_groups(groups, k, False)
        log.info("compiled the decode step (%d groups of %d layers) in %.1f s", n // k, k, time.perf_counter() - t0)

    def _compile_groups(self, groups: list[LayerGroup], k: int, private: bool) -> None:
        """private: the groups skip dynamo's ~1000 guards on their module attributes, which for
        groups built alike can only ever pass (checking them cost ~60 of the ~90 us each group call
        spent in guards; inputs — activations, KV caches, metadata — stay guarded). Safe only if no
        other module reaches these graphs: the groups get a forward of their own (dynamo keeps
        graphs per code object) and each graph must be whole (fullgraph: a graph break would
        compile shared layer code without those guards). Under tensor parallelism (collectives run
        between graphs) and for layers that differ (mixed GGUF types) every guard stays."""
        options = {}
        if self.device.type == "cpu":  # the graph's kernels are called from generated C++ (not Python): ~5% per token
            options["cpp_wrapper"] = True
        elif self.device.type == "cuda":
            # with coordinate-descent tuning Inductor rewrites a matmul with one row (batch-1
            # decode; torch specializes size 1) as a tuned multiply-and-reduce kernel, the GEMV
            # gpt-fast reaches ~80% of HBM bandwidth with; cuBLAS's bf16 GEMV on an 8B layer's
            # matrices measured 42-81% of an H200's copy bandwidth, 67% over the layer (docs/gpu.md)
            options["coordinate_descent_tuning"] = True
        cls = _private_group_class() if private else LayerGroup
        for g in groups:
            g.__class__ = cls
        if private:
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        self.compiled_groups = [(torch.compile(g, dynamic=True, fullgraph=private, options=options or None), k)
                                for g in groups]
        # float settings (RMSNorm eps, the attention scale) become constants of the graph instead
        # of 0-d tensor inputs rebuilt on every call (~30 us per group call)
        with torch._dynamo.config.patch(specialize_float=True):
            for b in (1, 2):
                with torch.inference_mode():  # as in compute_logits: the guards check it
                    self._dummy_decode(b)

    def _dummy_decode(self, b: int) -> None:
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.arange(b, device=dev),
            decode_token_idx=torch.arange(b, device=dev),
            decode_block_tables=torch.zeros(b, MIN_TABLE_WIDTH, dtype=torch.long, device=dev),
            decode_ctx_lens=torch.ones(b, dtype=torch.long, device=dev),
            prefills=[], num_tokens=b,
        )
        zeros = torch.zeros(b, dtype=torch.long, device=dev)
        self.model(zeros, zeros, self.kv_caches, meta, self.compiled_groups)

    def _plan(self, sched: SchedulerOutput) -> StepInput:
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_idx, decode_tables, decode_lens = [], [], []
        prefills = []
        logits_idx = []
        for r in sched.requests:
            first, start, n, table = len(token_ids), r.start, len(r.token_ids), r.block_table
            ctx_len = start + n
            if n == 1:  # a decode: the path taken once per request and step
                token_ids.append(r.token_ids[0])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                decode_idx.append(first)
                decode_tables.append(table[: -(-ctx_len // bs)])
                decode_lens.append(ctx_len)
                if r.sample:
                    logits_idx.append(first)
                continue
            pos = range(start, ctx_len)
            token_ids.extend(r.token_ids)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            prefills.append((first, n, ctx_len, table[: -(-ctx_len // bs)]))
            if r.sample:  # the last token, or the last real token and every draft
                logits_idx.extend(range(len(token_ids) - 1 - len(r.spec_token_ids), len(token_ids)))
        width = max((len(t) for t in decode_tables), default=0)
        if decode_tables and self.compiled_groups is not None:  # width 1: a shape of its own to the compiler
            width = max(width, MIN_TABLE_WIDTH)
        flat: list[int] = []
        for t in decode_tables:
            flat += t
            flat += [0] * (width - len(t))
        return StepInput(token_ids, positions, slots, decode_idx, flat, width, decode_lens, prefills, logits_idx)

    def _tensors(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        long = lambda values: long_tensor(values).to(dev)
        meta = AttentionMetadata(
            slot_mapping=long(step.slots),
            decode_token_idx=long(step.decode_idx),
            decode_block_tables=long(step.decode_tables).view(len(step.decode_idx), step.table_width),
            decode_ctx_lens=long(step.decode_lens),
            prefills=[(first, n, ctx_len, long(blocks)) for first, n, ctx_len, blocks in step.prefills],
            num_tokens=len(step.token_ids),
        )
        return long(step.token_ids), long(step.positions), meta

    @torch.inference_mode()
    def compute_logits(self, sched: SchedulerOutput) -> torch.Tensor | None:
        """One forward pass over the step's tokens; logits [R, V] float32 at the sampling rows
        (one per sampling request, 1 + k for a request with k drafts), or None if none samples.
        Under tensor parallelism this is rank 0's half of the step: it first broadcasts the
        step's batch, which the other ranks run in `run_step` (distributed/worker.py)."""
        return self.run_broadcast(self._plan(sched))

    @torch.inference_mode()
    def run_broadcast(self, step: StepInput) -> torch.Tensor | None:
        """`run_step` on every rank: under tensor parallelism rank 0 first broadcasts the step."""
        if self.tp is not None:
            self.tp.broadcast_object(step)
        return self.run_step(step)

    @torch.inference_mode()
    def run_step(self, step: StepInput) -> torch.Tensor | None:
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(step):
            hidden = self.cuda_graphs.run(step)  # [T, hidden]: one replay
        else:
            ids, positions, meta = self._tensors(step)
            groups = self.eager_plan if meta.prefills else self.compiled_groups or self.eager_plan
            hidden = self.model(ids, positions, self.kv_caches, meta, groups)  # [T, hidden]
        if not step.logits_idx:
            return None
        if len(step.logits_idx) < hidden.shape[0]:  # else every row samples, in order (a decode step)
            hidden = hidden[torch.tensor(step.logits_idx, device=self.device)]
        return self.model.compute_logits(hidden)  # [R, V]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, states: dict[str, SamplingState],
                draft_probs: dict[str, torch.Tensor] | None = None) -> ModelRunnerOutput:
        """Run the step and pick each sampling request's new tokens.

        `draft_probs[request_id]` ([k, V]) is the distribution a request's drafts were drawn
        from; requests without it have deterministic drafts (or none), and a seeded one's
        generator ends where ordinary steps emitting the same tokens would leave it."""
        logits = self.compute_logits(sched)
        sampling = [r for r in sched.requests if r.sample]
        if logits is None:
            return ModelRunnerOutput(sampled={})
        if not any(r.spec_token_ids for r in sampling):  # one row each, in order: no drafts to verify
            return self._sample_plain(logits, sampling, states)
        draft_probs = draft_probs or {}
        first_row: dict[str, int] = {}
        plain_rows: list[int] = []  # rows the ordinary sampler picks
        plain_states: list[SamplingState] = []
        with_q: list[ScheduledRequest] = []
        rows = 0
        for r in sampling:
            first_row[r.request_id] = rows
            n = 1 + len(r.spec_token_ids)
            if r.spec_token_ids and r.request_id in draft_probs:
                with_q.append(r)
            else:
                plain_rows.extend(range(rows, rows + n))
                plain_states.extend([states[r.request_id]] * n)
            rows += n
        saved = {
            r.request_id: states[r.request_id].generator.get_state()
            for r in sampling
            if r.spec_token_ids and r.request_id not in draft_probs
            and states[r.request_id].generator is not None and not states[r.request_id].params.greedy
        }

        row_tokens = [0] * rows
        row_logprobs: list[float | None] = [None] * rows
        row_top: list[list[tuple[int, float]]] = [[] for _ in range(rows)]
        if plain_rows:
            picked = logits if len(plain_rows) == rows else logits[torch.tensor(plain_rows, device=self.device)]
            sampled = self.sampler(picked, plain_states)
            for j, row in enumerate(plain_rows):
                row_tokens[row] = sampled.token_ids[j]
                if sampled.logprobs is not None:
                    row_logprobs[row] = sampled.logprobs[j]
                    row_top[row] = sampled.top_logprobs[j] if sampled.top_logprobs else []
        if with_q:
            for row, token in self._verify_with_q(logits, with_q, first_row, states, draft_probs).items():
                row_tokens[row] = token

        out = ModelRunnerOutput(sampled={})  # filled below: dict fields of a frozen dataclass
        for r in sampling:
            rid, first, drafts = r.request_id, first_row[r.request_id], r.spec_token_ids
            tokens = row_tokens[first : first + 1 + len(drafts)]
            a = accepted_prefix(tokens, drafts)
            out.sampled[rid] = tokens[a]
            if drafts:
                out.accepted[rid] = drafts[:a]
            if rid in saved and a < len(drafts):
                rewind_generator(states[rid].generator, saved[rid], a + 1, self.device)
            if states[rid].params.logprobs is not None and row_logprobs[first] is not None:
                out.logprobs[rid] = row_logprobs[first + a]
                out.top_logprobs[rid] = row_top[first + a]
                if drafts:
                    out.accepted_logprobs[rid] = row_logprobs[first : first + a]
                    out.accepted_top_logprobs[rid] = row_top[first : first + a]
        return out

    def _sample_plain(self, logits: torch.Tensor, sampling: list[ScheduledRequest],
                      states: dict[str, SamplingState]) -> ModelRunnerOutput:
        """execute() for a step without drafts (every step without speculative decoding): row i
        of the logits is request i's; no per-row bookkeeping."""
        sampled = self.sampler(logits, [states[r.request_id] for r in sampling])
        out = ModelRunnerOutput(sampled=dict(zip([r.request_id for r in sampling], sampled.token_ids)))
        if sampled.logprobs is not None:
            tops = sampled.top_logprobs
            for j, r in enumerate(sampling):
                if states[r.request_id].params.logprobs is not None:
                    out.logprobs[r.request_id] = sampled.logprobs[j]
                    out.top_logprobs[r.request_id] = tops[j] if tops else []
        return out

    def _verify_with_q(self, logits: torch.Tensor, requests: list[ScheduledRequest], first_row: dict[str, int],
                       states: dict[str, SamplingState], draft_probs: dict[str, torch.Tensor]) -> dict[int, int]:
        """Rejection-sample the requests whose drafts came with q; returns {row: token}.
        Requests with the same number of drafts go together; a seeded request draws its k
        uniforms, then 2 (k + 1) for the candidates, from its own generator."""
        vocab = logits.shape[1]
        by_k: dict[int, list[ScheduledRequest]] = {}
        for r in requests:
            by_k.setdefault(len(r.spec_token_ids), []).append(r)
        out: dict[int, int] = {}
        for k, group in by_k.items():
            idx = torch.tensor([first_row[r.request_id] + j for r in group for j in range(k + 1)], device=self.device)
            params = [states[r.request_id].params for r in group for _ in range(k + 1)]
            p = sampling_probs(logits[idx], params).view(len(group), k + 1, vocab)  # [G, k+1, V]
            q = torch.stack([draft_probs[r.request_id][:k] for r in group])  # [G, k, V]
            d = torch.tensor([r.spec_token_ids for r in group], dtype=torch.long, device=self.device)  # [G, k]
            u, noise = [], []
            for r in group:
                gen = states[r.request_id].generator
                u.append(uniforms(gen, (k,), self.device))
                noise.append(draw_uniforms(gen, k + 1, self.device))  # [k+1, 2]
            tokens = rejection_sample(p, q.float(), d, torch.stack(u), torch.stack(noise)).tolist()  # [G, k+1]
            for r, row_tokens in zip(group, tokens):
                for j, token in enumerate(row_tokens):
                    out[first_row[r.request_id] + j] = token
        return out
