"""LLMEngine: add requests, step the batch (schedule -> execute -> update), read outputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig, SchedulerConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.loader.model_loader import load_model
from tokenmill.loader.resolve import resolve_model
from tokenmill.loader.tokenizer import Tokenizer, load_tokenizer
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sample.sampler import SamplingState
from tokenmill.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.worker.kv_cache import allocate_kv_caches, bytes_per_block, num_blocks_for
from tokenmill.worker.model_runner import ModelRunner

log = logging.getLogger("tokenmill")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError(f"device={name!r} requested but CUDA is not available; use cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass
class _Track:
    """Engine-side state of one request besides what the scheduler holds."""

    request: Request
    prompt: str | None
    state: SamplingState
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, float]] | None
    cumulative_logprob: float = 0.0


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0  # tokens computed that were not sampled outputs' KV
    computed_tokens: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_path = resolve_model(config.model)
        loaded = load_model(self.model_path, self.dtype, self.device, show_progress=show_progress)
        self.model_config = loaded.config
        self.weight_file_bytes = loaded.file_bytes
        self.tokenizer: Tokenizer = (
            Tokenizer.from_gguf(loaded.gguf_reader) if loaded.gguf_reader is not None else load_tokenizer(self.model_path)
        )
        cache = config.cache
        self.num_blocks = num_blocks_for(loaded.config, cache, self.dtype)
        self.max_model_len = min(
            config.scheduler.max_model_len, loaded.config.max_position_embeddings, self.num_blocks * cache.block_size
        )
        kv_caches = allocate_kv_caches(loaded.config, self.num_blocks, cache.block_size, self.dtype, self.device)
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s); max_model_len %d",
            self.num_blocks, cache.block_size, self.num_blocks * cache.block_size,
            self.num_blocks * bytes_per_block(loaded.config, cache.block_size, self.dtype) / 2**20,
            str(self.dtype).removeprefix("torch."), self.max_model_len,
        )
        self.kv = KVCacheManager(self.num_blocks, cache.block_size, cache.enable_prefix_caching)
        sc = config.scheduler
        self.scheduler = Scheduler(
            SchedulerConfig(sc.max_num_seqs, sc.max_num_batched_tokens, self.max_model_len), self.kv
        )
        self.runner = ModelRunner(loaded.model, kv_caches, cache.block_size, self.device)
        self.model = loaded.model
        self._tracks: dict[str, _Track] = {}
        self.stats = EngineStats()

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        """Validate and queue one request. A bad request raises InvalidRequestError and leaves
        the engine and every other request untouched."""
        params = params or SamplingParams()
        if request_id in self._tracks:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        if not token_ids:
            raise InvalidRequestError("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt_token_ids must be integers in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens; the context window (max_model_len) is "
                f"{self.max_model_len}, which must leave room for at least one output token"
            )
        room = self.max_model_len - len(token_ids)
        eos = frozenset(self.tokenizer.stop_token_ids)
        request = Request(request_id, token_ids, params, eos_token_ids=eos,
                          max_tokens=min(params.max_tokens or room, room))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        state = SamplingState(params=params, prompt_token_ids=request.prompt_token_ids,
                              output_token_ids=request.output_token_ids, generator=generator)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                       params.stop, params.include_stop_str_in_output)
        self.scheduler.add_request(request)
        self._tracks[request_id] = _Track(request, text, state, detok, [] if params.logprobs is not None else None)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        if self._tracks.pop(request_id, None) is not None:
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracks)

    @property
    def num_unfinished(self) -> int:
        return len(self._tracks)

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> update. Returns an output for every request that got tokens."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        states = {}
        for r in sched.requests:
            track = self._tracks[r.request_id]
            if r.sample:
                self._set_suppression(track)
                states[r.request_id] = track.state
        result = self.runner.execute(sched, states)
        updated = self.scheduler.update(sched, result)
        self.stats.steps += 1
        self.stats.computed_tokens += sched.num_tokens
        self.stats.generated_tokens += len(updated)
        self.stats.busy_seconds += time.perf_counter() - t0
        return [self._output(r, result) for r in updated]

    def _set_suppression(self, track: _Track) -> None:
        p = track.state.params
        if p.min_tokens and len(track.request.output_token_ids) < p.min_tokens:
            track.state.suppress_token_ids = set(track.request.eos_token_ids) | set(p.stop_token_ids)
        else:
            track.state.suppress_token_ids = set()

    def _output(self, request: Request, result) -> RequestOutput:
        track = self._tracks[request.request_id]
        token = request.output_token_ids[-1]
        if track.logprobs is not None and request.request_id in result.logprobs:
            lp = result.logprobs[request.request_id]
            entry = dict(result.top_logprobs.get(request.request_id, []))
            entry[token] = lp
            track.logprobs.append(entry)
            track.cumulative_logprob += lp
        # a stop token (eos or stop_token_ids) ends the output but adds no text, as in vLLM
        stopped_by_token = request.status == RequestStatus.FINISHED_STOPPED
        delta = "" if stopped_by_token else track.detok.update([token])
        if track.detok.stop_reason is not None:
            if not request.status.finished:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = track.detok.stop_reason
        elif request.status.finished:
            delta += track.detok.finish()
        finished = request.status.finished
        if finished:
            request.finish_time = time.monotonic()
            del self._tracks[request.request_id]
        completion = CompletionOutput(
            index=0,
            text=track.detok.text,
            token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=track.logprobs,
            cumulative_logprob=track.cumulative_logprob if track.logprobs is not None else None,
            delta=delta,
            delta_token_ids=[token],
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=track.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            num_cached_tokens=request.num_cached_tokens,
            metrics=RequestMetrics(request.arrival_time, request.first_token_time, request.finish_time,
                                   request.num_preemptions),
        )
