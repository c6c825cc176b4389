"""The FastAPI app: OpenAI routes, /tokenize, /health, /metrics; errors in OpenAI's JSON shape.

Request bodies are parsed here rather than by FastAPI, so the order of checks is fixed:
API key (401), JSON (400), schema (400 naming the field), model and context window (400),
queue (429), and only then the engine. Nothing a client sends can produce a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling_params import InvalidRequestError
from tokenmill.server.async_engine import AsyncEngine, EngineDeadError
from tokenmill.server.generation import Generation, run_collect
from tokenmill.server.jobs import (
    Job,
    ServingContext,
    admit,
    chat_prompt,
    prepare_chat,
    prepare_completion,
)
from tokenmill.server.keys import ApiKeys
from tokenmill.server.ledger import UsageLedger
from tokenmill.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenmill.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    bad_request,
)
from tokenmill.server.tariff import Tariff, ThroughputMeter

log = logging.getLogger("tokenmill.server")

MAX_BODY_BYTES = 32 * 2**20
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    max_queue: int | None = None  # requests without a first token; beyond it: 429
    ledger_path: Path | None = None  # None: no usage ledger
    tariff: Tariff = field(default_factory=Tariff)
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        from tokenmill.config import ConfigError

        if self.max_queue is not None and self.max_queue < 1:
            raise ConfigError(f"max_queue={self.max_queue}: must be >= 1 (or unset for no bound)")


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (done, error, disconnect)."""

    def __init__(self, events, on_close) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _param(loc: tuple) -> str:
    """`('messages', 0, 'content', 'str')` -> 'messages.0.content' (union member tags dropped)."""
    parts = [str(p) for p in loc if isinstance(p, int)
             or (isinstance(p, str) and p.isidentifier() and p.islower() and p not in _TYPE_TAGS)]
    return ".".join(parts)


async def _parse(request: Request, model: type[M]) -> M:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the body is larger than {MAX_BODY_BYTES // 2**20} MiB")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        param = _param(first["loc"]) or None
        raise bad_request(f"invalid {param or 'body'}: {first['msg']}", param=param) from None


def _exit_when_workers_die(app: FastAPI, error: BaseException) -> None:
    """A lost tensor-parallel rank cannot come back: stop serving (every request in flight has
    its error by now) and let `run_server` exit with status 1 and the reason."""
    from tokenmill.distributed.group import WorkerDiedError

    if isinstance(error, WorkerDiedError):
        app.state.fatal = str(error)
        os.kill(os.getpid(), signal.SIGTERM)


def build_app(engine: LLMEngine, config: ServerConfig) -> FastAPI:
    """The app serving `engine`. The engine thread starts with the app (lifespan) and stops
    after the last connection closed."""
    metrics = ServerMetrics(engine, config.model_name)
    meter = ThroughputMeter()
    async_engine = AsyncEngine(engine, [metrics, meter])
    ledger = UsageLedger(config.ledger_path) if config.ledger_path is not None else None
    ctx = ServingContext(
        engine=async_engine, tokenizer=engine.tokenizer, model_name=config.model_name,
        max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size, tariff=config.tariff,
        meter=meter, ledger=ledger, max_queue=config.max_queue, retry_after_s=config.retry_after_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        async_engine.start()
        try:
            yield
        finally:
            ctx.draining = True
            await asyncio.to_thread(async_engine.stop)
            if ledger is not None:
                await asyncio.to_thread(ledger.close)

    app = FastAPI(title="tokenmill", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    app.state.fatal = None  # set when the server must exit non-zero
    async_engine.on_dead = lambda error: _exit_when_workers_die(app, error)
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        error = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind)
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error in %s %s", request.method, request.url.path)
        error = APIError(500, f"internal server error: {type(e).__name__}", type="internal_error")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: Request) -> str:
        label = config.api_keys.label_for(request.headers.get("authorization"))
        if label is None:
            given = bool(request.headers.get("authorization"))
            message = ("the API key is not valid" if given
                       else "no API key given: send the header 'Authorization: Bearer <key>'")
            raise APIError(401, message, code="invalid_api_key")
        return label

    async def serve(job: Job, request: Request) -> Response:
        admit(ctx, job)
        try:
            stream = await async_engine.submit(job.engine_requests())
        except InvalidRequestError as e:  # the engine's own checks, after ours
            raise bad_request(str(e)) from None
        except EngineDeadError as e:
            raise APIError(503, str(e), type="service_unavailable") from None
        gen = Generation(ctx, job, stream)
        ctx.active.add(gen)
        if job.stream:
            def close() -> None:
                ctx.active.discard(gen)
                gen.abandon()

            return EventStream(gen.events(), on_close=close)
        try:
            body = await run_collect(gen, request.receive)
        except EngineDeadError as e:
            gen.abandon()  # record what was computed before the engine stopped
            raise APIError(503, str(e), type="service_unavailable") from None
        finally:
            ctx.active.discard(gen)
        if body is None:  # the client has gone; nobody reads this
            return Response(status_code=499)
        return JSONResponse(body)

    # tokenizing and templating run on a worker thread: a long prompt does not stall the streams
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        key = authorize(request)
        req = await _parse(request, CompletionRequest)
        return await serve(await asyncio.to_thread(prepare_completion, ctx, req, key), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        key = authorize(request)
        req = await _parse(request, ChatCompletionRequest)
        return await serve(await asyncio.to_thread(prepare_chat, ctx, req, key), request)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        authorize(request)
        card = ModelCard(id=config.model_name, created=int(app.state.started_at),
                         max_model_len=engine.max_model_len)
        return ModelList(data=[card])

    @app.post("/tokenize")
    async def tokenize(request: Request) -> TokenizeResponse:
        authorize(request)
        req = await _parse(request, TokenizeRequest)
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            ids = chat_prompt(ctx, req.messages, req.add_generation_prompt)
        else:
            ids = ctx.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> DetokenizeResponse:
        authorize(request)
        req = await _parse(request, DetokenizeRequest)
        ctx.check_model(req.model)
        if any(not 0 <= t < ctx.vocab_size for t in req.tokens):
            raise bad_request(f"token ids must be in [0, {ctx.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(req.tokens))

    @app.get("/health")
    async def health() -> Response:
        if ctx.draining or not async_engine.alive:
            state = "draining" if ctx.draining else "engine stopped"
            return JSONResponse({"status": state}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.state.started_at = time.time()
    return app


def begin_drain(app: FastAPI, timeout_s: float) -> None:
    """Refuse new requests from now on; after `timeout_s` abort what still runs, so its clients
    get a final error event (SSE) or a 503 rather than a cut connection. Safe in a signal handler."""
    ctx: ServingContext = app.state.ctx
    if ctx.draining:
        return
    ctx.draining = True
    loop: asyncio.AbstractEventLoop | None = getattr(app.state, "loop", None)
    if loop is None or loop.is_closed():
        return

    def cancel_all() -> None:
        if ctx.active:
            log.warning("shutdown timeout: aborting %d running request(s)", len(ctx.active))
        for gen in list(ctx.active):
            gen.stream.cancel(EngineDeadError("the server shut down before this request finished"))

    loop.call_soon_threadsafe(loop.call_later, timeout_s, cancel_all)
