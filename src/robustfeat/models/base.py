"""The one interface every robustfeat model follows.

A model maps images in [0, 1] (B, C, H, W) to logits. Normalization happens inside the model, so
attacks work in pixel space and any attack library can use the model as it is.

    feats = model.forward_features(x)   # G(x) of eq. 6: the input of the final linear layer, (B, D)
    logits = model.forward_head(feats)  # (B, num_classes)
    logits = model(x)                   # == forward_head(forward_features(x))

Attention models (``has_attention = True``) also give analysis code the intermediates:

    out = model.attention(x)  # AttentionOutput(weights (B, H', W'), local (B, C, H', W'), features, logits)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class AttentionOutput(NamedTuple):
    weights: torch.Tensor  # (B, H', W') softmax over the H'*W' positions: sums to 1 per image
    local: torch.Tensor  # (B, C, H', W') local features l_n of the last residual block
    features: torch.Tensor  # (B, C) attention descriptor h = sum_n w_n l_n  (= G(x))
    logits: torch.Tensor  # (B, num_classes)


class RobustModel(nn.Module):
    """Base class: subclasses implement ``forward_features`` and ``forward_head``."""

    num_classes: int
    feature_dim: int
    has_attention: bool = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """G(x): the features the L2 regularizer compares (eq. 6)."""
        return self.forward_features(x)

    def attention(self, x: torch.Tensor) -> AttentionOutput:
        raise TypeError(
            f"model {type(self).__name__} has no attention module; "
            "attention analyses need an attention model (an '_att' model, e.g. resnet_att)"
        )
