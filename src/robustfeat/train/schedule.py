"""The optimizer, its learning-rate schedule and the training attack's strength per step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import Config
from .extensions import Extension, eps_schedules


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    # Weight decay on conv and linear weights only (not BN, not biases), as in Madry et al.'s code.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    return torch.optim.Adam(groups, lr=cfg.optim.lr)


def learning_rate(cfg: Config, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    step: lr * gamma^(number of milestones passed). cyclic: a triangle over the run, evaluated at the end
    of the step (``step + 1``) so that the first update is not a zero step: rising linearly from 0 to lr
    at ``peak * steps``, falling linearly to 0 at ``steps``.
    """
    o = cfg.optim
    if o.schedule == "cyclic":
        t, top = (step + 1) / o.steps, o.peak
        return o.lr * (t / top if t <= top else max(0.0, (1.0 - t) / (1.0 - top)))
    passed = sum(1 for m in o.milestones if step >= m)
    return o.lr * o.gamma**passed


def attack_strength(cfg: Config, step: int, extensions: Sequence[Extension] | None = None) -> tuple[float, float]:
    """(eps, step_size) of the training attack at ``step``: the config's, times the ``eps_scale`` of
    every extension (by default the config's eps schedules: a warm-up from 0, a ramp towards
    ``attack.eps_final``); the step size keeps its ratio to eps."""
    scale = 1.0
    for ext in eps_schedules(cfg) if extensions is None else extensions:
        scale *= ext.eps_scale(step)
    return cfg.attack.eps * scale, cfg.attack.step_size * scale
