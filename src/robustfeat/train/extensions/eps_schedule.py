"""The training attack's eps schedules: a warm-up at the start and a ramp towards eps_final at the end.

Each gives a factor on eps (and the step size, which keeps its ratio to eps) per step.
"""

from __future__ import annotations

from .base import Extension


class EpsWarmup(Extension):
    """``attack.eps_warmup_examples``: eps ramped linearly from 0 over that many training examples."""

    def __init__(self, examples: int, batch_size: int):
        self.examples, self.batch_size = examples, batch_size

    def eps_scale(self, step: int) -> float:
        return min(1.0, (step + 1) * self.batch_size / self.examples)


class EpsFinal(Extension):
    """``attack.eps_final``: from ``eps_final_from`` of the run on, eps ramped linearly towards
    ``eps_final`` at the last step (experimental: see docs/training.md)."""

    def __init__(self, eps: float, eps_final: float, start_fraction: float, steps: int):
        self.ratio = eps_final / eps
        self.start, self.steps = start_fraction * steps, steps

    def eps_scale(self, step: int) -> float:
        frac = min(1.0, max(0.0, (step + 1 - self.start) / (self.steps - self.start)))
        return 1.0 + (self.ratio - 1.0) * frac
