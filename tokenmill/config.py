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
class EngineConfig:
    model: str = "smollm2-135m"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    seed: int = 0
    threads: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    DTYPES = ("auto", "float32", "bfloat16", "float16")

    def __post_init__(self) -> None:
        if self.dtype not in self.DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: accepted {', '.join(self.DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r}: accepted auto, cpu, cuda, cuda:N")
