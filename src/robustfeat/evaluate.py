"""Clean and adversarial accuracy of any model mapping [0, 1] images to logits."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .attacks import attack_from_config
from .config import AttackConfig


class InvalidAdversary(RuntimeError):
    """An attack produced points outside the threat model: no number is reported from it."""


def check_adversary(x: torch.Tensor, x_adv: torch.Tensor, eps: float, tol: float = 1e-6) -> None:
    """Refuse adversarial examples outside the l_inf ball, outside [0, 1], or non-finite."""
    if x_adv.shape != x.shape:
        raise InvalidAdversary(f"adversarial batch has shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise InvalidAdversary("adversarial batch contains non-finite values")
    dist = (x_adv - x).abs().amax().item()
    if dist > eps + tol:
        raise InvalidAdversary(f"adversarial perturbation {dist:.6g} exceeds eps={eps:.6g} (+{tol:g})")
    lo, hi = x_adv.amin().item(), x_adv.amax().item()
    if lo < 0.0 or hi > 1.0:
        raise InvalidAdversary(f"adversarial pixels outside [0, 1]: min {lo:.6g}, max {hi:.6g}")


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy correct/n."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def to_float_images(x_u8: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = x_u8.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig | None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 200,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Clean accuracy and, if ``attack`` is given, accuracy under it ('pgd_acc').

    ``x`` is uint8 (N, C, H, W) or float in [0, 1]. The model's train/eval state is restored after.
    Every adversarial batch is validated before it is counted.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = adv_correct = 0
    n = len(y)
    try:
        for i in tqdm(range(0, n, batch_size), disable=not progress, desc="evaluate", unit="batch"):
            xb = x[i : i + batch_size]
            xb = to_float_images(xb, device, channels_last) if xb.dtype == torch.uint8 else xb.to(device)
            yb = y[i : i + batch_size].to(device)
            with torch.no_grad():
                correct += int((model(xb).argmax(1) == yb).sum())
            if attack is not None:
                xa = attack_from_config(model, xb, yb, attack, generator=generator, keep_best=True)
                check_adversary(xb, xa, attack.eps)
                with torch.no_grad():
                    adv_correct += int((model(xa).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    out = {"clean_acc": correct / max(n, 1)}
    if attack is not None:
        out["pgd_acc"] = adv_correct / max(n, 1)
    return out
