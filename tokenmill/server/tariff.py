"""The price of a request: fixed $ per 1M tokens, or derived from $ per hour of the machine.

Fixed tariff:   price = (uncached prompt x input + cached prompt x cached_input + completion x output) / 1e6

Hourly tariff:  the machine costs usd_per_hour whether it prefills or decodes, so a token costs
what the engine time it takes costs. The meter measures that time on the engine thread:

    decode s/token  = time of decode-only steps / tokens they sampled
    prefill s/token = (time of other steps - their decode tokens x decode s/token) / prompt tokens computed
    output $/1M     = usd_per_hour / 3600 x decode s/token  x 1e6
    input $/1M      = usd_per_hour / 3600 x prefill s/token x 1e6     (cached prompt tokens: 0)

Both are decayed sums (each step weighs DECAY of the previous), so the price follows the load:
a busy batch makes every token cheaper. Idle time is charged to nobody.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

from tokenmill.config import ConfigError
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.server.async_engine import StepRecord


@dataclass(frozen=True)
class Prices:
    """$ per 1M tokens that one request is charged."""

    input_per_mtok: float
    cached_input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        uncached = max(prompt_tokens - cached_tokens, 0)
        return (uncached * self.input_per_mtok + cached_tokens * self.cached_input_per_mtok
                + completion_tokens * self.output_per_mtok) / 1e6

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class ThroughputMeter:
    """Seconds per prefill and per decode token, measured step by step (an EngineObserver)."""

    DECAY = 0.99

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decode = [0.0, 0.0]  # decayed seconds, tokens
        self._prefill = [0.0, 0.0]

    def on_step(self, engine: LLMEngine, step: StepRecord) -> None:
        prefill_tokens = step.computed_tokens - step.decode_tokens
        with self._lock:
            if prefill_tokens <= 0 and step.decode_tokens:
                self._add(self._decode, step.seconds, step.decode_tokens)
                return
            per_decode = self._ratio(self._decode) or 0.0
            self._add(self._prefill, max(step.seconds - step.decode_tokens * per_decode, 0.0),
                      max(prefill_tokens, 0))

    def on_abort(self, num_requests: int) -> None:
        pass

    def on_refresh(self, engine: LLMEngine) -> None:
        pass

    def _add(self, acc: list[float], seconds: float, tokens: int) -> None:
        acc[0] = acc[0] * self.DECAY + seconds
        acc[1] = acc[1] * self.DECAY + tokens

    @staticmethod
    def _ratio(acc: list[float]) -> float | None:
        return acc[0] / acc[1] if acc[1] > 0 else None

    def seconds_per_token(self) -> tuple[float, float]:
        """(prefill, decode) seconds per token; one stands in for the other until both are seen."""
        with self._lock:
            prefill, decode = self._ratio(self._prefill), self._ratio(self._decode)
        if prefill is None and decode is None:
            return 0.0, 0.0
        return (prefill if prefill is not None else decode), (decode if decode is not None else prefill)


@dataclass(frozen=True)
class Tariff:
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cached_input_per_mtok: float | None = None  # None: the input price
    usd_per_hour: float | None = None  # set: prices derive from it and the measured throughput

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "usd_per_hour"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"{name}={value}: a price must be >= 0")
        if self.usd_per_hour is not None and (self.input_per_mtok or self.output_per_mtok):
            raise ConfigError("give either $ per 1M tokens or $ per hour, not both")

    def prices(self, meter: ThroughputMeter | None = None) -> Prices:
        if self.usd_per_hour is None:
            cached = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
            return Prices(self.input_per_mtok, cached, self.output_per_mtok)
        prefill_s, decode_s = meter.seconds_per_token() if meter is not None else (0.0, 0.0)
        usd_per_s = self.usd_per_hour / 3600
        return Prices(usd_per_s * prefill_s * 1e6, self.cached_input_per_mtok or 0.0, usd_per_s * decode_s * 1e6)

    def describe(self) -> str:
        if self.usd_per_hour is not None:
            return f"${self.usd_per_hour:g}/hour of the machine, priced by measured throughput"
        return f"${self.input_per_mtok:g} / ${self.output_per_mtok:g} per 1M input / output tokens"
