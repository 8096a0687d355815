"""Learning-rate schedules: the WebUI's stepped syntax, and constant / linear / cosine with warmup."""

from __future__ import annotations

import math

from lib_trainer.errors import ConfigError


def parse_learning_rate(text: str) -> list[tuple[float, int | None]]:
    """Parse ``"0.005:100, 1e-3:1000, 1e-5"`` into ``[(rate, until_step), ..., (rate, None)]``.

    As in the WebUI, each rate holds up to and including its step; the last may have no step (to the end).
    """
    segments: list[tuple[float, int | None]] = []
    parts = [p.strip() for p in str(text).split(",")]
    for i, part in enumerate(parts):
        rate_text, _, step_text = part.partition(":")
        try:
            rate = float(rate_text)
            step = int(step_text) if step_text.strip() else None
        except ValueError:
            raise ConfigError(
                f"train.learning_rate {text!r}: {part!r} is not 'rate' or 'rate:step'; "
                "write for example '0.005' or '0.005:100, 1e-3:1000, 1e-5'",
                field="train.learning_rate",
            ) from None
        if not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(
                f"train.learning_rate {text!r}: the rate {rate_text.strip()!r} must be a positive number",
                field="train.learning_rate",
            )
        if step is None and i != len(parts) - 1:
            raise ConfigError(
                f"train.learning_rate {text!r}: only the last rate may omit ':step'", field="train.learning_rate"
            )
        if step is not None and (step < 1 or (segments and segments[-1][1] is not None and step <= segments[-1][1])):
            raise ConfigError(
                f"train.learning_rate {text!r}: steps must be positive and increasing", field="train.learning_rate"
            )
        segments.append((rate, step))
    return segments


class LearningRate:
    """Learning rate at each (1-based) optimizer step."""

    def __init__(
        self, text: str, schedule: str, warmup_steps: int, total_steps: int, cycles: int = 1, power: float = 1.0
    ):
        self.segments = parse_learning_rate(text)
        self.schedule, self.warmup, self.total = schedule, warmup_steps, max(total_steps, 1)
        self.cycles, self.power = cycles, power

    @property
    def base_rate(self) -> float:
        """The first (or only) rate."""
        return self.segments[0][0]

    def at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (1-based)."""
        rate = self._stepped(step)
        if self.warmup and step <= self.warmup:
            return rate * step / self.warmup
        if self.schedule == "constant":
            return rate
        span = max(self.total - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        if self.schedule == "linear":
            return rate * (1.0 - progress)
        if self.schedule == "polynomial":  # diffusers' polynomial decay to 0
            return rate * (1.0 - progress) ** self.power
        if self.schedule == "cosine_with_restarts":  # diffusers' hard restarts: each cycle decays from the full rate
            return 0.0 if progress >= 1.0 else rate * 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * progress) % 1.0)))
        return rate * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _stepped(self, step: int) -> float:
        for rate, until in self.segments:
            if until is None or step <= until:
                return rate
        return self.segments[-1][0]
