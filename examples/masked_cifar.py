"""Three classic ways to mask gradients, wrapped around the published natural CIFAR-10 model, to see
robustfeat eval's checks catch each of them (docs/evaluation.md, results/masking-checks).

Each factory returns a plain ``torch.nn.Module`` ([0, 1] images in, logits out) defined here, outside
robustfeat, around the weights of results/table2-cpu/runs/cifar10-natural-seed0 (89.30% clean):

- ``plain``: the model itself, undefended: every attack should break it and no check should fire;
- ``rounded``: inputs rounded to 8 bits first, so the input gradient is zero almost everywhere;
- ``saturated``: logits times 10,000, so the softmax saturates and the CE loss's gradient underflows
  (the margin loss of CW keeps working);
- ``noisy``: Gaussian noise (std 0.03) added to every input, a randomized model.

None of them is more robust than ``plain``: a suite that reports them as robust without a flag is
being fooled.

    robustfeat eval --model examples/masked_cifar.py:rounded --dataset cifar10 \\
        --data-dir ../shared/data --suite paper --n 40 --out masked-rounded
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import robustfeat

NATURAL_RUN = Path(__file__).resolve().parents[1] / "results/table2-cpu/runs/cifar10-natural-seed0"
NOISE_STD = 0.03
LOGIT_SCALE = 1e4


class Masked(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.net, self.kind = robustfeat.load_model(NATURAL_RUN), kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rounded":
            x = torch.round(x * 255) / 255
        elif self.kind == "noisy":
            x = (x + NOISE_STD * torch.randn_like(x)).clamp(0, 1)
        z = self.net(x)
        return z * LOGIT_SCALE if self.kind == "saturated" else z


def plain() -> nn.Module:
    return Masked("plain").eval()


def rounded() -> nn.Module:
    return Masked("rounded").eval()


def saturated() -> nn.Module:
    return Masked("saturated").eval()


def noisy() -> nn.Module:
    return Masked("noisy").eval()
