"""The targeted row of the ``full`` suite: PGD on the margin z_t - z_y towards each of the top-k wrong
classes (by clean logit, k = ``TARGETS``), as Carlini et al.'s checklist asks and AutoAttack's APGD-T
does.

An example is robust only if no target succeeds. Targets are tried most likely first, and each only on
the examples every earlier target left robust: a cascade inside the row that changes none of its
flags (one success is enough), so the row costs k runs only on the robust examples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import TARGETED, pgd_budgets, predicts

TARGETED_STEPS = 100
"""Steps per target (APGD-T's count)."""
TARGETS = 3
"""Target classes per example, at most the number of classes - 1. APGD-T tries 9, but on CPU each
target costs about a PGD-200 run on the robust examples (9 targets took 8x the PGD-5/.../200 rows on
the committed CIFAR-10 model), and AutoAttack, in the same ``full`` suite, tries all 9."""


def top_targets(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) the k wrong classes with the largest logits, most likely first."""
    masked = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return masked.topk(min(k, logits.shape[1] - 1), dim=1).indices


def targeted_robust(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, row, generator: torch.Generator,
                    check: Callable[[torch.Tensor, torch.Tensor, float], None]) -> torch.Tensor:
    """Per example of (xs, ys) (all classified correctly): robust to targeted PGD towards each of its top
    ``row.targets`` wrong classes. Every adversary passes ``check`` before it is counted."""
    with torch.no_grad():
        order = top_targets(model(xs), ys, row.targets)
    ok = torch.ones(len(ys), dtype=torch.bool, device=ys.device)
    for j in range(order.shape[1]):
        sel = ok.nonzero().squeeze(1)
        if len(sel) == 0:
            break
        x_adv = pgd_budgets(model, xs[sel], ys[sel], eps=row.eps, step_size=row.step_size, budgets=[row.steps],
                            restarts=row.restarts, random_start=row.random_start, loss=TARGETED,
                            target=order[sel, j], bn_mode=row.bn_mode, generator=generator, keep_best=True,
                            prune=True)[row.steps]
        check(xs[sel], x_adv, row.eps)
        with torch.no_grad():
            ok[sel] = predicts(model(x_adv), ys[sel])
    return ok.cpu()
