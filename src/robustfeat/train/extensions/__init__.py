"""Training extensions: the interface (``base``) and the add-ons a config can switch on.

    eps_schedule   attack.eps_warmup_examples, attack.eps_final
    ema            optim.ema
    carry          attack.carry
    grad_align     method.grad_align
    rollback       run.rollback_drop (run.rollback_lr, run.rollback_after)
    dead_start     run.restart_below
"""

from __future__ import annotations

from ...config import Config
from ...methods import METHODS
from .base import Batch, Extension, Run, Verdict, watches_validation
from .carry import CarriedStarts, CarryStarts
from .dead_start import MAX_RESTARTS, DeadStartGuard
from .ema import WeightAverage
from .eps_schedule import EpsFinal, EpsWarmup
from .grad_align import GradAlign
from .rollback import RollbackGuard

__all__ = [
    "MAX_RESTARTS", "Batch", "CarriedStarts", "CarryStarts", "DeadStartGuard", "EpsFinal", "EpsWarmup",
    "Extension", "GradAlign", "RollbackGuard", "Run", "Verdict", "WeightAverage", "eps_schedules",
    "from_config", "watches_validation",
]


def eps_schedules(cfg: Config) -> list[Extension]:
    """The eps schedules the config asks for, warm-up first (their factors multiply in this order)."""
    a = cfg.attack
    out: list[Extension] = []
    if a.eps_warmup_examples > 0:
        out.append(EpsWarmup(a.eps_warmup_examples, cfg.optim.batch_size))
    if a.eps_final > 0:
        out.append(EpsFinal(a.eps, a.eps_final, a.eps_final_from, cfg.optim.steps))
    return out


def from_config(cfg: Config, distributed: bool = False) -> list[Extension]:
    """The extensions the config switches on, in the order the loop calls them (``distributed``: a
    multi-process run, which some refuse with a TrainingError)."""
    out = eps_schedules(cfg)
    if cfg.optim.ema > 0:
        out.append(WeightAverage(cfg.optim.ema))
    if cfg.attack.carry:
        carry = CarryStarts(cfg.attack.start_scale, distributed)
        if METHODS.get(cfg.method.name).adversarial:
            out.append(carry)
    if cfg.method.grad_align > 0:
        out.append(GradAlign(cfg.method.grad_align))
    if cfg.run.rollback_drop > 0:  # before the dead-start guard: a rollback decides first
        out.append(RollbackGuard(cfg.run.rollback_drop, cfg.run.rollback_lr, cfg.run.rollback_after))
    if cfg.run.restart_below > 0:
        out.append(DeadStartGuard(cfg.run.restart_below))
    return out
