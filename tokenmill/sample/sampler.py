"""Batched sampler: one row of logits per request in, one token (and its logprobs) per request out.

One call per engine step. The pipeline, in vLLM's order:

    raw logits [N, V] ──► logprobs (of the raw logits: before anything below)
        │
        ├─► suppress      min_tokens: the caller's suppress_token_ids → -inf
        ├─► penalties     repetition (prompt + output), presence and frequency (output only)
        ├─► greedy rows:  argmax
        └─► random rows:  / temperature ─► min-p, top-k, top-p (one cutoff per row) ─► draw

Sampling draws from the softmax of x / T by inverting its cumulative distribution in two
stages, with two uniforms per row instead of a noise value per vocabulary entry (V of them: the
exponential race, which costs ~7x more on CPU at batch 64, most of it in the RNG):

    w = softmax(x / T)                             float32, 0 where filtered (-inf)
    block b (256 ids) with probability W_b / W,    W_b = sum of its w_i
    id i within b with probability w_i / W_b

Each stage takes the first index whose cumulative mass, summed in float64, reaches (1 - u) ·
total, so an id of zero mass is never taken and the weights need not sum to 1 (`categorical`).
A block's mass is a float32 sum of 256 values (relative error ~1e-6 of its own mass, as exp's):
a float32 running sum over the whole vocabulary would instead err by ~1e-7 of the total per
step, more than the mass of the unlikely ids.

Batch invariance (a seeded request samples the same tokens alone or in any batch): every
operation on a row depends only on that row and its own params. Filters a row does not ask for
are exact no-ops (cutoff -inf, penalty factor 1 and 0), and the row's noise is drawn from its
own generator, two float64 uniforms per step, whatever its position in the batch. Rows without a
generator share the global RNG. Greedy rows draw nothing.

The sampler never mutates `logits`, and syncs with the device once per call: the final
transfer of tokens and logprobs to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.sampling_params import SamplingParams

_NEG_INF = float("-inf")
# x / T must stay finite in float32 for ordinary logits (|x| < 1e3): clamp T from below.
_MIN_TEMPERATURE = 1e-6
# top-p on CPU looks for the nucleus among the top 64 logits, then (rows whose nucleus is
# longer) the top 1024, before sorting a whole row: at batch 64 over a 49k vocabulary topk
# costs 2.2 ms for 64, 12.7 ms for 1024, and a full sort ~95 ms.
_TOP_P_CANDIDATES = (64, 1024)


@dataclass(eq=False)
class SamplingState:
    """Everything the sampler needs about one request; owned by the request, lives across steps.

    The runner appends each sampled token to `output_token_ids` itself (append-only; if the
    list ever shrinks, the penalty cache is rebuilt) and sets `suppress_token_ids` before each
    step (the stop/eos ids while fewer than `params.min_tokens` tokens are out, else empty).
    `generator` must live on the logits' device; `SamplingState.new` makes it from the seed.
    The sampler advances `generator` and writes the private penalty cache, nothing else.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    suppress_token_ids: set[int] = field(default_factory=set)
    # Penalty cache, only for requests with penalties: [V] float32 count of each output token,
    # [V] bool "token is in the prompt", and how many output tokens the counts include.
    _output_counts: torch.Tensor | None = field(default=None, init=False, repr=False)
    _prompt_mask: torch.Tensor | None = field(default=None, init=False, repr=False)
    _num_counted: int = field(default=0, init=False, repr=False)

    @classmethod
    def new(
        cls,
        params: SamplingParams,
        prompt_token_ids: list[int],
        device: torch.device | str = "cpu",
    ) -> SamplingState:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        return cls(params=params, prompt_token_ids=list(prompt_token_ids), generator=generator)

    @property
    def has_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


@dataclass(frozen=True)
class SamplerOutput:
    """One step's result, rows in the order of the states passed in.

    token_ids:    [N] sampled ids.
    logprobs:     [N] logprob of each sampled token under log_softmax(raw logits) (before
                  suppression, penalties and temperature), or None when no row asked.
    top_logprobs: per row, the params.logprobs most likely (id, logprob), most likely first;
                  [] for rows that did not ask (or asked for 0); None when no row asked.
    """

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


