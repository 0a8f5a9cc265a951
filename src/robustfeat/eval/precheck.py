"""The clean pass of an evaluation, and what it checks about the model before anything is attacked.

One pass over the examples gives the clean predictions every row counts from (computed once) and,
from the same forward pass, what AutoAttack checks before attacking:

* ``zero_gradients``: examples whose input gradient is exactly zero, or NaN or infinite anywhere, of
  the cross-entropy loss (the PGD rows' loss) or of the logit margin z_y - max_{i != y} z_i (the CW and
  targeted rows'). A gradient attack does not move from such a point, so its row overstates robustness
  there (quantized inputs, saturated softmax, non-differentiable layers, a sqrt or log at 0);
* ``deterministic_logits``: a second forward pass on the same images gives the same logits (relative
  difference at most ``RANDOM_TOL``) and predictions; a randomized model needs attacks that average
  over its randomness, which the suite does not do;
* ``outputs_are_logits``: the outputs do not look like probabilities (all in [0, 1], rows summing to
  1); the losses expect logits, and a softmax output saturates their gradients;
* ``finite_logits``: no clean image gets a NaN or infinite logit. Such an example never counts as
  correct (``attacks.predicts``), clean or attacked, but a model that overflows on clean images is
  broken, and its accuracies say little.

A model whose output is not (B, C) logits for C > every label is refused with ``ModelOutputError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import predicts
from ..config import ConfigError
from ..data import batch_starts

RANDOM_TOL = 1e-4
"""Largest relative L2 difference between two forward passes' logits still called deterministic."""
PROB_TOL = 1e-5


class ModelOutputError(ConfigError):
    """The model does not map [0, 1] images (B, C, H, W) to logits (B, num_classes)."""


@dataclass
class CleanPass:
    """Per example: clean prediction correct; and the counts behind the pre-attack checks."""

    correct: torch.Tensor
    num_classes: int
    zero_ce: int = 0
    zero_margin: int = 0
    max_rel_diff: float = 0.0
    changed: int = 0
    nonfinite: int = 0
    nan_ce: int = 0  # correctly classified examples with a NaN or infinite input gradient
    nan_margin: int = 0
    probabilities: bool = True  # until a batch shows otherwise


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i per example, (B,)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return true - other


