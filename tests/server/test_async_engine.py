"""AsyncEngine against a fake engine (no model): deltas in order, all-or-none submission,
aborts, the waiting count, and an engine failure that fails its requests instead of hanging them."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.server.async_engine import AsyncEngine, EngineDeadError, EngineRequest

UNLUCKY = 13  # max_tokens the fake engine refuses


class FakeEngine:
    """One token per request per step; token i of a request is i, its text f"t{i} "."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        self.live: dict[str, list] = {}  # id -> [prompt, params, produced]
        self.aborted: list[str] = []
        self.fail_at_step = fail_at_step
        self.stats = SimpleNamespace(computed_tokens=0, steps=0)
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self.kv = SimpleNamespace(usage=0.0)
        self.fatal_listeners: list = []

    def on_fatal(self, listener) -> None:  # a tensor-parallel worker's death, announced by the engine
        self.fatal_listeners.append(listener)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if params.max_tokens == UNLUCKY:
            raise InvalidRequestError(f"invalid max_tokens={UNLUCKY}: unlucky")
        self.live[request_id] = [prompt, params, 0]

    def abort_request(self, request_id: str) -> None:
        if self.live.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def step(self) -> list[RequestOutput]:
        self.stats.steps += 1
        if self.stats.steps == self.fail_at_step:
            raise RuntimeError("kernel exploded")
        outs = []
        for rid, entry in list(self.live.items()):
            prompt, params, produced = entry
            entry[2] = produced = produced + 1
            finished = produced >= params.max_tokens
            if finished:
                del self.live[rid]
            ids = list(range(1, produced + 1))
            completion = CompletionOutput(0, "".join(f"t{i} " for i in ids), ids,
                                          finish_reason="length" if finished else None,
                                          delta=f"t{produced} ", delta_token_ids=[produced])
            outs.append(RequestOutput(rid, None, prompt, [completion], finished))
        self.stats.computed_tokens += len(outs)
        time.sleep(0.001)
        return outs


def _requests(*max_tokens: int) -> list[EngineRequest]:
    return [EngineRequest(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=m)) for i, m in enumerate(max_tokens)]


async def _collect(stream) -> dict[int, list]:
    got: dict[int, list] = {}
    async for d in stream:
        got.setdefault(d.index, []).append(d)
    return got


def test_deltas_arrive_in_order_and_the_waiting_count_returns_to_zero():
    async def main():
        engine = AsyncEngine(FakeEngine())
        engine.start()
        stream = await engine.submit(_requests(3, 5))
        got = await _collect(stream)
        assert [d.token_ids for d in got[0]] == [[1], [2], [3]]
        assert "".join(d.text for d in got[1]) == "t1 t2 t3 t4 t5 "
        assert [d.finish_reason for d in got[1]] == [None] * 4 + ["length"]
        assert engine.num_unstarted == 0
        engine.stop()
        assert not engine.alive

    asyncio.run(main())


def test_a_bad_request_refuses_its_whole_submission_and_leaves_others_running():
    async def main():
        fake = FakeEngine()
        engine = AsyncEngine(fake)
        engine.start()
        other = await engine.submit([EngineRequest("other", [1], SamplingParams(max_tokens=20))])
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            await engine.submit(_requests(4, UNLUCKY))
        assert "r0" in fake.aborted and "r1" not in fake.live  # the sibling was rolled back
        assert engine.num_unstarted in (0, 1)  # only `other`, if it has not started yet
        got = await _collect(other)
        assert len(got[0]) == 20 and got[0][-1].finish_reason == "length"
        assert engine.num_unstarted == 0
        engine.stop()

    asyncio.run(main())


def test_abort_stops_the_engine_request():
    async def main():
        fake = FakeEngine()
        engine = AsyncEngine(fake)
        engine.start()
        stream = await engine.submit(_requests(10_000))
        async for d in stream:
            if d.token_ids == [3]:
                stream.abort()
        for _ in range(200):
            if "r0" in fake.aborted:
                break
            await asyncio.sleep(0.01)
        assert fake.aborted == ["r0"] and not fake.live
        engine.stop()

    asyncio.run(main())


def test_a_dead_worker_announced_while_idle_stops_the_engine_and_calls_on_dead():
    """A tensor-parallel rank dying between steps: the engine thread stops at once, later
    submissions fail, and `on_dead` (the server exits on it) gets the error."""
    from tokenmill.distributed.group import WorkerDiedError

    async def main():
        fake = FakeEngine()
        engine = AsyncEngine(fake)
        dead: list[BaseException] = []
        engine.on_dead = dead.append
        engine.start()
        await _collect(await engine.submit(_requests(2)))
        fake.fatal_listeners[0](WorkerDiedError("tensor-parallel worker rank 1 was killed by signal 9"))
        for _ in range(200):
            if not engine.alive:
                break
            await asyncio.sleep(0.01)
        assert not engine.alive and len(dead) == 1 and isinstance(dead[0], WorkerDiedError)
        with pytest.raises(EngineDeadError, match="rank 1 was killed"):
            await engine.submit(_requests(2))

    asyncio.run(main())


def test_an_engine_failure_fails_every_request_and_later_submissions():
    async def main():
        engine = AsyncEngine(FakeEngine(fail_at_step=3))
        engine.start()
        stream = await engine.submit(_requests(50, 50))
        with pytest.raises(EngineDeadError, match="kernel exploded"):
            await _collect(stream)
        for _ in range(200):
            if not engine.alive:
                break
            await asyncio.sleep(0.01)
        assert not engine.alive
        with pytest.raises(EngineDeadError):
            await engine.submit(_requests(2))

    asyncio.run(main())
