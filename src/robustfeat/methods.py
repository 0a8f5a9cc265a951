"""The training methods of the paper, each a loss ``(model, x, x_adv, y, lam) -> (loss, parts)``.

    natural     CE(f(x), y)
    at          CE(f(x'), y)                                   Madry et al. 2017
    at-reg      CE(f(x'), y) + lam * ||G(x) - G(x')||_2        eq. 7, plain ResNet / MNIST CNN
    at-att      CE(f(x'), y)                                   with the attention model
    at-att-reg  CE(f(x'), y) + lam * ||G(x) - G(x')||_2        eq. 7 with the attention model

The attention part of AT-att lives in the model (an '_att' model); the loss is the same. The L2 term
is the plain (not squared) Euclidean norm per example, averaged over the batch, with gradients
flowing through both G(x) and G(x') (paper, section 3.3 and Figure 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models.base import RobustModel
from .registry import Registry


@dataclass(frozen=True)
class MethodSpec:
    name: str
    adversarial: bool
    """Whether the batch is replaced by its adversary (x' is needed)."""
    attention: bool
    """Whether the method is defined on an attention model."""
    regularized: bool
    lam_mnist: float = 0.0
    lam_cifar: float = 0.0

    def default_lam(self, family: str | None) -> float:
        """The paper's lambda for a dataset family (``Config.data_family``: 'mnist', 'cifar' or None for
        your own data, which takes CIFAR's): section 4.1, MNIST 0.01; 4.2, CIFAR AT-reg 0.1, AT-att-reg
        0.01."""
        if not self.regularized:
            return 0.0
        return self.lam_mnist if family == "mnist" else self.lam_cifar

    @property
    def selection_metric(self) -> str:
        """The validation accuracy that picks a run's ``best`` checkpoint: PGD accuracy for the adversarial
        methods, clean accuracy for natural training (whose PGD accuracy is near 0 and ranks nothing)."""
        return "pgd_acc" if self.adversarial else "clean_acc"

    def with_attention_name(self) -> str:
        return {"at": "at-att", "at-reg": "at-att-reg"}.get(self.name, self.name)


METHODS: Registry[MethodSpec] = Registry("method")
for _spec in (
    MethodSpec("natural", adversarial=False, attention=False, regularized=False),
    MethodSpec("at", adversarial=True, attention=False, regularized=False),
    MethodSpec("at-reg", adversarial=True, attention=False, regularized=True, lam_mnist=0.01, lam_cifar=0.1),
    MethodSpec("at-att", adversarial=True, attention=True, regularized=False),
    MethodSpec("at-att-reg", adversarial=True, attention=True, regularized=True, lam_mnist=0.01, lam_cifar=0.01),
):
    METHODS.add(_spec.name, _spec)


def feature_distance(f_clean: torch.Tensor, f_adv: torch.Tensor) -> torch.Tensor:
    """||G(x) - G(x')||_2 per example, (B,), in fp32 even when the features are bf16 (autocast)."""
    return torch.linalg.vector_norm(f_clean.float() - f_adv.float(), ord=2, dim=1)


def method_loss(
    model: RobustModel,
    x: torch.Tensor,
    x_adv: torch.Tensor | None,
    y: torch.Tensor,
    lam: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 7 in general form: CE on x_adv (or on x for natural training) + lam * mean L2 feature distance.

    Returns the scalar loss and its parts as detached 0-d tensors (no host sync here: the trainer
    reads them only when it logs). With lam = 0 the clean forward pass is skipped entirely.
    """
    if x_adv is None:  # natural training
        logits = model(x)
        ce = F.cross_entropy(logits.float(), y)
        parts = {"loss": ce.detach(), "ce": ce.detach(), "acc": (logits.detach().argmax(1) == y).float().mean()}
        return ce, parts
    f_adv = model.forward_features(x_adv)
    logits = model.forward_head(f_adv)
    ce = F.cross_entropy(logits.float(), y)
    parts = {"ce": ce.detach(), "adv_acc": (logits.detach().argmax(1) == y).float().mean()}
    if lam > 0:
        reg = feature_distance(model.forward_features(x), f_adv).mean()
        parts["reg"] = reg.detach()
        loss = ce + lam * reg
    else:
        loss = ce
    parts["loss"] = loss.detach()
    return loss, parts


def grad_align_penalty(model: RobustModel, x: torch.Tensor, y: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """GradAlign (Andriushchenko & Flammarion 2020): mean over the batch of 1 - cos(g(x), g(x + eta)).

    g is the input gradient of the cross-entropy; eta is a random point of the eps-ball, drawn by the
    caller (uniform, so that runs split over processes draw the same numbers as one process).
    The penalty is differentiable in the weights through g(x + eta) (a double backward); g(x) is held
    fixed, as in the authors' formulation. Catastrophic overfitting of single-step training comes with
    these two gradients drifting apart; keeping them aligned keeps the FGSM step a good adversary.
    """
    def wide(t: torch.Tensor) -> torch.Tensor:  # bf16 (autocast) -> fp32; fp32 and fp64 stay as they are
        return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t

    x_clean = x.detach().requires_grad_(True)
    (g_clean,) = torch.autograd.grad(F.cross_entropy(wide(model(x_clean)), y), x_clean)
    x_near = (x.detach() + eta).clamp_(0.0, 1.0).requires_grad_(True)
    (g_near,) = torch.autograd.grad(F.cross_entropy(wide(model(x_near)), y), x_near, create_graph=True)
    cos = F.cosine_similarity(wide(g_clean).reshape(len(x), -1), wide(g_near).reshape(len(x), -1), dim=1,
                              eps=1e-12)
    return (1.0 - cos).mean()
