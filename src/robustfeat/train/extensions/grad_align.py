"""``method.grad_align``: the GradAlign regularizer (Andriushchenko & Flammarion 2020).

Adds ``weight * mean(1 - cos(grad_x CE(x), grad_x CE(x + eta)))`` to the loss, eta uniform in the
eps-ball (drawn from the step's attack generator, for the global batch, so that runs split over
processes draw the numbers of one process); the penalty is logged as ``grad_align``.
"""

from __future__ import annotations

import torch

from ...methods import grad_align_penalty
from .base import Batch, Extension, Run


class GradAlign(Extension):
    def __init__(self, weight: float):
        self.weight = weight

    def extra_loss(self, run: Run, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        eta = torch.empty(batch.shape, device=run.device).uniform_(-batch.eps, batch.eps, generator=batch.generator)
        ga = grad_align_penalty(run.model, batch.x, batch.y, run.dctx.shard(eta))  # [distributed] this rank's rows
        return self.weight * ga, {"grad_align": ga.detach()}
