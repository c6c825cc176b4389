"""Generation: one submitted Job, from engine deltas to OpenAI responses and SSE chunks.

Deltas fold into one Choice per engine request. A complete answer (JSON, or the SSE chunk that
finishes the last choice) goes out only after the request's ledger row is committed; a client
that leaves is aborted at once, and what it consumed is recorded all the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from tokenmill.server.async_engine import Delta, EngineDeadError, RequestStream
from tokenmill.server.jobs import Job, ServingContext
from tokenmill.server.ledger import UsageRecord
from tokenmill.server.protocol import APIError

log = logging.getLogger("tokenmill.server")
MIN_LOGPROB = -9999.0  # what -inf is sent as (JSON has no infinity), as vLLM does


def _finite(logprob: float | None) -> float | None:
    return logprob if logprob is None or logprob > MIN_LOGPROB else MIN_LOGPROB


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    text_len: int = 0  # characters in `text`
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


class Generation:
    """One submitted job: folds deltas into choices, formats OpenAI bodies, records usage."""

    def __init__(self, ctx: ServingContext, job: Job, stream: RequestStream) -> None:
        self.ctx, self.job, self.stream = ctx, job, stream
        self.choices = [Choice() for _ in range(len(job.prompts) * job.n)]
        self.remaining = len(self.choices)
        self.first_token_at: float | None = None
        self.recorded = False

    def apply(self, delta: Delta) -> Choice:
        c = self.choices[delta.index]
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        c.text.append(delta.text)
        c.text_len += len(delta.text)
        c.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            c.logprobs.extend(delta.logprobs)
        c.num_cached_tokens = delta.num_cached_tokens
        if delta.finish_reason is not None:
            c.finish_reason, c.stop_reason = delta.finish_reason, delta.stop_reason
            self.remaining -= 1
        return c

    # -- usage and ledger -------------------------------------------------------------------------
    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.job.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(self.choices[p * self.job.n].num_cached_tokens for p in range(len(self.job.prompts)))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _record(self) -> UsageRecord:
        u, job = self.usage(), self.job
        prices = self.ctx.tariff.prices(self.ctx.meter)
        cached = u["prompt_tokens_details"]["cached_tokens"]
        reasons = [c.finish_reason or "abort" for c in self.choices]
        now = time.monotonic()
        return UsageRecord(
            request_id=job.id, created_at=time.time() - (now - job.arrival), api_key=job.api_key, user=job.user,
            model=self.ctx.model_name, endpoint=job.kind, n=job.n, prompt_tokens=u["prompt_tokens"],
            cached_tokens=cached, completion_tokens=u["completion_tokens"],
            finish_reason="abort" if "abort" in reasons else reasons[-1],
            ttft_s=None if self.first_token_at is None else self.first_token_at - job.arrival,
            e2e_s=now - job.arrival, input_per_mtok=prices.input_per_mtok,
            cached_input_per_mtok=prices.cached_input_per_mtok, output_per_mtok=prices.output_per_mtok,
            price_usd=prices.cost(u["prompt_tokens"], cached, u["completion_tokens"]),
        )

    async def commit(self) -> None:
        """Record the finished request and wait until the row is durable."""
        if self.ctx.ledger is not None and not self.recorded:
            self.recorded = True
            await self.ctx.ledger.commit(self._record())

    def abandon(self) -> None:
        """The client left: abort what runs, and record what was computed (without waiting)."""
        self.stream.abort()
        if self.ctx.ledger is not None and not self.recorded:
            self.recorded = True
            for c in self.choices:
                c.finish_reason = c.finish_reason or "abort"
            self.ctx.ledger.record(self._record())

    # -- bodies -----------------------------------------------------------------------------------
    def _logprobs(self, c: Choice, start: int, text_offset: int) -> dict | None:
        top_n = self.job.top_logprobs
        if top_n is None:
            return None
        name = (lambda t: f"token_id:{t}") if self.job.token_ids_as_text else self.ctx.token_text
        tokens = c.token_ids[start:]
        entries = c.logprobs[start:start + len(tokens)]
        if self.job.kind == "chat.completions":
            content = []
            for t, entry in zip(tokens, entries):
                top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
                content.append({"token": name(t), "logprob": _finite(entry.get(t)),
                                "bytes": list(name(t).encode()),
                                "top_logprobs": [{"token": name(i), "logprob": _finite(lp),
                                                  "bytes": list(name(i).encode())} for i, lp in top]})
            return {"content": content}
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, entry in zip(tokens, entries):
            out["tokens"].append(name(t))
            out["token_logprobs"].append(_finite(entry.get(t)))
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
            out["top_logprobs"].append({name(i): _finite(lp) for i, lp in top})
            out["text_offset"].append(text_offset)
            text_offset += len(name(t))
        return out

    def _echo(self, index: int) -> str:
        return self.job.prompt_texts[index // self.job.n] if self.job.prompt_texts else ""

    def response(self) -> dict:
        job = self.job
        choices = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text)
            common = {"index": i, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                      "logprobs": self._logprobs(c, 0, len(self._echo(i)))}
            if job.kind == "chat.completions":
                choices.append(common | {"message": {"role": "assistant", "content": text}})
            else:
                choices.append(common | {"text": self._echo(i) + text})
        obj = "chat.completion" if job.kind == "chat.completions" else "text_completion"
        return {"id": job.id, "object": obj, "created": job.created, "model": self.ctx.model_name,
                "choices": choices, "usage": self.usage()}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        job = self.job
        obj = "chat.completion.chunk" if job.kind == "chat.completions" else "text_completion"
        body = {"id": job.id, "object": obj, "created": job.created, "model": self.ctx.model_name,
                "choices": choices}
        if job.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def opening_chunks(self) -> list[str]:
        """Chat: the assistant role of every choice; completions with echo: the prompts."""
        if self.job.kind == "chat.completions":
            return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(len(self.choices))]
        if self.job.prompt_texts:
            return [self._chunk([{"index": i, "text": self._echo(i), "logprobs": None, "finish_reason": None}])
                    for i in range(len(self.choices))]
        return []

    def delta_chunk(self, delta: Delta, c: Choice) -> str | None:
        start = len(c.token_ids) - len(delta.token_ids)
        if not delta.text and delta.finish_reason is None and self.job.top_logprobs is None:
            return None  # text held back (partial character or stop string): nothing to show yet
        offset = len(self._echo(delta.index)) + c.text_len - len(delta.text)
        choice = {"index": delta.index, "logprobs": self._logprobs(c, start, offset),
                  "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
        if self.job.kind == "chat.completions":
            choice["delta"] = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
        else:
            choice["text"] = delta.text
        return self._chunk([choice])

    def usage_chunk(self) -> str | None:
        if not self.job.include_usage:
            return None
        job = self.job
        obj = "chat.completion.chunk" if job.kind == "chat.completions" else "text_completion"
        body = {"id": job.id, "object": obj, "created": job.created, "model": self.ctx.model_name,
                "choices": [], "usage": self.usage()}
        return f"data: {json.dumps(body)}\n\n"

    async def events(self):
        """The SSE body: opening chunks, one chunk per delta, usage, [DONE]. The ledger row is
        committed before the chunk that finishes the last choice."""
        for chunk in self.opening_chunks():
            yield chunk
        try:
            async for delta in self.stream:
                c = self.apply(delta)
                if self.remaining == 0:
                    await self.commit()
                chunk = self.delta_chunk(delta, c)
                if chunk is not None:
                    yield chunk
        except Exception as e:  # headers are sent: report any failure in-band
            if not isinstance(e, EngineDeadError):
                log.exception("stream of %s failed", self.job.id)
            self.abandon()
            error = APIError(503, str(e), type="service_unavailable")
            yield f"data: {json.dumps(error.body())}\n\n"
        else:
            chunk = self.usage_chunk()
            if chunk is not None:
                yield chunk
        yield "data: [DONE]\n\n"

    async def collect(self) -> dict:
        async for delta in self.stream:
            self.apply(delta)
        await self.commit()
        return self.response()


async def until_disconnected(receive) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_collect(gen: Generation, receive) -> dict | None:
    """The complete response, or None if the client disconnected first (then it is aborted)."""
    collect = asyncio.ensure_future(gen.collect())
    gone = asyncio.ensure_future(until_disconnected(receive))
    try:
        done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
            gen.abandon()
    return collect.result() if collect in done else None