class Sampler:
    """Stateless: per-request state lives in SamplingState."""

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        n = logits.shape[0]  # N rows, one per state; [N, V] logits
        if n != len(states):
            raise ValueError(f"got {n} rows of logits for {len(states)} sampling states")
        if n == 0:
            return SamplerOutput([], None, None)
        raw = logits.float()
        device = raw.device

        x = _suppress(raw, states)
        pen_rows = [i for i, s in enumerate(states) if s.has_penalties]
        if pen_rows:
            idx = _rows_tensor(pen_rows, n, device)
            penalised = apply_penalties(_take(x, idx), [states[i] for i in pen_rows])
            x = penalised if idx is None else x.index_copy(0, idx, penalised)

        greedy_rows = [i for i, s in enumerate(states) if s.params.greedy]
        random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if not random_rows:
            tokens = x.argmax(-1)
        elif not greedy_rows:
            tokens = _sample_random(x, states)
        else:
            g_idx = _to_device(greedy_rows, torch.long, device)
            r_idx = _to_device(random_rows, torch.long, device)
            tokens = torch.empty(n, dtype=torch.long, device=device)
            tokens.index_copy_(0, g_idx, x.index_select(0, g_idx).argmax(-1))
            sampled = _sample_random(x.index_select(0, r_idx), [states[i] for i in random_rows])
            tokens.index_copy_(0, r_idx, sampled)

        return _to_host(raw, tokens, states)


# ---------------------------------------------------------------------------------------------
# logits processors


def _suppress(x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Set each row's suppress_token_ids to -inf (out of place: `x` is the caller's)."""
    vocab = x.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        if not s.suppress_token_ids:
            continue
        ids = [t for t in s.suppress_token_ids if 0 <= t < vocab]
        rows += [i] * len(ids)
        cols += ids
    if not cols:
        return x
    index = _to_device([rows, cols], torch.long, x.device)  # [2, K]
    return x.index_put((index[0], index[1]), x.new_full((), _NEG_INF))  # a fill: no host copy


def apply_penalties(x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Penalise logits x [P, V], row j for states[j]; returns a new tensor, x is untouched.

    repetition (HF/vLLM): seen = in prompt or output; x > 0 → x / r, else x · r.
    presence, frequency (OpenAI): x - frequency · count(output) - presence · [count > 0].
    Brings each state's penalty cache up to date with its output_token_ids.
    """
    vocab = x.shape[1]
    counts = _output_counts(states, vocab, x.device)  # [P, V] float32
    in_output = counts > 0  # [P, V]
    factors = _to_device(
        [
            [s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty]
            for s in states
        ],
        torch.float32,
        x.device,
    )  # [P, 3]
    rep, presence, frequency = (f.unsqueeze(1) for f in factors.unbind(1))  # each [P, 1]
    if any(s.params.repetition_penalty != 1 for s in states):
        seen = in_output | _prompt_masks(states, vocab, x.device)  # [P, V]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    return x - frequency * counts - presence * in_output


def _output_counts(states: list[SamplingState], vocab: int, device: torch.device) -> torch.Tensor:
    """[P, V] float32 count of each token in each state's output; brings the caches up to date.

    Each state caches its counts as a row view of the last stacked tensor, so one step costs one
    stack, one scatter of the new tokens (usually one per row) and no per-row kernels.
    """
    base: list[torch.Tensor | None] = []
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        cached = s._output_counts
        if (
            cached is None
            or cached.shape[0] != vocab
            or cached.device != device
            or s._num_counted > len(s.output_token_ids)
        ):
            cached, s._num_counted = None, 0
        base.append(cached)
        new = s.output_token_ids[s._num_counted :]
        rows += [i] * len(new)
        cols += new
    if all(b is None for b in base):
        counts = torch.zeros(len(states), vocab, dtype=torch.float32, device=device)
    else:
        zero = torch.zeros(vocab, dtype=torch.float32, device=device)
        counts = torch.stack([zero if b is None else b for b in base])
    if cols:
        index = _to_device([rows, cols], torch.long, device)  # [2, K]
        ones = torch.ones(len(cols), dtype=torch.float32, device=device)
        counts.index_put_((index[0], index[1]), ones, accumulate=True)
    for s, row in zip(states, counts.unbind(0)):
        s._output_counts, s._num_counted = row, len(s.output_token_ids)
    return counts


def _prompt_masks(states: list[SamplingState], vocab: int, device: torch.device) -> torch.Tensor:
    """[P, V] bool "token in prompt", built once per request that has a repetition penalty."""
    fresh = [
        s
        for s in states
        if s.params.repetition_penalty != 1
        and (
            s._prompt_mask is None
            or s._prompt_mask.shape[0] != vocab
            or s._prompt_mask.device != device
        )
    ]
    if fresh:
        masks = torch.zeros(len(fresh), vocab, dtype=torch.bool, device=device)
        rows = [i for i, s in enumerate(fresh) for _ in s.prompt_token_ids]
        cols = [t for s in fresh for t in s.prompt_token_ids]
        if cols:
            index = _to_device([rows, cols], torch.long, device)
            masks.index_put_((index[0], index[1]), masks.new_ones(()))
        for s, row in zip(fresh, masks.unbind(0)):
            s._prompt_mask = row
    none = torch.zeros(vocab, dtype=torch.bool, device=device)
    return torch.stack(
        [
            s._prompt_mask
            if s.params.repetition_penalty != 1 and s._prompt_mask is not None
            else none
            for s in states
        ]
    )


