"""AsyncEngine: one background thread owns the LLMEngine; coroutines submit and stream through it.

    handlers (event loop)                     engine thread (owns LLMEngine, nothing else calls it)
    ---------------------                     ------------------------------------------------------
    submit(requests) ── _Add ──► commands ──► add_request ×k ── accepted / InvalidRequestError ─┐
         ▲                                    step() → outputs → Deltas                         │
         └── RequestStream.queue ◄── call_soon_threadsafe(_deliver, one batch per step) ◄───────┘
    abort(ids)       ── _Abort ─► commands ──► abort_request: KV blocks freed before the next step

Commands are applied between steps, so an abort frees its blocks at most one step after the
client left. The engine thread blocks on the command queue while there is nothing to run.
Each step is also reported to the observers (metrics, tariff meter) on the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import InvalidRequestError, SamplingParams

log = logging.getLogger("tokenmill.server")


class EngineDeadError(RuntimeError):
    """The engine thread failed or stopped; the request cannot finish."""


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Delta:
    """What one step added to one engine request; built on the engine thread, then read-only."""

    index: int  # position of the request in its submission
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # one {token_id: logprob} per new token
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int


@dataclass(frozen=True)
class StepRecord:
    """One engine step, as metrics and the tariff meter see it."""

    seconds: float
    computed_tokens: int  # KV computed this step (prefill chunks + decodes)
    decode_tokens: int  # sampled tokens of requests that already had output
    context_tokens: int  # sum of the context lengths those decodes attended over
    outputs: list[RequestOutput]
    finished: list[tuple[EngineRequest, RequestOutput]]  # with the request as submitted


class EngineObserver(Protocol):
    """Called on the engine thread: read engine state there, never from the event loop."""

    def on_step(self, engine: LLMEngine, step: StepRecord) -> None: ...

    def on_abort(self, num_requests: int) -> None: ...

    def on_refresh(self, engine: LLMEngine) -> None: ...  # after every round of commands/step


class RequestStream:
    """The deltas of one submission (several engine requests), in step order.

    Iterate it on the event loop; call `abort()` (idempotent) to stop whatever is unfinished.
    `unstarted` holds the requests without a first token yet; their total over all streams,
    `AsyncEngine.num_unstarted`, is the server's waiting queue."""

    def __init__(self, engine: AsyncEngine, requests: list[EngineRequest]) -> None:
        self._engine = engine
        self.requests = requests
        self.queue: asyncio.Queue[list[Delta] | BaseException] = asyncio.Queue()
        self.unstarted = set(range(len(requests)))
        self.unfinished = set(range(len(requests)))
        self.error: BaseException | None = None  # raised to the reader once the deltas run out

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            for delta in item:
                yield delta
        if self.error is not None:
            raise self.error

    def _push(self, deltas: list[Delta]) -> None:  # event loop thread
        for d in deltas:
            if d.index in self.unstarted:
                self.unstarted.discard(d.index)
                self._engine.num_unstarted -= 1
            if d.finish_reason is not None:
                self.unfinished.discard(d.index)
        self.queue.put_nowait(deltas)

    def _fail(self, error: BaseException) -> None:  # event loop thread
        self._engine.num_unstarted -= len(self.unstarted)
        self.unstarted.clear()
        self.queue.put_nowait(error)

    def cancel(self, error: BaseException) -> None:
        """Abort what is unfinished and end the reader's iteration with `error`."""
        if self.unfinished:
            self.error = error
            self.abort()
            self.queue.put_nowait([])  # wake a waiting reader

    def abort(self) -> None:
        """Abort every unfinished request of this stream; their KV blocks are freed at once."""
        if not self.unfinished:
            return
        self._engine.num_unstarted -= len(self.unstarted)
        self.unstarted.clear()
        ids = [self.requests[i].request_id for i in self.unfinished]
        self.unfinished.clear()
        self._engine.abort(ids)


@dataclass
class _Add:
    stream: RequestStream
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_ids: list[str]


_STOP = object()


@dataclass
class _Fatal:
    error: BaseException  # raised on the engine thread: a tensor-parallel worker died while idle


