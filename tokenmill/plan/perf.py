"""The performance model: a roofline per kernel class, summed over one decode step.

One decode step runs every layer once for `b` sequences (q tokens each, q = 1 without speculation).
On each chip of a tensor-parallel group of size tp (layers split over pp pipeline stages):

    weights   W = streamed_params(b*q) * bits/8 / (tp*pp)        bytes, read once per step
    KV cache  K = b * ctx * kv_bytes_per_token / (min(tp, kv_heads) * pp)
    FLOPs     F = b*q * 2 * active_params / (tp*pp)  (+ attention 4*L*H*d*ctx per token)

    t_gemm = max(W / (BW * e_w), F_gemm / (P * e_c))      # matmuls: bandwidth- or compute-bound
    t_attn = max(K / (BW * e_kv), F_attn / (P16 * e_c))   # attention over the cache
    t_comm = 2 * L/pp * allreduce(b*q * hidden * 2 bytes)  # two per layer (attention, MLP)
    allreduce(n) = 2(p-1)/p * n / (link * e_link) + 2(p-1) * alpha   # ring (Thakur et al. 2005)
    t_stage = t_gemm + t_attn + t_comm + L/pp * layer_overhead
    t_step  = pp * t_stage + (pp-1) * hop + step_overhead            # pp micro-batches in flight

Kernels run one after another, so their roofline times add (a plain max over the whole step would
let attention hide under the weight stream, which it does not). BW, P: datasheet peaks; e_*: the
family's efficiency factors (efficiency.yaml). With every e = 1 and no overheads this is the
physical lower bound. SRAM machines (Groq, Cerebras) use the same formula over all their chips,
with no all-reduce term: their measured per-layer pipeline latency is the layer_overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tokenmill.plan import catalog, cost
from tokenmill.plan.deployment import Deployment
from tokenmill.plan.efficiency import Efficiency
from tokenmill.plan.hardware import Hardware
from tokenmill.plan.model_spec import ModelSpec

ACTIVATION_BYTES = 2  # bf16 activations cross the links


def efficiency_for(hw: Hardware) -> Efficiency:
    eff = catalog.efficiency(hw.family)
    if hw.layer_overhead_us is not None:
        eff = replace(eff, layer_overhead_us=hw.layer_overhead_us)
    return eff


@dataclass(frozen=True)
class Step:
    """One decode step (or one prefill), per chip. Times in seconds, bytes and FLOPs per chip."""

    weight_bytes: float
    kv_bytes: float
    flops: float
    weights_s: float
    kv_s: float
    compute_s: float
    comm_s: float
    overhead_s: float
    total_s: float
    bound: str


@dataclass(frozen=True)
class Prediction:
    """What the planner says about one deployment. Times in ms, memory in GB per chip."""

    fits: bool
    min_chips: int
    memory_per_chip_gb: float
    usable_per_chip_gb: float
    ttft_ms: float
    ms_per_token: float
    tokens_per_s_per_user: float
    tokens_per_s_total: float
    usd_per_million_tokens: float | None
    joules_per_token: float | None
    bound: str
    lower_bound_ms: float
    batch: int
    tp: int
    pp: int
    replicas: int
    dtype: str
    accepted_per_step: float
    decode: Step
    prefill: Step

    def to_json(self) -> dict[str, object]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("decode", "prefill")}
        out["decode"] = self.decode.__dict__
        out["prefill"] = self.prefill.__dict__
        return out


def allreduce_s(n_bytes: float, p: int, hw: Hardware, eff: Efficiency) -> float:
    """Ring all-reduce of n bytes over p chips: 2(p-1)/p * n / bandwidth + 2(p-1) * latency,
    plus the software's fixed cost per collective."""
    if p <= 1:
        return 0.0
    link = hw.interconnect_gbs * 1e9 * eff.link
    alpha = (hw.interconnect_latency_us or 0.0) * 1e-6
    return (
        2 * (p - 1) / p * n_bytes / link + 2 * (p - 1) * alpha + eff.collective_overhead_us * 1e-6
    )


