"""Frozen configuration, one dataclass per subsystem, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value the engine cannot run with; the message names it and what is accepted."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters of a llama-family decoder (llama, mistral, qwen2)."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2 has biases on q/k/v

    SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")

    def __post_init__(self) -> None:
        if self.arch not in self.SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(self.SUPPORTED_ARCHS)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def num_params(self) -> int:
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * f + 2 * h
        return self.num_layers * per_layer + v * h * (1 if self.tie_word_embeddings else 2) + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: blocks of `block_size` tokens, as many as `memory_bytes` holds."""

    block_size: int = 16
    memory_bytes: int = 1 << 30
    num_blocks: int | None = None  # overrides memory_bytes (tests use tiny pools)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size}: must be a power of two >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks={self.num_blocks}: must be >= 1")
        if self.memory_bytes <= 0:
            raise ConfigError(f"kv cache memory={self.memory_bytes} bytes: must be > 0")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits per engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding: a proposer guesses up to `num_speculative_tokens` tokens per request
    and step, and the target verifies them all in the step's one forward pass.

    method: none | ngram (prompt lookup, no extra model) | draft (`draft_model`, any smaller
    model with the same tokenizer) | self (the target's own weights quantized to
    `self_quantization`). `max_batch` turns speculation off while more requests run than it
    says; None measures the pass cost on this machine at start-up and decides from it and the
    acceptance seen so far (see spec/adaptive.py); `adaptive=False` always speculates.
    """

    method: str = "none"
    num_speculative_tokens: int = 4
    draft_model: str | None = None
    self_quantization: str = "int4"
    ngram_min: int = 1
    ngram_max: int = 4
    adaptive: bool = True
    max_batch: int | None = None

    METHODS = ("none", "ngram", "draft", "self")

    def __post_init__(self) -> None:
        if self.method not in self.METHODS:
            raise ConfigError(f"speculative method={self.method!r}: accepted {', '.join(self.METHODS)}")
        if not 0 <= self.num_speculative_tokens <= 16:
            raise ConfigError(f"num_speculative_tokens={self.num_speculative_tokens}: must be in [0, 16]")
        if self.method == "draft" and not self.draft_model:
            raise ConfigError("speculative method 'draft' needs draft_model (a path or alias)")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"ngram_min={self.ngram_min}, ngram_max={self.ngram_max}: need 1 <= min <= max")
        if self.self_quantization != "int4":
            raise ConfigError(f"self_quantization={self.self_quantization!r}: accepted int4")
        if self.max_batch is not None and self.max_batch < 0:
            raise ConfigError(f"speculative max_batch={self.max_batch}: must be >= 0 or None (measured)")

    @property
    def enabled(self) -> bool:
        return self.method != "none" and self.num_speculative_tokens > 0


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    seed: int = 0
    threads: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpecConfig = field(default_factory=SpecConfig)
    # weights: auto = GGUF quantized tensors run packed, float models stay float (docs/quantization.md)
    quantization: str = "auto"  # auto | none | int8 | int4 | fp8
    quant_group_size: int = 32  # int4 only
    kv_cache_dtype: str = "auto"  # auto (= the compute dtype) | int8 | fp8
    compile: bool = False  # torch.compile the decode step (worker/model_runner.py)
    tensor_parallel_size: int = 1  # ranks each layer is split over (tokenmill/distributed/)
    load_format: str = "auto"  # auto (read the weights) | dummy (random weights; loader/dummy.py)
    # replay decode steps as captured CUDA graphs (worker/cuda_graphs.py); None = wherever they
    # can run (one CUDA device, Triton, a KV cache its decode kernel reads), as vLLM does unless
    # told to stay eager
    cuda_graphs: bool | None = None

    DTYPES = ("auto", "float32", "bfloat16", "float16")
    QUANTIZATIONS = ("auto", "none", "int8", "int4", "fp8")
    GROUP_SIZES = (32, 64, 128)
    KV_CACHE_DTYPES = ("auto", "int8", "fp8")

    def __post_init__(self) -> None:
        if self.dtype not in self.DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: accepted {', '.join(self.DTYPES)}")
        if self.quantization not in self.QUANTIZATIONS:
            raise ConfigError(f"quantization={self.quantization!r}: accepted {', '.join(self.QUANTIZATIONS)}")
        if self.quant_group_size not in self.GROUP_SIZES:
            raise ConfigError(f"quant_group_size={self.quant_group_size}: accepted "
                              f"{', '.join(map(str, self.GROUP_SIZES))}")
        if self.kv_cache_dtype not in self.KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r}: accepted {', '.join(self.KV_CACHE_DTYPES)}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format={self.load_format!r}: accepted auto, dummy")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size={self.tensor_parallel_size}: must be >= 1")
        if self.tensor_parallel_size > 1 and self.speculative.method == "self":
            # the int4 copy would be a copy of rank 0's shard, whose passes need every rank
            raise ConfigError("speculative method 'self' does not run with tensor_parallel_size > 1; "
                              "use draft (a whole draft model on rank 0), ngram or none")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r}: accepted auto, cpu, cuda, cuda:N")
        if self.tensor_parallel_size > 1 and self.device.startswith("cuda:"):
            raise ConfigError(f"device={self.device!r} with tensor_parallel_size {self.tensor_parallel_size}: each "
                              "rank takes the GPU of its local rank; give device cuda and choose the GPUs with "
                              "CUDA_VISIBLE_DEVICES")
