"""The MNIST CNN of Madry et al. (2017), used in the paper's MNIST experiments (section 4.1).

    conv 5x5, 32 filters, "SAME" (padding 2), ReLU, max-pool 2
    conv 5x5, 64 filters, "SAME" (padding 2), ReLU, max-pool 2
    flatten (64 * 7 * 7 for 28x28 input), FC 1024, ReLU      <- G(x), the regularized features
    FC num_classes                                            <- logits

No batch norm and no input normalization: the model takes [0, 1] pixels as they are, as Madry's
model does. The paper uses no attention module on MNIST, so ``attention()`` raises ``TypeError``.

Initialization: ``init="torch"`` (default) keeps PyTorch's default (Kaiming-uniform) init;
``init="madry"`` follows Madry's MNIST model: weights from a normal distribution with standard
deviation 0.1 truncated at two standard deviations, biases set to the constant 0.1. Madry's init gives
very large initial logits and trains much more slowly on short schedules (see ModelConfig.init).

Flattening uses PyTorch's (C, H, W) order (Madry's TF model flattens in (H, W, C) order; this only
permutes the rows of the first FC weight and does not change the function class).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import RobustModel


def _madry_init_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.1, a=-0.2, b=0.2)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.1)


class MnistCNN(RobustModel):
    has_attention = False
    model_name = "mnist_cnn"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        hidden: int = 1024,
        init: str = "torch",
    ):
        super().__init__()
        if input_size < 4:
            raise ValueError(f"input_size must be at least 4 (two 2x2 max-pools), got {input_size}")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.input_size = int(input_size)
        self.feature_dim = int(hidden)

        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        spatial = (self.input_size // 2) // 2  # 28 -> 14 -> 7
        self.flat_dim = 64 * spatial * spatial
        self.fc1 = nn.Linear(self.flat_dim, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, self.num_classes)
        self.act = nn.ReLU()
        if init == "madry":
            _madry_init_(self)
        elif init != "torch":
            raise ValueError(f"init={init!r}: expected 'torch' or 'madry'")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = x.flatten(1)  # .flatten copies when needed, so channels_last inputs are fine
        if x.shape[1] != self.flat_dim:
            raise ValueError(
                f"mnist_cnn was built for {self.input_size}x{self.input_size} inputs "
                f"(flatten size {self.flat_dim}) but got a flatten size of {x.shape[1]}; "
                "pass input_size= to create_model"
            )
        return self.act(self.fc1(x))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(feats)