def _step(
    dep: Deployment, eff: Efficiency, seqs: float, q: float, ctx: float, prefill: bool
) -> Step:
    """Roofline time of one forward pass over `seqs` sequences x `q` new tokens at context `ctx`."""
    m, hw = dep.model, dep.hardware
    tp, pp = dep.layout
    sram = hw.is_sram
    micro = max(seqs / pp, 1.0)  # sequences per pipeline micro-batch
    tokens = micro * q
    split = tp * pp
    kv_split = (tp if sram else min(tp, m.kv_heads)) * pp
    w_bytes = m.streamed_params(tokens) * dep.weight_bits / 8 / split
    expert_bytes = (
        m.layers * m.experts_touched(tokens) * m.expert_params * dep.weight_bits / 8 / split
    )
    if m.experts == 1:
        expert_bytes = 0.0
    kv_bytes = micro * ctx * m.kv_bytes_per_token(dep.kv_bits) / kv_split
    # Prefill attention is causal: on average a token sees half the prompt.
    attn_ctx = ctx / 2 if prefill else ctx
    gemm_flops = tokens * m.matmul_flops_per_token() / split
    attn_flops = tokens * m.attention_flops_per_token(attn_ctx) / split
    bw = hw.bandwidth_bytes_per_s
    e_w = eff.weight_bandwidth(dep.weight_bits)
    weights_s = (w_bytes - expert_bytes) / (bw * e_w) + expert_bytes / (
        bw * e_w * eff.expert_bandwidth
    )
    kv_s = kv_bytes / (bw * eff.kv_bandwidth)
    gemm_c = gemm_flops / (hw.flops(dep.dtype) * eff.compute)
    attn_c = attn_flops / (hw.flops("bf16") * eff.compute)
    layers = m.layers / pp
    comm = (
        0.0 if sram else 2 * layers * allreduce_s(tokens * m.hidden * ACTIVATION_BYTES, tp, hw, eff)
    )
    hop = 0.0
    if pp > 1:
        link = max(hw.interconnect_gbs * 1e9 * eff.link, 1.0)
        hop = (
            hw.interconnect_latency_us or 0.0
        ) * 1e-6 + tokens * m.hidden * ACTIVATION_BYTES / link
    overhead_stage = layers * eff.layer_overhead_us * 1e-6
    stage = max(weights_s, gemm_c) + max(kv_s, attn_c) + comm + overhead_stage
    total = pp * stage + (pp - 1) * hop + eff.step_overhead_us * 1e-6
    parts = {
        "memory": pp
        * ((weights_s if weights_s >= gemm_c else 0) + (kv_s if kv_s >= attn_c else 0)),
        "compute": pp * ((gemm_c if gemm_c > weights_s else 0) + (attn_c if attn_c > kv_s else 0)),
        "interconnect": pp * comm + (pp - 1) * hop,
        "overhead": pp * overhead_stage + eff.step_overhead_us * 1e-6,
    }
    return Step(
        weight_bytes=w_bytes,
        kv_bytes=kv_bytes,
        flops=gemm_flops + attn_flops,
        weights_s=pp * weights_s,
        kv_s=pp * kv_s,
        compute_s=pp * (gemm_c + attn_c),
        comm_s=parts["interconnect"],
        overhead_s=parts["overhead"],
        total_s=total,
        bound=max(parts, key=parts.__getitem__),
    )


def memory_per_chip_bytes(dep: Deployment) -> float:
    """Weights (all of them, embedding included) + KV reserved for the full context of every
    sequence of a replica, per chip. Draft weights, if any, sit on every chip of the group."""
    m, hw = dep.model, dep.hardware
    tp, pp = dep.layout
    kv_split = (tp if hw.is_sram else min(tp, m.kv_heads)) * pp
    weights = m.weight_bytes(dep.weight_bits) / (tp * pp)
    kv = dep.batch_per_replica * dep.max_context * m.kv_bytes_per_token(dep.kv_bits) / kv_split
    draft = dep.draft.weight_bytes(dep.weight_bits) / (tp * pp) if dep.draft else 0.0
    return weights + kv + draft


def fits(dep: Deployment, eff: Efficiency | None = None) -> bool:
    eff = eff or efficiency_for(dep.hardware)
    return memory_per_chip_bytes(dep) <= dep.hardware.memory_bytes * eff.memory_usable


def min_chips(dep: Deployment, eff: Efficiency | None = None, limit: int = 1_000_000) -> int:
    """Fewest chips (default layout, same batch and context) whose usable memory holds it."""
    eff = eff or efficiency_for(dep.hardware)
    m = dep.model
    total = m.weight_bytes(dep.weight_bits) + dep.batch * dep.max_context * m.kv_bytes_per_token(
        dep.kv_bits
    )
    start = max(1, math.ceil(total / (dep.hardware.memory_bytes * eff.memory_usable)))
    hw = dep.hardware
    # Beyond tp_domain chips per stage and one layer per stage there is no layout left to try.
    stop = limit if hw.is_sram else min(limit, hw.tp_domain * m.layers + 1)
    if not hw.is_sram and hw.interconnect_gbs <= 0:
        stop = min(stop, start + 1)  # replicas add no memory: one chip holds it or nothing does
    for n in range(start, max(stop, start + 1)):
        trial = replace(dep, chips=n, tp=0, pp=0)
        try:
            if fits(trial, eff):
                return n
        except ValueError:
            continue
    raise ValueError(f"{m.name} does not fit on any layout of up to {stop - 1} x {hw.id}")


def physical_min_chips(
    model: ModelSpec, hw: Hardware, weight_bits: float, kv_bytes: float = 0.0
) -> int:
    """Fewest chips whose entire memory could hold the weights (+ kv_bytes): ceil(bytes / capacity)."""
    return math.ceil((model.weight_bytes(weight_bits) + kv_bytes) / hw.memory_bytes)


