"""When speculation pays, and how many drafts: a cost model measured on this machine.

At small batches a pass is bound by bytes (every weight streams through once), so scoring
k + 1 tokens per request costs about as much as scoring one and speculation is nearly free.
As the batch grows the pass becomes bound by compute, the extra k tokens per request cost
their full FLOPs, and speculation loses. Two measured things decide:

    cost(B, j)  a step with B requests in decode, j drafts each, relative to j = 0 (>= 1):
                the target pass, measured at start-up for j = 0, 1 and k at B = 1, 4, 16, ...
                and interpolated (the first draft can cost most: on a CPU one token per request
                runs a matrix-vector kernel, two or more a matrix-matrix one), plus j passes of
                the draft model if there is one
    alpha       the chance a draft is accepted given the ones before it were, estimated online
                per request (accepted / (accepted + rejections), decayed so it follows the
                text), shrunk towards the estimate over all requests

Expected tokens per pass with j drafts, each accepted with probability alpha independently
(Leviathan et al. 2023, eq. 1):   E(j) = (1 - alpha^(j+1)) / (1 - alpha)

Each request gets the j in 0..k that maximises the predicted speedup E(j) / cost(B, j), and
none unless that beats plain decoding by MIN_GAIN (the model leaves out the engine's own
per-token work). Speculation switching off or back on for the whole batch is logged once per
transition. A fixed `max_batch` replaces
the model: k drafts while at most max_batch requests run, none above.

The measurement takes a few passes per batch size (seconds on a CPU) and is kept in the user
cache dir (spec_cost.json, keyed by machine, model, dtype, device, k and threads), so only the
first engine of a kind pays for it; delete the file to measure again.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from tokenmill.outputs import ScheduledRequest, SchedulerOutput

log = logging.getLogger("tokenmill.spec")

_PRIOR_ALPHA = 0.6  # before any evidence: optimistic enough to try
_PRIOR_WEIGHT = 20.0  # the prior counts as this many reached drafts
_DECAY = 0.99  # per step: evidence older than ~100 steps fades back towards the prior
_REQUEST_PRIOR_WEIGHT = 4.0  # a request's own evidence outweighs everyone's after a few passes
_REQUEST_DECAY = 0.97  # per step of that request: a failing request retries after ~30-50 steps
_CONTEXT = 64  # tokens of context per request while measuring
MIN_GAIN = 1.05


def expected_tokens(alpha: float, k: int) -> float:
    """E[tokens per pass] with k drafts, each accepted with probability alpha (Leviathan eq. 1)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass(frozen=True)
class PassCost:
    """Median seconds of one target pass with B requests in decode: one token each (plain),
    2 tokens each (one_s: one draft) and 1 + k tokens each (spec), and of one draft-model pass
    of one token each (draft; None for proposers without a model), at the measured batches."""

    k: int
    batches: tuple[int, ...]
    plain_s: tuple[float, ...]
    spec_s: tuple[float, ...]
    one_s: tuple[float, ...] | None = None  # None: linear in j from plain to spec
    draft_s: tuple[float, ...] | None = None

    def _at(self, values: list[float], batch: int) -> float:
        """Interpolate per-batch values in log2(B); held constant past the measured ends."""
        x = math.log2(max(batch, 1))
        xs = [math.log2(b) for b in self.batches]
        if x <= xs[0]:
            return values[0]
        if x >= xs[-1]:
            return values[-1]
        i = next(i for i in range(1, len(xs)) if x <= xs[i])
        t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return values[i - 1] + t * (values[i] - values[i - 1])

    def relative(self, batch: int, drafts: int) -> float:
        """cost(B, j): a step with `drafts` per request over a plain step. The target's cost is
        linear in j between the measured j = 1 and j = k; the draft model adds j of its passes."""
        if drafts == 0:
            return 1.0
        ratio_k = self._at([max(s / p, 1.0) for s, p in zip(self.spec_s, self.plain_s)], batch)
        if self.one_s is None or self.k == 1:
            cost = 1 + (ratio_k - 1) * drafts / self.k
        else:
            ratio_1 = self._at([max(o / p, 1.0) for o, p in zip(self.one_s, self.plain_s)], batch)
            cost = ratio_1 + (max(ratio_k, ratio_1) - ratio_1) * (drafts - 1) / (self.k - 1)
        if self.draft_s is not None:
            cost += drafts * self._at([d / p for d, p in zip(self.draft_s, self.plain_s)], batch)
        return cost

    def best_k(self, batch: int, alpha: float) -> tuple[int, float]:
        """(j, predicted speedup) maximising E(j) / cost(B, j) over j in 0..k; (0, 1.0) unless
        the best beats MIN_GAIN."""
        j, gain = max(((j, expected_tokens(alpha, j) / self.relative(batch, j)) for j in range(1, self.k + 1)),
                      key=lambda t: t[1])
        return (j, gain) if gain >= MIN_GAIN else (0, 1.0)

    def break_even_batch(self, alpha: float) -> int:
        """The largest measured batch at which speculation still pays at this acceptance (0: none)."""
        paying = [b for b in self.batches if self.best_k(b, alpha)[0] > 0]
        return max(paying, default=0)