# ---------------------------------------------------------------------------------------------
# random sampling


def _sample_random(x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """x [R, V] penalised logits of rows that sample; returns [R] token ids."""
    r, vocab = x.shape
    device = x.device
    params = [s.params for s in states]
    knobs = _to_device(
        [[max(p.temperature, _MIN_TEMPERATURE), p.min_p, p.top_p] for p in params],
        torch.float32,
        device,
    )  # [R, 3]
    temperature, min_p, top_p = knobs.unbind(1)  # each [R]
    x = x / temperature.unsqueeze(1)

    # min-p and top-k both keep "x >= a per-row cutoff"; disabled rows get -inf.
    # min-p: p_i >= min_p · p_max  ⇔  x_i >= x_max + log(min_p)   (log 0 = -inf)
    cutoff: torch.Tensor | None = None
    if any(p.min_p > 0 for p in params):
        cutoff = x.amax(-1) + min_p.log()  # [R]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        k = _to_device(ks, torch.long, device)  # [R], 0 = off
        top = x.topk(max(ks), dim=-1).values  # [R, max k], descending
        kth = top.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # [R]
        kth = kth.masked_fill(k == 0, _NEG_INF)
        cutoff = kth if cutoff is None else torch.maximum(cutoff, kth)

    # top-p on what min-p/top-k left: a third cutoff, never below theirs.
    p_rows = [i for i, p in enumerate(params) if p.top_p < 1]
    if p_rows:
        idx = _rows_tensor(p_rows, r, device)
        xp = _take(x, idx)  # [P, V]
        if cutoff is not None:
            xp = xp.masked_fill(xp < _take(cutoff, idx).unsqueeze(1), _NEG_INF)
        nucleus = top_p_cutoff(xp, _take(top_p, idx))  # [P]
        if cutoff is None:
            cutoff = x.new_full((r,), _NEG_INF)
        if idx is None:
            cutoff = torch.maximum(cutoff, nucleus)
        else:
            cutoff = cutoff.index_copy(0, idx, torch.maximum(cutoff[idx], nucleus))

    if cutoff is not None:
        x = x.masked_fill(x < cutoff.unsqueeze(1), _NEG_INF)

    return categorical(x.softmax(-1), _row_uniforms(states, device))  # softmax: 0 where filtered


def _row_uniforms(states: list[SamplingState], device: torch.device) -> torch.Tensor:
    """[R, 2] float64 uniforms: a seeded row draws its two from its own generator, wherever it
    sits; the others come from the global RNG in one call."""
    unseeded = [i for i, s in enumerate(states) if s.generator is None]
    if len(unseeded) == len(states):
        return draw_uniforms(None, len(states), device)
    u = torch.empty(len(states), UNIFORMS_PER_ROW, dtype=torch.float64, device=device)
    if unseeded:
        u[_to_device(unseeded, torch.long, device)] = draw_uniforms(None, len(unseeded), device)
    for i, s in enumerate(states):
        if s.generator is not None:
            u[i] = draw_uniforms(s.generator, 1, device)[0]
    return u


UNIFORMS_PER_ROW = 2  # what one sampled row draws from its generator (float64)
_BLOCK = 256  # ids per block of the first stage


def draw_uniforms(generator: torch.Generator | None, rows: int, device: torch.device) -> torch.Tensor:
    """[rows, 2] float64 uniforms in [0, 1) for `categorical`, from `generator` or the global RNG."""
    return torch.rand(rows, UNIFORMS_PER_ROW, dtype=torch.float64, generator=generator, device=device)


def categorical(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with probability w_i / sum(w) in each row: weights [..., V] >= 0 (each row with
    some positive weight; rows need not be normalised), u [..., 2] from `draw_uniforms`.
    Returns [...] long. Two stages (module docstring): a block of ids by its mass, then an id
    within it; block masses are float32 sums of 256 weights, every cumulative sum is float64."""
    *lead, vocab = weights.shape
    w = weights.reshape(-1, vocab)
    m, blocks = w.shape[0], -(-vocab // _BLOCK)
    if blocks * _BLOCK != vocab:
        w = torch.nn.functional.pad(w, (0, blocks * _BLOCK - vocab))  # zero mass: never taken
    wb = w.view(m, blocks, _BLOCK)
    u = u.reshape(m, UNIFORMS_PER_ROW)
    block = _first_reaching(wb.sum(-1).to(torch.float64).cumsum(-1), u[:, 0])  # [M]
    rows = torch.arange(m, device=w.device)
    within = _first_reaching(wb[rows, block].to(torch.float64).cumsum(-1), u[:, 1])  # [M]
    return (block * _BLOCK + within).clamp_(max=vocab - 1).view(lead)


def _first_reaching(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """cdf [M, K] cumulative masses, u [M]: per row the first index whose cumulative mass reaches
    (1 - u) · total, in (0, total] for u in [0, 1); so its own mass is positive."""
    target = (1 - u) * cdf[:, -1]
    return torch.searchsorted(cdf, target.unsqueeze(1)).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def top_p_cutoff(
    x: torch.Tensor, top_p: torch.Tensor, candidates: tuple[int, ...] = _TOP_P_CANDIDATES
) -> torch.Tensor:
    """[P] smallest logit of each row's nucleus: the most likely tokens whose mass before them is
    < top_p (at least one). x [P, V] logits (-inf = excluded), top_p [P].

    On CPU, where the host may look at values for free, the nucleus is first sought among each
    row's top candidates[0] logits, rows whose nucleus reaches past them among the next count's,
    and only rows past every count sort the full row. All paths compute the same prefix of the
    same cumulative sum (a sequential cumsum: its first k values do not depend on the length),
    so the result does not depend on the path. On accelerators, always the full sort: deciding
    per row would stall the stream, and sorting is cheap there. candidates=() sorts everywhere.
    """
    lse = x.logsumexp(-1, keepdim=True)  # [P, 1]

    def nucleus(sorted_x: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor):
        probs = (sorted_x - lse).exp()  # [P, K] descending
        mass_before = probs.cumsum(-1) - probs  # [P, K]
        keep = (mass_before < top_p.unsqueeze(1)).sum(-1)  # [P], >= 1 tokens in the nucleus
        return sorted_x.gather(1, (keep - 1).unsqueeze(1)).squeeze(1), keep

    vocab = x.shape[1]
    counts = [k for k in candidates if k < vocab] if x.device.type == "cpu" else []
    if not counts:
        return nucleus(x.sort(dim=-1, descending=True).values, lse, top_p)[0]
    cut, keep = nucleus(x.topk(counts[0], dim=-1).values, lse, top_p)  # topk: descending
    rows = (keep == counts[0]).nonzero().flatten()  # rows whose nucleus may go past the candidates
    for k in counts[1:]:
        if not len(rows):
            return cut
        cut[rows], keep = nucleus(x[rows].topk(k, dim=-1).values, lse[rows], top_p[rows])
        rows = rows[keep == k]
    if len(rows):
        cut[rows] = nucleus(x[rows].sort(dim=-1, descending=True).values, lse[rows], top_p[rows])[0]
    return cut


# ---------------------------------------------------------------------------------------------
# results


def _to_host(raw: torch.Tensor, tokens: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
    """Gather tokens and logprobs into one float64 vector and bring it over in one transfer
    (ids < 2^53 are exact in float64)."""
    n = len(states)
    asked = [s.params.logprobs for s in states]
    if all(a is None for a in asked):
        return SamplerOutput(tokens.tolist(), None, None)
    lse = raw.logsumexp(-1)  # [N]
    sampled = raw.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse  # [N]
    parts = [tokens.double(), sampled.double()]
    top_rows = [i for i, a in enumerate(asked) if a]
    top_n = max((a for a in asked if a), default=0)
    if top_rows:
        idx = _rows_tensor(top_rows, n, raw.device)
        values, ids = _take(raw, idx).topk(top_n, dim=-1)  # [T, top_n], descending
        values = values - _take(lse, idx).unsqueeze(1)
        parts += [ids.double().flatten(), values.double().flatten()]
    flat = torch.cat(parts).tolist()  # the one device → host transfer

    token_ids = [int(t) for t in flat[:n]]
    logprobs = flat[n : 2 * n]
    top: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    k = len(top_rows) * top_n
    ids_flat, values_flat = flat[2 * n : 2 * n + k], flat[2 * n + k :]
    for j, i in enumerate(top_rows):
        want = asked[i] or 0
        lo = j * top_n
        top[i] = [(int(ids_flat[lo + c]), values_flat[lo + c]) for c in range(want)]
    return SamplerOutput(token_ids, logprobs, top)


# ---------------------------------------------------------------------------------------------
# helpers


def _to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list → device tensor without stalling the stream (pinned, non-blocking on CUDA)."""
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _rows_tensor(rows: list[int], n: int, device: torch.device) -> torch.Tensor | None:
    """Row indices as a device tensor, or None when they are all n rows in order."""
    return None if len(rows) == n else _to_device(rows, torch.long, device)


def _take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x.index_select(0, idx)
