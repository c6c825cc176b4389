"""From an OpenAI request to a Job: validated, tokenized, ready to submit to the engine.

A request with P prompts and n choices becomes P x n engine requests, submitted together (all
or none); choice `p * n + k` is prompt p's k-th sample, seeded with seed + k as in `LLM`.
Every check that can fail runs here, before submission, so a client mistake is a 400 naming
the field and never reaches the engine.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Literal

import jinja2

from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.server.async_engine import AsyncEngine, EngineRequest
from tokenmill.server.ledger import UsageLedger
from tokenmill.server.protocol import (
    MAX_CHOICES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    TextPart,
    bad_request,
)
from tokenmill.server.tariff import Tariff, ThroughputMeter

Kind = Literal["completions", "chat.completions"]

@dataclass
class ServingContext:
    """What the handlers share. After startup only `draining` (set once, on SIGTERM) and
    `active` change."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    tariff: Tariff
    meter: ThroughputMeter
    ledger: UsageLedger | None = None
    max_queue: int | None = None
    retry_after_s: int = 1
    draining: bool = False
    active: set = field(default_factory=set)  # Generations being served (event loop thread)
    _token_text: dict[int, str] = field(default_factory=dict)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(400, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")


@dataclass
class Job:
    """A validated generation request, ready to submit."""

    kind: Kind
    id: str
    prompts: list[list[int]]
    prompt_texts: list[str] | None  # for echo
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs in the answer
    token_ids_as_text: bool
    api_key: str
    user: str | None
    arrival: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))

    def engine_requests(self) -> list[EngineRequest]:
        out = []
        for p, ids in enumerate(self.prompts):
            for k in range(self.n):
                params = self.params
                if self.n > 1 and params.seed is not None:
                    params = replace(params, seed=params.seed + k)
                out.append(EngineRequest(f"{self.id}-{p}-{k}", ids, params, self.arrival))
        return out


# -- requests -> jobs ----------------------------------------------------------------------------

_FIELD = re.compile(r"invalid (\w+)=")


def _params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
            names: dict[str, str]) -> SamplingParams:
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", param="logit_bias")
    try:
        return SamplingParams(
            n=1,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop or None,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            logprobs=logprobs,
            output_kind="delta",  # the server streams and sums the steps' parts itself
        )
    except InvalidRequestError as e:
        m = _FIELD.search(str(e))
        name = m.group(1) if m else None
        raise bad_request(str(e), param=names.get(name, name) if name else None) from None


def _check_context(ctx: ServingContext, prompts: list[list[int]], max_tokens: int | None,
                   prompt_param: str, max_tokens_param: str) -> None:
    for ids in prompts:
        if not ids:
            raise bad_request("the prompt is empty: give at least one token", param=prompt_param)
        if any(not 0 <= t < ctx.vocab_size for t in ids):
            raise bad_request(f"prompt token ids must be in [0, {ctx.vocab_size})", param=prompt_param)
        if len(ids) >= ctx.max_model_len:
            raise bad_request(f"the prompt has {len(ids)} tokens; the context window is {ctx.max_model_len} "
                              "tokens and must leave room for at least one output token", param=prompt_param,
                              code="context_length_exceeded")
        if max_tokens is not None and len(ids) + max_tokens > ctx.max_model_len:
            raise bad_request(f"{max_tokens_param}={max_tokens} plus the prompt's {len(ids)} tokens exceeds the "
                              f"context window of {ctx.max_model_len} tokens; at most "
                              f"{ctx.max_model_len - len(ids)} output tokens fit", param=max_tokens_param,
                              code="context_length_exceeded")


def _common(req: SamplingFields) -> dict:
    return {"n": req.n, "stream": req.stream,
            "include_usage": bool(req.stream_options and req.stream_options.include_usage),
            "token_ids_as_text": req.return_tokens_as_token_ids, "user": req.user}


def prepare_completion(ctx: ServingContext, req: CompletionRequest, api_key: str) -> Job:
    ctx.check_model(req.model)
    if req.suffix:
        raise bad_request("suffix is not supported by this server", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of must equal n (or be left out): candidates are not ranked", param="best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs is not supported (no prompt logprobs)", param="echo")
    prompt = req.prompt
    if isinstance(prompt, str):
        texts, prompts = [prompt], [ctx.tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        texts, prompts = list(prompt), [ctx.tokenizer.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        texts, prompts = None, [list(prompt)]
    elif prompt:
        texts, prompts = None, [list(p) for p in prompt]
    else:
        raise bad_request("the prompt is empty: give a string, a list of strings or token ids", param="prompt")
    if len(prompts) * req.n > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts x n={req.n} is more than {MAX_CHOICES} choices in one request",
                          param="n")
    _check_context(ctx, prompts, req.max_tokens, "prompt", "max_tokens")
    if req.echo and texts is None:
        texts = [ctx.tokenizer.decode(p) for p in prompts]
    params = _params(req, req.max_tokens, req.logprobs, {})
    return Job("completions", f"cmpl-{uuid.uuid4().hex}", prompts, texts if req.echo else None, params,
               top_logprobs=req.logprobs, api_key=api_key, **_common(req))


def _message_text(i: int, content: str | list | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if not isinstance(part, TextPart):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"content parts of type {kind!r} are not supported; only text",
                              param=f"messages.{i}.content")
        parts.append(part.text)
    return "".join(parts)


def chat_prompt(ctx: ServingContext, messages: list, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template."""
    rendered = []
    for i, m in enumerate(messages):
        entry = {"role": "system" if m.role == "developer" else m.role, "content": _message_text(i, m.content)}
        if m.name:
            entry["name"] = m.name
        rendered.append(entry)
    try:
        text = ctx.tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt)
    except (ValueError, TypeError, jinja2.TemplateError) as e:  # no template; raise_exception; misfit
        raise bad_request(f"cannot apply the chat template: {e}", param="messages") from None
    return ctx.tokenizer.encode(text, add_special_tokens=False)


def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest, api_key: str) -> Job:
    ctx.check_model(req.model)
    if req.tools:
        raise bad_request("tools are not supported by this server", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    max_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    prompt = chat_prompt(ctx, req.messages, req.add_generation_prompt)
    _check_context(ctx, [prompt], max_tokens, "messages", max_name)
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(req, max_tokens, top, {"max_tokens": max_name, "logprobs": "top_logprobs"})
    return Job("chat.completions", f"chatcmpl-{uuid.uuid4().hex}", [prompt], None, params,
               top_logprobs=top, api_key=api_key, **_common(req))


def admit(ctx: ServingContext, job: Job) -> None:
    """Refuse work while draining (503) or while the queue is full (429 + Retry-After)."""
    if ctx.draining:
        raise APIError(503, "the server is shutting down and takes no new requests", type="service_unavailable")
    if not ctx.engine.alive:
        raise APIError(503, "the engine is not running", type="service_unavailable")
    waiting, wanted = ctx.engine.num_unstarted, len(job.prompts) * job.n
    if ctx.max_queue is not None and waiting and waiting + wanted > ctx.max_queue:
        raise APIError(429, f"the server's queue is full ({waiting} requests waiting, at most {ctx.max_queue}); "
                       "retry later", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(ctx.retry_after_s)})
