"""Scheduler: continuous batching that hands out tokens, not phases.

Every step the running requests are served first (in arrival order), then waiting requests
join while `max_num_seqs` and the token budget allow. A request gets
min(num_tokens - num_computed_tokens, budget left) tokens, so a long prompt is split over steps
(chunked prefill) and never stalls the running decodes. When the pool runs out of blocks the
newest running request is preempted by recompute: its blocks are freed, its counters reset, and
it goes back to the front of the waiting queue with its generated tokens kept as prompt.

Speculative decoding is more of the same: a running request in decode position (one token to
compute) that carries drafts (`Request.spec_token_ids`) gets 1 + k tokens, the drafts trimmed to
the token budget and the context window, and dropped altogether rather than preempting anyone.
`update` counts as computed only the last real token and the accepted drafts, appends the
accepted tokens one by one with a stop check after each, and trims the blocks that only held
rejected drafts.
"""

from __future__ import annotations

import logging
from collections import deque

from tokenmill.config import SchedulerConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tokenmill.request import Request, RequestStatus

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self.num_preemptions = 0

    # -- queue management ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request (stop string, abort): free its blocks, drop it from the queues."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif not request.status.finished:
            self.waiting.remove(request)
        request.status = status
        self._free(request)

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        self._finished_ids.append(request.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        spec: dict[str, list[int]] = {}  # drafts handed out, by request id
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            drafts = self._drafts_for(request, budget)
            if drafts and self.kv.allocate_slots(request, 1 + len(drafts)):
                scheduled.append((request, 1 + len(drafts)))
                spec[request.request_id] = drafts
                budget -= 1 + len(drafts)
                i += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()  # newest request
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted; everything after it too

        while (
            self.waiting
            and not preempted
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            cached = []
            if request.num_computed_tokens == 0:
                cached = self.kv.find_cached_prefix(request)
            num_computed = request.num_computed_tokens + len(cached) * self.kv.block_size
            num_new = min(request.num_tokens - num_computed, budget)
            if not self.kv.allocate_slots(request, num_new, cached):
                break
            self.waiting.popleft()
            if request.num_preemptions == 0 and request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_computed
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new

        out = []
        for request, num_new in scheduled:
            start = request.num_computed_tokens
            drafts = spec.get(request.request_id, []) if spec else []
            end = start + num_new - len(drafts)  # past the last real token of this step
            # (positional: this runs once per request and step, ~1 us a call with keywords)
            out.append(ScheduledRequest(request.request_id, request.token_ids_between(start, end) + drafts, start,
                                        list(self.kv.get_block_table(request.request_id)), end == request.num_tokens,
                                        drafts))
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(requests=out, preempted=preempted, finished=finished)

    def _drafts_for(self, request: Request, budget: int) -> list[int]:
        """The request's drafts that fit this step: only in decode position (one token left to
        compute), within the token budget, and with every position inside the context window."""
        if not request.spec_token_ids or request.num_tokens - request.num_computed_tokens != 1:
            return []
        room = min(budget - 1, self.config.max_model_len - request.num_tokens)
        return request.spec_token_ids[: max(room, 0)]

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        log.info("preempted request %s (recompute %d tokens later)", request.request_id, request.num_tokens)

    def update(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[Request]:
        """Advance counters by what was computed, append sampled tokens, finish stopped requests.

        With drafts, only the last real token and the accepted drafts count as computed (their
        KV is valid); the rejected drafts' slots are rolled back with `kv.trim`. New tokens are
        appended one by one, and a stop (eos, stop id, max_tokens, context) ends the request at
        that token: the tokens after it are dropped.

        Returns the requests that received a token this step (finished ones included)."""
        updated = []
        for sched in scheduler_output.requests:
            request = self.requests.get(sched.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted during the step
            tokens = runner_output.new_tokens(sched.request_id)
            if sched.spec_token_ids:
                rejected = len(sched.spec_token_ids) - max(len(tokens) - 1, 0)
                request.num_computed_tokens += len(sched.token_ids) - rejected
                if rejected:
                    self.kv.trim(request)
            else:
                request.num_computed_tokens += len(sched.token_ids)
            if request.spec_token_ids:  # this step's drafts (or those it had no room for) are spent
                request.spec_token_ids = []
            if not tokens:
                continue
            updated.append(request)
            for token in tokens:
                request.append_token(token)
                if request.check_stop(self.config.max_model_len):
                    self.running.remove(request)
                    del self.requests[request.request_id]
                    self._free(request)
                    break
        return updated
