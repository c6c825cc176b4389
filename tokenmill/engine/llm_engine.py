"""LLMEngine: add requests, step the batch (schedule -> execute -> update), read outputs.

With speculative decoding a step first asks the proposer for drafts (spec/), which the
scheduler hands out as extra tokens and the runner verifies in the same forward pass.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import time
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path

import torch

from tokenmill.bench.bandwidth import machine_signature
from tokenmill.config import ConfigError, EngineConfig, SchedulerConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.scheduler import Scheduler
from tokenmill.distributed.group import TPGroup, WorkerDiedError
from tokenmill.distributed.shard import max_local_kv_heads
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.loader.model_loader import LoadedModel, load_model, read_model_config
from tokenmill.loader.resolve import resolve_model
from tokenmill.loader.tokenizer import Tokenizer, load_tokenizer
from tokenmill.model.fusion import fuse_projections
from tokenmill.outputs import (
    CompletionOutput,
    ModelRunnerOutput,
    RequestMetrics,
    RequestOutput,
    SchedulerOutput,
)
from tokenmill.quant import check_device as check_quant_device
from tokenmill.quant import resolve_quantization
from tokenmill.quant.report import kv_cache_note, weights_note
from tokenmill.request import Request, RequestStatus
from tokenmill.sample.sampler import SamplingState
from tokenmill.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.spec import Proposer, SpecStats, make_proposer
from tokenmill.spec.adaptive import Acceptance, SpecController, measure_pass_cost
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


def resolve_dtype(name: str, device: torch.device, quantized: bool = False) -> torch.dtype:
    if name == "auto":  # packed weights run bf16 activations (their kernels' fast path)
        return torch.bfloat16 if device.type == "cuda" or quantized else torch.float32
    return _DTYPES[name]


def resolve_weights(config: EngineConfig, device: torch.device) -> tuple[Path, str, torch.dtype]:
    """(model path, weight scheme that runs: none | gguf | int8 ..., compute dtype), the same on
    every tensor-parallel rank."""
    path = resolve_model(config.model) if config.load_format != "dummy" else Path(config.model)
    quantization = resolve_quantization(config.quantization, path)
    check_quant_device(quantization, device)
    return path, quantization, resolve_dtype(config.dtype, device, quantized=quantization != "none")


_unfreeze_at_exit = False


def settle_memory() -> None:
    """Once the engine is built: give the loader's freed temporaries back to the OS, and take the
    objects that live as long as the process out of the cyclic garbage collector.

    * glibc keeps freed heap memory mapped: the loader's float temporaries left 190-500 MB of
      RSS behind on the default model (most with fp8 at load; `malloc_trim` returns them).
    * Every full collection walks every tracked object (~300k after loading: the model's modules,
      the tokenizer, torch's own); decode steps allocate enough to trigger them, and at 256
      requests they cost ~0.6 ms per step (benchmarks/host_overhead.py). `gc.freeze` after a
      collection moves the survivors out of the collector's sight (vLLM does the same); they are
      given back to it at exit, so finalizers still run, and before the next engine's collection,
      so cycles left by an engine that is gone are still freed."""
    global _unfreeze_at_exit
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if not _unfreeze_at_exit:
        atexit.register(gc.unfreeze)
        _unfreeze_at_exit = True
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: nothing to trim
        pass


@dataclass(frozen=True)
class Shard:
    """What every rank holds: its (slice of the) model, KV pool and runner."""

    loaded: LoadedModel
    num_blocks: int
    runner: ModelRunner

    def weight_bytes(self) -> tuple[int, int]:
        """(bytes of the file read, bytes of weights one forward pass reads)."""
        from tokenmill.bench.bytes import weight_bytes_per_step

        return self.loaded.file_bytes, weight_bytes_per_step(self.loaded.model)


def load_shard(config: EngineConfig, model_path, quantization: str, dtype: torch.dtype, device: torch.device,
               tp: TPGroup | None, show_progress: bool) -> Shard:
    """Load the model (this rank's slice under tensor parallelism), merge its projections,
    size and allocate the KV pool and build the runner. Every rank sizes its pool for the rank
    with the most KV heads, so all hold the same number of blocks."""
    loaded = load_model(model_path, dtype, device, show_progress=show_progress, quantization=quantization,
                        group_size=config.quant_group_size, tp=tp, load_format=config.load_format)
    fuse_projections(loaded.model)  # q/k/v and gate/up as one matmul each (model/fusion.py)
    cache, kv_dtype = config.cache, config.kv_cache_dtype
    local = loaded.model.local_config
    sizing = local
    if tp is not None:  # KV bytes depend on the KV heads alone; num_heads only keeps the config valid
        most = max_local_kv_heads(loaded.config, tp.size)
        sizing = dc_replace(local, num_kv_heads=most, num_heads=most * (local.num_heads // local.num_kv_heads))
    num_blocks = num_blocks_for(sizing, cache, dtype, kv_dtype)
    graphs = config.cuda_graphs
    if graphs is not False:  # None (wherever they can run) or True (asked for)
        from tokenmill.worker import cuda_graphs

        possible = tp is None and cuda_graphs.usable(device, kv_dtype)
        if graphs and not possible:
            raise ConfigError("cuda_graphs needs one CUDA device (no tensor parallelism), Triton, and a KV cache "
                              f"its decode kernel reads (auto, int8; fp8 on sm89+); got device {device}, "
                              f"tensor_parallel_size {config.tensor_parallel_size}, kv_cache_dtype {kv_dtype}")
        graphs = possible
    # with graphs, one extra block that no request owns takes the padding rows' K/V
    kv_caches = allocate_kv_caches(local, num_blocks + int(graphs), cache.block_size, dtype, device, kv_dtype)
    runner = ModelRunner(loaded.model, kv_caches, cache.block_size, device, config.compile)
    if graphs:
        max_len = min(config.scheduler.max_model_len, loaded.config.max_position_embeddings,
                      num_blocks * cache.block_size)
        runner.cuda_graphs = cuda_graphs.CudaGraphDecoder(loaded.model, kv_caches, cache.block_size, max_len,
                                                          config.scheduler.max_num_seqs, num_blocks, device,
                                                          runner.compiled_groups)
    return Shard(loaded, num_blocks, runner)


def _tokenizer(loaded: LoadedModel, path: Path) -> Tokenizer:
    if loaded.gguf_reader is not None:
        return Tokenizer.from_gguf(loaded.gguf_reader)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return load_tokenizer(path)
    if path.suffix == ".gguf" and path.is_file():
        from tokenmill.loader.gguf_loader import open_gguf

        return Tokenizer.from_gguf(open_gguf(path))
    # dummy weights without a tokenizer of their own: the default model's
    from tokenmill.loader.gguf_loader import open_gguf
    from tokenmill.loader.resolve import default_model_path

    return Tokenizer.from_gguf(open_gguf(default_model_path()))


@dataclass
class _Track:
    """Engine-side state of one request besides what the scheduler holds."""

    request: Request
    prompt: str | None
    state: SamplingState
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, float]] | None
    cumulative_logprob: float = 0.0
    acceptance: Acceptance = field(default_factory=Acceptance)  # of its drafts (speculative decoding)


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0  # tokens computed that were not sampled outputs' KV
    computed_tokens: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0
    spec: SpecStats = field(default_factory=SpecStats)  # speculative decoding counters


class LLMEngine:
    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is not None and config.tensor_parallel_size == 1:
            # Triton launches on the current device's stream, and graphs capture on it: make it
            # the one asked for (tensor-parallel ranks set theirs, distributed/worker.py)
            torch.cuda.set_device(self.device)
        self.model_path, self.quantization, self.dtype = resolve_weights(config, self.device)
        self.tp, self._tp_launcher = None, None
        if config.tensor_parallel_size > 1:
            from tokenmill.distributed.shard import TPShard
            from tokenmill.distributed.worker import start_tensor_parallel

            # refuse an impossible split before any worker process starts
            TPShard.check(read_model_config(self.model_path, config.load_format), config.tensor_parallel_size)
            self.tp, self._tp_launcher = start_tensor_parallel(config, self.device)
        shard = load_shard(config, self.model_path, self.quantization, self.dtype, self.device, self.tp, show_progress)
        loaded, cache, kv_dtype = shard.loaded, config.cache, config.kv_cache_dtype
        self.model_config = loaded.config
        self.weight_file_bytes = loaded.file_bytes
        # per rank (tensor parallelism: its shard): bytes of the weight file it read, bytes of
        # weights one forward pass reads
        mine = shard.weight_bytes()
        ranks = [mine] if self.tp is None else self.tp.all_gather_object(mine)
        self.rank_weight_bytes = [r[0] for r in ranks]
        self.step_weight_bytes = sum(r[1] for r in ranks)
        if self.tp is not None:
            atexit.register(self.shutdown)
            log.info("tensor parallel: %d ranks (%s); weight bytes read per rank: %s", self.tp.size,
                     ("gloo" if self.device.type == "cpu" else "nccl") + (" + shared memory" if self.tp.shm else ""),
                     ", ".join(f"{b / 2**20:.1f} MiB" for b in self.rank_weight_bytes))
        self.tokenizer = _tokenizer(loaded, self.model_path)
        self.tokenizer.byte_pieces()  # built here, not in the first request's latency (~0.08 s)
        self.num_blocks = shard.num_blocks
        self.max_model_len = min(
            config.scheduler.max_model_len, loaded.config.max_position_embeddings, self.num_blocks * cache.block_size
        )
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s); max_model_len %d",
            self.num_blocks, cache.block_size, self.num_blocks * cache.block_size,
            self.num_blocks * bytes_per_block(loaded.model.local_config, cache.block_size, self.dtype, kv_dtype) / 2**20,
            kv_cache_note(loaded.config, self.dtype, kv_dtype), self.max_model_len,
        )
        log.info("weights: %s", weights_note(loaded.model, self.quantization, self.dtype))
        self.kv = KVCacheManager(self.num_blocks, cache.block_size, cache.enable_prefix_caching)
        sc = config.scheduler
        self.scheduler = Scheduler(
            SchedulerConfig(sc.max_num_seqs, sc.max_num_batched_tokens, self.max_model_len), self.kv
        )
        self.runner = shard.runner
        self.model = loaded.model
        self._tracks: dict[str, _Track] = {}
        self.stats = EngineStats()
        self._init_speculation(show_progress)
        settle_memory()

    def _init_speculation(self, show_progress: bool) -> None:
        """The proposer and the controller deciding, per step, how many drafts to use."""
        spec = self.config.speculative
        self.stats.spec = SpecStats(method=spec.method, num_speculative_tokens=spec.num_speculative_tokens)
        self.proposer: Proposer | None = None
        self._spec_off_reasons: set[str] = set()  # logged once each
        if not spec.enabled:
            return
        k, bs = spec.num_speculative_tokens, self.config.cache.block_size
        self.proposer = make_proposer(spec, self.model, self.dtype, self.device, self.num_blocks, bs, show_progress)
        cost = None
        if spec.adaptive and spec.max_batch is None:
            sc = self.config.scheduler
            limit = max(1, min(sc.max_num_seqs, sc.max_num_batched_tokens // (k + 1)))
            key = "|".join(map(str, (
                machine_signature(), self.model_path, self.weight_file_bytes, self.device, self.dtype,
                self.config.quantization, self.config.kv_cache_dtype, torch.get_num_threads(), bs, k, limit,
                spec.method, spec.draft_model,
            )))
            draft_runner = getattr(self.proposer, "runner", None)  # a draft model's, if any
            cost = measure_pass_cost(self.runner, k, limit, self.num_blocks, bs, draft_runner, key)
        self.spec_controller = SpecController(k, cost, spec.max_batch, spec.adaptive)

    def on_fatal(self, listener) -> None:
        """Call `listener(WorkerDiedError)` (from another thread) when a tensor-parallel worker
        dies, even while no step runs."""
        if self._tp_launcher is not None:
            self._tp_launcher.on_death(listener)

    def shutdown(self) -> None:
        """Release the tensor-parallel workers (they exit); idempotent. A single-device engine
        holds nothing to release."""
        if self.tp is None:
            return
        if self._tp_launcher is not None:
            self._tp_launcher.shutdown()
        elif torch.distributed.is_initialized():  # torchrun: the workers wait for our None
            try:
                self.tp.broadcast_object(None)
            except WorkerDiedError:
                pass
            torch.distributed.destroy_process_group()
            if self.tp.shm is not None:
                self.tp.shm.close()

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
                                       params.stop, params.include_stop_str_in_output,
                                       incremental=params.output_kind != "final_only" or bool(params.stop))
        self.scheduler.add_request(request)
        self._tracks[request_id] = _Track(request, text, state, detok, [] if params.logprobs is not None else None)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        if self._tracks.pop(request_id, None) is not None:
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
            if self.proposer is not None:
                self.proposer.free(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracks)

    @property
    def num_unfinished(self) -> int:
        return len(self._tracks)

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """(propose ->) schedule -> execute -> update. Returns an output for every request that
        got tokens."""
        launcher = self._tp_launcher
        if launcher is not None and launcher.death is not None:  # a rank died while the engine was idle
            raise WorkerDiedError(launcher.death)
        t0 = time.perf_counter()
        draft_probs = self._propose() if self.proposer is not None else {}
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        states = {}
        num_before = {}
        for r in sched.requests:
            track = self._tracks[r.request_id]
            if r.sample:
                self._set_suppression(track)
                states[r.request_id] = track.state
                num_before[r.request_id] = len(track.request.output_token_ids)
        launcher = self._tp_launcher
        try:
            if launcher is not None:
                launcher.stepping = True  # its watchdog ends a step stuck on a dead rank
            result = self.runner.execute(sched, states, draft_probs)
        except WorkerDiedError as e:
            if launcher is not None:
                launcher.died.wait(5)  # the socket error can come before the watchdog wakes
            raise WorkerDiedError(launcher.death if launcher and launcher.death else str(e)) from None
        finally:
            if launcher is not None:
                launcher.stepping = False
        updated = self.scheduler.update(sched, result)
        outputs = []
        emitted: dict[str, int] = {}  # new tokens per request
        for r in updated:
            out, emitted[r.request_id] = self._output(r, result, num_before[r.request_id])
            if out is not None:
                outputs.append(out)
        if self.proposer is not None:
            self._record_spec(sched, result, emitted)
        self.stats.steps += 1
        self.stats.computed_tokens += sched.num_tokens
        self.stats.generated_tokens += sum(emitted.values())
        self.stats.busy_seconds += time.perf_counter() - t0
        return outputs

    # -- speculative decoding -----------------------------------------------------------------
    def _propose(self) -> dict[str, torch.Tensor]:
        """Set drafts on the running requests in decode position (k chosen by the controller,
        capped so no draft lies past max_tokens or the context window). Returns the draft
        distributions of proposals that have one."""
        running = self.scheduler.running
        if not running:
            return {}
        for r in running:
            r.spec_token_ids = []
        controller = self.spec_controller
        self.stats.spec.current_k = controller.begin_step(len(running))
        self.stats.spec.num_switches = controller.num_switches
        if controller.current == 0:
            return {}
        wanted, counts = [], []
        for r in running:
            if r.num_tokens - r.num_computed_tokens != 1 or not self._may_speculate(r):
                continue
            k = controller.drafts(self._tracks[r.request_id].acceptance)
            n = min(k, r.max_tokens - len(r.output_token_ids) - 1, self.max_model_len - r.num_tokens)
            if n > 0:
                wanted.append(r)
                counts.append(n)
        if not wanted:
            return {}
        t0 = time.perf_counter()
        proposals = self.proposer.propose(wanted, counts)
        self.stats.spec.propose_seconds += time.perf_counter() - t0
        probs = {}
        for r, n, proposal in zip(wanted, counts, proposals):
            r.spec_token_ids = proposal.token_ids[:n]
            if proposal.probs is not None and r.spec_token_ids:
                probs[r.request_id] = proposal.probs
        return probs

    def _may_speculate(self, request: Request) -> bool:
        """Penalties depend on every earlier output token and min_tokens suppresses stop tokens
        per position; the verification path supports neither, so such requests decode plainly
        (penalties: always; min_tokens: until that many tokens are out). Logged once per reason."""
        p = request.params
        reason = None
        if not p.speculative:
            return False
        if p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0:
            reason = "requests with repetition/presence/frequency penalties"
        elif len(request.output_token_ids) < p.min_tokens:
            reason = "requests until min_tokens tokens are out"
        if reason is None:
            return True
        if reason not in self._spec_off_reasons:
            self._spec_off_reasons.add(reason)
            log.info("speculation is off for %s", reason)
        return False

    def _record_spec(self, sched: SchedulerOutput, result: ModelRunnerOutput, emitted: dict[str, int]) -> None:
        for r in sched.requests:
            if r.spec_token_ids:
                accepted = len(result.accepted.get(r.request_id, []))
                self.stats.spec.record(len(r.spec_token_ids), accepted, emitted.get(r.request_id, 0))
                track = self._tracks.get(r.request_id)  # None once finished
                self.spec_controller.observe(track and track.acceptance, len(r.spec_token_ids), accepted)

    def _set_suppression(self, track: _Track) -> None:
        p = track.state.params
        if p.min_tokens and len(track.request.output_token_ids) < p.min_tokens:
            track.state.suppress_token_ids = set(track.request.eos_token_ids) | set(p.stop_token_ids)
        elif track.state.suppress_token_ids:
            track.state.suppress_token_ids = set()

    def _output(self, request: Request, result: ModelRunnerOutput, num_before: int) -> tuple[RequestOutput | None, int]:
        """The request's output after this step's new tokens (output_token_ids[num_before:]), or
        None for an unfinished final_only request; and how many new tokens it emitted."""
        rid = request.request_id
        track = self._tracks[rid]
        new = request.output_token_ids[num_before:]
        # a stop token (eos or stop_token_ids) ends the output but adds no text, as in vLLM;
        # update() appends it last
        stopped_by_token = request.status == RequestStatus.FINISHED_STOPPED
        delta = ""
        for i, token in enumerate(new):
            if stopped_by_token and i == len(new) - 1:
                break
            delta += track.detok.update([token])
            if track.detok.stop_reason is not None:  # a stop string ends the output at this token
                del request.output_token_ids[num_before + i + 1 :]
                new = new[: i + 1]
                break
        first_logprob = len(track.logprobs) if track.logprobs is not None else 0
        if track.logprobs is not None and rid in result.logprobs:
            lps = result.accepted_logprobs.get(rid, []) + [result.logprobs[rid]]
            tops = result.accepted_top_logprobs.get(rid, []) + [result.top_logprobs.get(rid, [])]
            for token, lp, top in zip(new, lps, tops):
                entry = dict(top)
                entry[token] = lp
                track.logprobs.append(entry)
                track.cumulative_logprob += lp
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
            if self.proposer is not None:
                self.proposer.free(rid)
        emitted = len(new)
        kind = request.params.output_kind
        if kind == "final_only":
            if not finished:
                return None, emitted
            delta, new = track.detok.text, list(request.output_token_ids)  # since its previous output: all
        if kind == "delta":  # only this step's part: no copy of what earlier outputs carried
            text, token_ids = delta, new
            logprobs = track.logprobs[first_logprob:] if track.logprobs is not None else None
        else:
            text, token_ids, logprobs = track.detok.text, list(request.output_token_ids), track.logprobs
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=token_ids,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=logprobs,
            cumulative_logprob=track.cumulative_logprob if track.logprobs is not None else None,
            delta=delta,
            delta_token_ids=new,
            num_output_tokens=len(request.output_token_ids),
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
        ), emitted
