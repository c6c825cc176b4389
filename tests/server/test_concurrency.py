"""Many streams at once: none lost, each equal to its solo output (greedy, near-tie rule), bad
requests in the middle answered 400 without disturbing the others, disconnects aborted at once,
and the KV cache empty afterwards."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.golden import PROMPTS, compare_up_to_near_tie
from tests.server.conftest import MAX_MODEL_LEN, MODEL, margins, token_ids

pytestmark = pytest.mark.slow
NEW_TOKENS = 8
DISTINCT = [p + suffix for suffix in ("", " Tell me more.") for p in PROMPTS]  # 16 prompts
CONCURRENT = 64  # each distinct prompt 4 times
BAD = [  # (body overrides, field the 400 must name)
    ({"temperature": -0.5}, "temperature"),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"model": "not-this-one"}, "model"),
    ({"prompt": [10**9]}, "prompt"),
]


def _solo(server, prompt: str) -> tuple[list[int], list[float]]:
    out = server.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=2,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    return token_ids(lp.tokens), margins(lp.top_logprobs)


async def _stream(client: openai.AsyncOpenAI, prompt: str) -> tuple[list[int], str, str | None]:
    stream = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=0, stream=True,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    ids, text, reason = [], "", None
    async for chunk in stream:
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                ids.extend(token_ids(c.logprobs.tokens))
            reason = c.finish_reason or reason
    return ids, text, reason


async def _bad(client: openai.AsyncOpenAI, overrides: dict, param: str) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4} | overrides
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(**body)
    assert info.value.status_code == 400 and info.value.body["param"] == param


async def _run_all(server, prompts: list[str]):
    client = server.async_client()
    tasks = []
    for i, prompt in enumerate(prompts):
        tasks.append(asyncio.create_task(_stream(client, prompt)))
        if i % 16 == 8:  # bad requests in the middle of the batch
            overrides, param = BAD[i // 16]
            tasks.append(asyncio.create_task(_bad(client, overrides, param)))
    results = await asyncio.gather(*tasks)
    await client.close()
    return [r for r in results if r is not None]


def test_64_concurrent_streams_equal_their_solo_outputs(server):
    solo = {p: _solo(server, p) for p in DISTINCT}
    prompts = [DISTINCT[i % len(DISTINCT)] for i in range(CONCURRENT)]
    results = asyncio.run(_run_all(server, prompts))
    assert len(results) == CONCURRENT
    compared = 0
    for prompt, (ids, text, reason) in zip(prompts, results):
        assert reason == "length" and len(ids) == NEW_TOKENS and text
        ref, ref_margins = solo[prompt]
        compared += compare_up_to_near_tie(ids, ref, ref_margins)
    assert compared >= CONCURRENT * NEW_TOKENS // 2, "too few tokens compared: near ties everywhere?"
    server.wait_idle()


def _aborts(server) -> float:
    return server.metrics()['tokenmill:request_success_total{finished_reason="abort"}']


def test_disconnected_stream_is_aborted_and_its_blocks_freed(server):
    before = _aborts(server)
    stream = server.client().completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=400, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    m = server.metrics()
    assert m["tokenmill:num_requests_running"] == 1 and m["tokenmill:kv_cache_usage_perc"] > 0
    stream.close()
    t0 = time.monotonic()
    server.wait_idle(timeout=10)
    assert _aborts(server) == before + 1
    assert time.monotonic() - t0 < 5  # at once: one step, not the 400 tokens


def test_disconnected_non_streaming_request_is_aborted(server):
    before = _aborts(server)
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 400, "ignore_eos": True},
                    timeout=1.5)
    server.wait_idle(timeout=10)
    assert _aborts(server) == before + 1
