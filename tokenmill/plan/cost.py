"""Money and energy per token, from the chip-hour price and the board power."""

from __future__ import annotations

SECONDS_PER_HOUR = 3600.0


def usd_per_million_tokens(chips: int, usd_per_chip_hour: float, tokens_per_s: float) -> float:
    """$/1M tokens = chips * $/chip-hour / (tokens/s * 3600 s/h) * 1e6."""
    if tokens_per_s <= 0:
        return float("inf")
    return chips * usd_per_chip_hour / (tokens_per_s * SECONDS_PER_HOUR) * 1e6


def joules_per_token(chips: int, power_w: float, tokens_per_s: float) -> float:
    """J/token = chips * W / (tokens/s); board power at full load, cooling not included."""
    if tokens_per_s <= 0:
        return float("inf")
    return chips * power_w / tokens_per_s


def implied_usd_per_chip_hour(usd_per_million: float, tokens_per_s: float, chips: int) -> float:
    """The chip-hour price a claimed $/1M tokens implies at the claimed speed: the inverse of
    usd_per_million_tokens."""
    return usd_per_million * tokens_per_s * SECONDS_PER_HOUR / 1e6 / chips