class AsyncEngine:
    """Runs `engine` on a thread of its own. Start with `start()` inside the event loop.

    Only the engine thread touches `engine`; handlers see it through the observers' metrics
    and `num_unstarted`."""

    def __init__(self, engine: LLMEngine, observers: list[EngineObserver] | None = None) -> None:
        self.engine = engine
        self._observers = list(observers or [])
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._owners: dict[str, tuple[RequestStream, int]] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.num_unstarted = 0  # event loop thread only
        self.error: BaseException | None = None
        # called on the engine thread once the engine failed and every request got the error
        self.on_dead: Callable[[BaseException], None] | None = None

    # -- event loop side ----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()
        self.engine.on_fatal(lambda error: self._commands.put(_Fatal(error)))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    async def submit(self, requests: list[EngineRequest]) -> RequestStream:
        """Queue all `requests` or none: an invalid one raises InvalidRequestError and every
        request of this submission already added is aborted."""
        if not self.alive:
            why = f": {self.error}" if self.error is not None else ""
            raise EngineDeadError(f"the engine is not running{why}")
        stream = RequestStream(self, requests)
        accepted = asyncio.get_running_loop().create_future()
        self.num_unstarted += len(requests)
        self._commands.put(_Add(stream, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            stream.abort()  # the client left before the engine answered
            raise
        except BaseException:
            self.num_unstarted -= len(stream.unstarted)
            stream.unstarted.clear()
            stream.unfinished.clear()
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._commands.put(_Abort(list(request_ids)))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left, stop the thread and wait for it."""
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def _deliver(self, batches: list[tuple[RequestStream, list[Delta]]]) -> None:
        for stream, deltas in batches:
            stream._push(deltas)

    def _resolve(self, future: asyncio.Future, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _fail_all(self, streams: list[RequestStream], error: BaseException) -> None:
        for stream in streams:
            stream._fail(error)

    # -- engine thread ------------------------------------------------------------------------
    def _call(self, fn, *args) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                commands = [] if engine.has_unfinished_requests() else [self._commands.get()]
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if any(c is _STOP for c in commands):
                    self._shutdown(EngineDeadError("the server is shutting down"))
                    return
                for command in commands:
                    if isinstance(command, _Fatal):
                        raise command.error
                    if isinstance(command, _Add):
                        self._add(command)
                    else:
                        self._abort(command.request_ids)
                if engine.has_unfinished_requests() and not self._step():
                    time.sleep(0.001)  # nothing could be scheduled: do not spin
                self._publish()
        except BaseException as e:  # an engine bug: fail every request rather than hang them
            log.exception("engine thread failed")
            self.error = e
            self._shutdown(EngineDeadError(f"engine failure: {type(e).__name__}: {e}"))
            if self.on_dead is not None:
                self.on_dead(e)

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        try:
            for index, r in enumerate(command.stream.requests):
                self.engine.add_request(r.request_id, r.prompt_token_ids, r.params)
                added.append(r.request_id)
                self._owners[r.request_id] = (command.stream, index)
        except Exception as e:
            for rid in added:
                self.engine.abort_request(rid)
                self._owners.pop(rid, None)
            if not isinstance(e, InvalidRequestError):
                log.exception("add_request failed")
            self._call(self._resolve, command.accepted, e)
            return
        self._call(self._resolve, command.accepted, None)

    def _abort(self, request_ids: list[str]) -> None:
        n = 0
        for rid in request_ids:
            if self._owners.pop(rid, None) is not None:
                self.engine.abort_request(rid)
                n += 1
        if n:
            for observer in self._observers:
                observer.on_abort(n)

    def _step(self) -> bool:
        """One engine step; False if the scheduler had nothing to run."""
        engine = self.engine
        computed_before = engine.stats.computed_tokens
        t0 = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - t0
        if not outputs and engine.stats.computed_tokens == computed_before:
            return False
        batches: dict[int, tuple[RequestStream, list[Delta]]] = {}
        finished = []
        decode_tokens = context_tokens = 0
        for out in outputs:
            o = out.outputs[0]
            new = len(o.delta_token_ids)  # more than one when speculative drafts were accepted
            if o.num_output_tokens > new:
                decode_tokens += new
                context_tokens += len(out.prompt_token_ids) + o.num_output_tokens
            owner = self._owners.get(out.request_id)
            if owner is None:
                continue
            stream, index = owner
            logprobs = o.logprobs if o.logprobs and new else None  # delta outputs: the step's
            delta = Delta(index, o.delta, o.delta_token_ids, logprobs, o.finish_reason,
                          o.stop_reason, out.num_cached_tokens)
            batches.setdefault(id(stream), (stream, []))[1].append(delta)
            if out.finished:
                del self._owners[out.request_id]
                finished.append((stream.requests[index], out))
        if batches:
            self._call(self._deliver, list(batches.values()))
        record = StepRecord(seconds, engine.stats.computed_tokens - computed_before, decode_tokens,
                            context_tokens, outputs, finished)
        for observer in self._observers:
            observer.on_step(engine, record)
        return True

    def _publish(self) -> None:
        for observer in self._observers:
            observer.on_refresh(self.engine)

    def _shutdown(self, error: BaseException) -> None:
        streams = {id(s): s for s, _ in self._owners.values()}
        for rid in list(self._owners):
            try:
                self.engine.abort_request(rid)
            except Exception:  # the engine may be in a broken state after a failure
                log.exception("abort of %s failed", rid)
        if self._owners:
            for observer in self._observers:
                observer.on_abort(len(self._owners))
        self._owners.clear()
        # fail submissions still in the queue as well
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                self._call(self._resolve, command.accepted, error)
        if streams:
            self._call(self._fail_all, list(streams.values()), error)
        self._publish()