def check_output(out, xb: torch.Tensor, yb: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """``out`` if it is a (B, C) float tensor of logits for every label (C = ``num_classes`` when given),
    else ``ModelOutputError`` naming the shape expected."""
    b = xb.shape[0]
    want = f"({b}, {num_classes})" if num_classes else f"({b}, C) with C > {int(yb.max())}"
    if not isinstance(out, torch.Tensor):
        raise ModelOutputError(f"the model returned {type(out).__name__} for a {tuple(xb.shape)} batch; expected "
                               f"a tensor of logits {want} (the model must map [0, 1] images to logits)")
    ok = out.dim() == 2 and out.shape[0] == b and out.is_floating_point()
    ok = ok and (out.shape[1] == num_classes if num_classes else out.shape[1] > int(yb.max()))
    if not ok:
        raise ModelOutputError(f"the model returned shape {tuple(out.shape)} ({out.dtype}) for a {tuple(xb.shape)} "
                               f"batch of [0, 1] images; expected logits of shape {want}")
    return out


def clean_pass(model: nn.Module, batch: Callable, n: int, batch_size: int, *, progress: bool = True,
               num_classes: int | None = None) -> CleanPass:
    """Clean predictions and the pre-attack checks' counts; ``batch(i)`` gives (x, y) from example i.
    The model must already be in eval mode."""
    correct = torch.zeros(n, dtype=torch.bool)
    res = CleanPass(correct, 0)
    for i in batch_starts(n, batch_size, desc="natural", progress=progress):
        xb, yb = batch(i)
        xg = xb.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = check_output(model(xg), xb, yb, num_classes)
        ok = predicts(logits, yb)
        res.nonfinite += int((~torch.isfinite(logits.detach()).all(1)).sum())
        correct[i : i + batch_size] = ok.cpu()
        res.num_classes = logits.shape[1]
        _count_zero_gradients(res, logits, xg, yb, ok)
        with torch.no_grad():
            again = model(xb)
        _compare_passes(res, logits.detach(), again)
    return res


def _count_zero_gradients(res: CleanPass, logits, xg, yb, ok) -> None:
    """Count the correctly classified examples whose CE / margin input gradient is all zero, and those
    whose gradient holds a NaN or an infinity."""
    if not logits.requires_grad:  # the logits do not depend differentiably on the input at all
        res.zero_ce += int(ok.sum())
        res.zero_margin += int(ok.sum())
        return
    ce = F.cross_entropy(logits.float(), yb, reduction="sum")
    (g_ce,) = torch.autograd.grad(ce, xg, retain_graph=True, allow_unused=True)
    (g_m,) = torch.autograd.grad(logit_margin(logits.float(), yb).sum(), xg, allow_unused=True)
    for g, attr, bad_attr in ((g_ce, "zero_ce", "nan_ce"), (g_m, "zero_margin", "nan_margin")):
        zero = ok if g is None else (g.flatten(1).abs().amax(1) == 0) & ok
        setattr(res, attr, getattr(res, attr) + int(zero.sum()))
        if g is not None:  # sign(NaN) is 0 on the CPU: PGD stands still there, as at a zero gradient
            bad = ~torch.isfinite(g.flatten(1)).all(1) & ok
            setattr(res, bad_attr, getattr(res, bad_attr) + int(bad.sum()))


def _compare_passes(res: CleanPass, first: torch.Tensor, again: torch.Tensor) -> None:
    """Largest relative logit difference and changed predictions between two passes; probability test."""
    diff = (again.float() - first.float()).norm(dim=1) / first.float().norm(dim=1).clamp_min(1e-12)
    res.max_rel_diff = max(res.max_rel_diff, float(diff.max()))
    res.changed += int((again.argmax(1) != first.argmax(1)).sum())
    probs = bool((first >= -PROB_TOL).all() and (first <= 1 + PROB_TOL).all()
                 and ((first.sum(1) - 1).abs() <= 1e-4).all())
    res.probabilities = res.probabilities and probs


def precheck_results(cp: CleanPass) -> list[dict]:
    """The four pre-attack checks as check dicts ('pass' or 'flagged')."""
    m = int(cp.correct.sum())
    zero, bad = cp.zero_ce + cp.zero_margin, cp.nan_ce + cp.nan_margin
    detail = (f"{cp.zero_ce} of {m} correctly classified examples have an all-zero input gradient of the CE "
              f"loss, {cp.zero_margin} of the logit margin")
    if bad:
        detail += (f"; {cp.nan_ce} have a NaN or infinite gradient of the CE loss, {cp.nan_margin} of the "
                   "margin")
    checks = [{"name": "zero_gradients", "status": "flagged" if zero or bad else "pass",
               "detail": detail + (": gradient attacks cannot move there" if zero or bad else "")}]
    random = cp.max_rel_diff > RANDOM_TOL or cp.changed > 0
    checks.append({"name": "deterministic_logits", "status": "flagged" if random else "pass",
                   "detail": f"two forward passes on the same images: largest relative logit difference "
                             f"{cp.max_rel_diff:.2g} (limit {RANDOM_TOL:g}), {cp.changed} predictions changed"
                             + ("; a randomized model needs attacks that average over its randomness" if random
                                else "")})
    checks.append({"name": "outputs_are_logits", "status": "flagged" if cp.probabilities else "pass",
                   "detail": "the outputs look like probabilities (in [0, 1], summing to 1); pass logits"
                   if cp.probabilities else "the outputs are not probabilities"})
    n = len(cp.correct)
    checks.append({"name": "finite_logits", "status": "flagged" if cp.nonfinite else "pass",
                   "detail": f"{cp.nonfinite} of {n} clean images give a NaN or infinite logit" + (
                       "; they count as misclassified, and the model is numerically broken" if cp.nonfinite
                       else "")})
    return checks