CACHE_FILE = "spec_cost.json"  # in the user cache dir, beside the bandwidth probe's


def _cache_path():
    from tokenmill.bench.bandwidth import cache_dir

    return cache_dir() / CACHE_FILE


def cached_pass_cost(key: str) -> PassCost | None:
    """A measurement kept for this key (machine, model, dtype, k, ...), or None."""
    try:
        entry = json.loads(_cache_path().read_text()).get(key)
    except (OSError, ValueError):
        return None
    if entry is None:
        return None
    return PassCost(**{f: tuple(v) if isinstance(v, list) else v for f, v in entry.items()})


def _store(key: str, cost: PassCost) -> None:
    path = _cache_path()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        data = {}
    data[key] = asdict(cost)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
    except OSError as e:  # a read-only home is no reason to fail: we just measure again next time
        log.debug("speculation: could not keep the pass cost in %s: %s", path, e)


def measure_pass_cost(runner, k: int, max_batch: int, num_blocks: int, block_size: int,
                      draft_runner=None, key: str | None = None, repeats: int = 3,
                      seconds_per_batch: float = 2.0) -> PassCost:
    """Time plain and speculative passes of `runner` (and one-token passes of `draft_runner`)
    at B = 1, 4, 16, 64, 256 (<= max_batch): median of up to `repeats` rounds, fewer once a
    batch size has taken `seconds_per_batch`. Both pools need num_blocks blocks. With a `key`
    the result is kept in the user cache dir and later engines reuse it.

    Uses blocks of the KV pools as scratch (call it before any request runs: the blocks are
    left holding finite KV of dummy tokens, which nothing references)."""
    if key is not None and (cached := cached_pass_cost(key)) is not None:
        return cached
    per_request = -(-(_CONTEXT + k + 1) // block_size)
    limit = min(max_batch, num_blocks // per_request)
    batches = [b for b in (1, 4, 16, 64, 256) if b <= limit] or [1]
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)

    def sched(b: int, n: int) -> SchedulerOutput:
        return SchedulerOutput([
            ScheduledRequest(f"calib-{i}", [1] * n, _CONTEXT,
                             list(range(i * per_request, (i + 1) * per_request)), True, [1] * (n - 1))
            for i in range(b)
        ])

    def timed(r, s: SchedulerOutput) -> float:
        sync()
        t0 = time.perf_counter()
        r.compute_logits(s)
        sync()
        return time.perf_counter() - t0

    for r in (runner, draft_runner):
        if r is not None:
            timed(r, sched(batches[0], k + 1))  # warm-up
    columns: list[list[float]] = [[], [], [], []]  # plain, one draft, k drafts, draft model
    for b in batches:
        shapes = [(runner, sched(b, 1)), (runner, sched(b, 2)), (runner, sched(b, k + 1))]
        if draft_runner is not None:
            shapes.append((draft_runner, shapes[0][1]))
        times: list[list[float]] = []
        t0 = time.perf_counter()
        while len(times) < repeats and (not times or time.perf_counter() - t0 < seconds_per_batch):
            times.append([timed(r, s) for r, s in shapes])
        for i in range(len(shapes)):
            columns[i].append(statistics.median(t[i] for t in times))
    plain, one, spec, draft = (tuple(c) for c in columns)
    cost = PassCost(k, tuple(batches), plain, spec, one, draft or None)
    log.info("speculation: step cost with %d drafts/request vs plain, by batch: %s", k,
             ", ".join(f"B={b}: {cost.relative(b, k):.2f}x" for b in batches))
    if key is not None:
        _store(key, cost)
    return cost


@dataclass
class Acceptance:
    """Decayed evidence of how often drafts are accepted. A pass that kept a of its k drafts
    *reached* a + 1 of them (all k if a == k): alpha = accepted / reached is the maximum
    likelihood estimate of the per-draft acceptance under the geometric model."""

    accepted: float = 0.0
    reached: float = 0.0

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        self.accepted += num_accepted
        self.reached += num_accepted + (num_accepted < num_drafts)

    def decay(self, factor: float) -> None:
        self.accepted *= factor
        self.reached *= factor

    def alpha(self, prior: float, weight: float) -> float:
        """The estimate, shrunk towards `prior` as if `weight` drafts had been reached at it."""
        return (self.accepted + prior * weight) / (self.reached + weight)


class SpecController:
    """Decides how many drafts each request gets, step by step.

    Per step: `begin_step(batch)`, which decides for the batch as a whole (the cost at this batch
    size with everyone's acceptance; transitions are logged and counted), then `drafts(request)`
    for each request that may speculate: its own acceptance, shrunk towards everyone's, in the
    same cost model, within the batch's decision. `observe` learns from every verification
    pass. A request whose drafts keep failing stops speculating (not logged); its evidence fades
    within tens of steps and it tries again."""

    def __init__(self, k: int, cost: PassCost | None = None, max_batch: int | None = None,
                 adaptive: bool = True) -> None:
        self.k = k
        self.cost = cost if adaptive and max_batch is None else None
        self.max_batch = max_batch if adaptive else None
        self.acceptance = Acceptance()  # every pass of every request: each request's prior
        self.current = k  # the batch's decision in the latest step (0: off)
        self.num_switches = 0
        self._batch = 1

    @property
    def alpha(self) -> float:
        return self.acceptance.alpha(_PRIOR_ALPHA, _PRIOR_WEIGHT)

    def observe(self, request: Acceptance | None, num_drafts: int, num_accepted: int) -> None:
        """One request's pass: num_accepted of its num_drafts drafts were kept."""
        self.acceptance.observe(num_drafts, num_accepted)
        if request is not None:
            request.observe(num_drafts, num_accepted)

    def begin_step(self, batch: int) -> int:
        """The batch's decision for a step with `batch` requests running: drafts per request."""
        self.acceptance.decay(_DECAY)
        self._batch = batch
        if self.max_batch is not None:
            k = self.k if batch <= self.max_batch else 0
            why = f"{batch} requests running, threshold {self.max_batch}"
        elif self.cost is not None:
            k, gain = self.cost.best_k(batch, self.alpha)
            why = (f"{batch} requests running, acceptance {self.alpha:.2f}, predicted {gain:.2f}x; "
                   f"a step with {self.k} drafts costs {self.cost.relative(batch, self.k):.2f}x a plain one")
        else:
            k, why = self.k, ""
        if (k == 0) != (self.current == 0):
            self.num_switches += 1
            log.info("speculation %s (%s)", "off" if k == 0 else f"on, up to {k} drafts", why)
        self.current = k
        return k

    def drafts(self, request: Acceptance) -> int:
        """Drafts for one request this step (0: none), after `begin_step`."""
        if self.current == 0 or self.cost is None:
            return self.current
        request.decay(_REQUEST_DECAY)
        return self.cost.best_k(self._batch, request.alpha(self.alpha, _REQUEST_PRIOR_WEIGHT))[0]
