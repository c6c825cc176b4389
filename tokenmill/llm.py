"""LLM: the offline Python API, shaped like vLLM's."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tokenmill.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig, SpecConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.loader.resolve import DEFAULT_MODEL
from tokenmill.logs import setup_logging
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import InvalidRequestError, SamplingParams

Prompt = str | dict


class LLM:
    """`LLM(model=...)`; `generate(prompts, SamplingParams(...))`; `chat(messages)`; `stream(prompt)`.

    A prompt is a string or {"prompt_token_ids": [...]}. Results come back in prompt order,
    each with .outputs[i].text / .token_ids / .finish_reason."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        kv_cache_memory_gb: float = 1.0,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_model_len: int = 2048,
        seed: int = 0,
        threads: int | None = None,
        quantization: str = "auto",
        quant_group_size: int = 32,
        kv_cache_dtype: str = "auto",
        speculative: SpecConfig | dict | None = None,
        compile: bool = False,
        tensor_parallel_size: int = 1,
        load_format: str = "auto",
        cuda_graphs: bool | None = None,
        show_progress: bool = True,
    ) -> None:
        """`speculative`: a SpecConfig or its fields as a dict, e.g.
        {"method": "ngram", "num_speculative_tokens": 4} (docs/speculative.md)."""
        if isinstance(speculative, dict):
            unknown = speculative.keys() - SpecConfig.__dataclass_fields__.keys()
            if unknown:
                raise ConfigError(f"speculative: unknown field(s) {', '.join(sorted(unknown))}")
            speculative = SpecConfig(**speculative)
        config = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            seed=seed,
            threads=threads,
            quantization=quantization,
            quant_group_size=quant_group_size,
            kv_cache_dtype=kv_cache_dtype,
            cache=CacheConfig(block_size=block_size, memory_bytes=int(kv_cache_memory_gb * 2**30),
                              num_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len),
            speculative=speculative or SpecConfig(),
            compile=compile,
            tensor_parallel_size=tensor_parallel_size,
            load_format=load_format,
            cuda_graphs=cuda_graphs,
        )
        setup_logging()
        self.engine = LLMEngine(config, show_progress=show_progress)
        self.show_progress = show_progress
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _next_id(self) -> str:
        self._counter += 1
        return str(self._counter)

    def _add(self, prompt: Prompt, params: SamplingParams) -> list[str]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise InvalidRequestError("a dict prompt needs the key 'prompt_token_ids'")
            source: str | list[int] = prompt["prompt_token_ids"]
        elif isinstance(prompt, str):
            source = prompt
        else:
            raise InvalidRequestError(f"a prompt must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
        base = self._next_id()
        ids = []
        for k in range(params.n):
            child = params
            if params.n > 1:
                child = replace(params, n=1, seed=None if params.seed is None else params.seed + k)
            rid = base if params.n == 1 else f"{base}-{k}"
            self.engine.add_request(rid, source, child)
            ids.append(rid)
        return ids

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_progress: bool | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise InvalidRequestError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        groups: list[list[str]] = []
        try:
            for prompt, params in zip(prompts, params_list):  # only the finished outputs are read
                groups.append(self._add(prompt, replace(params, output_kind="final_only")))
        except InvalidRequestError as e:
            for ids in groups:  # nothing half-submitted stays behind
                for rid in ids:
                    self.engine.abort_request(rid)
            raise InvalidRequestError(f"prompt {len(groups)}: {e}") from None
        finals = self._run(sum(len(g) for g in groups), use_progress)
        results = []
        for ids in groups:
            parts = [finals[rid] for rid in ids]
            first = parts[0]
            outputs = []
            for k, part in enumerate(parts):
                o = part.outputs[0]
                o.index = k
                outputs.append(o)
            first.outputs = outputs
            first.request_id = ids[0].split("-")[0]
            results.append(first)
        return results

    def _run(self, total: int, use_progress: bool | None) -> dict[str, RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        show = self.show_progress if use_progress is None else use_progress
        with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True, disable=not show) as progress:
            task = progress.add_task("gen", total=total)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        progress.advance(task)
        return finals

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        use_progress: bool | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [
            {"prompt_token_ids": tok.encode(tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt),
                                            add_special_tokens=False)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_progress)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one RequestOutput per new token of a single request (`.outputs[0].delta`)."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise InvalidRequestError("stream() takes n=1")
        (rid,) = self._add(prompt, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)