def lower_bound_s(
    model: ModelSpec,
    hw: Hardware,
    chips: int,
    weight_bits: float,
    kv_bits: float,
    batch: int,
    ctx: float,
) -> float:
    """Physics only: one decode step can not beat max(bytes / (chips * BW), FLOPs / (chips * P))
    with every chip's full bandwidth and its fastest matmul dtype, no overhead, free links."""
    bytes_ = model.streamed_params(
        batch
    ) * weight_bits / 8 + batch * ctx * model.kv_bytes_per_token(kv_bits)
    flops = batch * (model.matmul_flops_per_token() + model.attention_flops_per_token(ctx))
    peak = max(hw.flops(d) for d in hw.tflops)
    return max(bytes_ / (chips * hw.bandwidth_bytes_per_s), flops / (chips * peak))


def predict(dep: Deployment, eff: Efficiency | None = None) -> Prediction:
    """Every number of a plan for one deployment (see the module docstring for the formulas)."""
    eff = eff or efficiency_for(dep.hardware)
    hw, m = dep.hardware, dep.model
    tp, pp = dep.layout
    b = dep.batch_per_replica
    decode = _step(dep, eff, b, dep.tokens_per_verify, dep.mean_context, prefill=False)
    draft_s = 0.0
    if dep.draft and dep.spec_tokens:
        draft_dep = replace(dep, model=dep.draft, spec_tokens=0, draft=None)
        draft_s = dep.spec_tokens * _step(draft_dep, eff, b, 1, dep.mean_context, False).total_s
    step_s = decode.total_s + draft_s
    accepted = dep.accepted_per_step
    prefill = _step(dep, eff, 1, dep.input_len, dep.input_len, prefill=True)
    # Continuous batching: every output_len tokens a sequence is replaced, and its prompt is
    # prefilled in big compute-bound batches: input_len * FLOPs/token over the group's compute.
    prompt_flops = dep.input_len * (
        m.matmul_flops_per_token() + m.attention_flops_per_token(dep.input_len / 2)
    )
    group_flops = tp * pp * hw.flops(dep.dtype) * eff.compute
    prefill_share_s = (b / dep.output_len) * prompt_flops / group_flops
    # every running sequence advances `accepted` tokens per step; only `batch` sequences run (a
    # batch that does not divide over the replicas leaves some replicas a sequence short)
    total_tps = dep.batch * accepted / (step_s + prefill_share_s)
    ms_per_token = step_s / accepted * 1e3
    price = hw.price.usd_per_hour if hw.price else None
    bound = decode.bound if not hw.is_sram else f"{decode.bound} (sram pipeline)"
    return Prediction(
        fits=fits(dep, eff),
        min_chips=min_chips(dep, eff),
        memory_per_chip_gb=memory_per_chip_bytes(dep) / 1e9,
        usable_per_chip_gb=hw.memory_gb * eff.memory_usable,
        ttft_ms=prefill.total_s * 1e3,
        ms_per_token=ms_per_token,
        tokens_per_s_per_user=1e3 / ms_per_token,
        tokens_per_s_total=total_tps,
        usd_per_million_tokens=None
        if price is None
        else cost.usd_per_million_tokens(dep.chips, price, total_tps),
        joules_per_token=None
        if hw.power_w is None
        else cost.joules_per_token(dep.chips, hw.power_w, total_tps),
        bound=bound,
        lower_bound_ms=1e3
        * lower_bound_s(
            m, hw, dep.chips, dep.weight_bits, dep.kv_bits, dep.batch, dep.mean_context
        ),
        batch=dep.batch,
        tp=tp,
        pp=pp,
        replicas=dep.replicas,
        dtype=dep.dtype,
        accepted_per_step=accepted,
        decode=decode,
        prefill=prefill,
    )


def batch_candidates(limit: int) -> list[int]:
    sizes, b = [], 1
    while b < limit:
        sizes.append(b)
        b = b * 2 if b < 8 else int(b * 1.25) + 1
    return [*sizes, limit]


def largest_fitting_batch(dep: Deployment, eff: Efficiency | None = None, cap: int = 65536) -> int:
    """Largest total batch whose KV cache still fits (0 if even batch 1 does not)."""
    eff = eff or efficiency_for(dep.hardware)
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(replace(dep, batch=mid), eff):
            lo = mid
        else:
            hi = mid - 1
    return lo


def best_batch(
    dep: Deployment, eff: Efficiency | None = None, max_ms_per_token: float | None = None
) -> int:
    """`--batch max`: among batches that fit (and meet max_ms_per_token, if given), the smallest
    one reaching 99% of the best total throughput (larger batches only add latency)."""
    eff = eff or efficiency_for(dep.hardware)
    limit = largest_fitting_batch(dep, eff)
    if limit == 0:
        return 1
    scored = []
    for b in batch_candidates(limit):
        p = predict(replace(dep, batch=b), eff)
        if max_ms_per_token is None or p.ms_per_token <= max_ms_per_token:
            scored.append((b, p.tokens_per_s_total))
    if not scored:
        return 1
    best = max(t for _, t in scored)
    return min(b for b, t in scored if t >= 0.99 * best)
