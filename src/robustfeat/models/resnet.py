"""Madry et al.'s CIFAR ResNet and the paper's attention variant (section 3.2).

Plain model (MadryLab cifar10_challenge, reproduced from the description in REFERENCE.md):

    x in [0, 1] -> per-image standardization (TF ``per_image_standardization``)
    conv 3x3, widths[0] filters, stride 1, padding 1, no bias
    stage 1: num_units pre-activation residual units -> widths[1], stride 1
    stage 2: num_units units -> widths[2], stride 2
    stage 3: num_units units -> widths[3], stride 2
    "unit_last": BN, leaky ReLU(0.1)                        <- local features l (B, C, 8, 8)
    global average pool                                     <- G(x) (B, widths[3])
    linear -> logits

Only the first unit of stage 1 activates before the residual (Madry's ``activate_before_residual =
[True, False, False]``, applied to the first unit of each stage). A shortcut whose channel count
changes average-pools with kernel = stride and zero-pads the channels.

Choices where the description leaves room (documented here once):

* Stride-2 convs use symmetric padding 1 (TF "SAME" pads only the bottom/right for even inputs);
  the output sizes are identical, the sampling grid is shifted by one pixel.
* BatchNorm: PyTorch momentum 0.1 (= TF decay 0.9), eps 1e-3 (the TF ``batch_norm`` default that
  Madry's code uses; PyTorch's default would be 1e-5).
* Init: convs He-normal with std sqrt(2 / (k * k * out_channels)) (Madry's ``_conv``, i.e.
  kaiming-normal fan_out); the final linear layer uses TF's ``uniform_unit_scaling_initializer``
  (factor 1): U(-sqrt(3 / fan_in), sqrt(3 / fan_in)) with zero bias, as in Madry's
  ``_fully_connected``. BN weights 1, biases 0.
* Zero padding of channels puts (out - in) // 2 channels on each side and any odd remainder at the
  end (Madry's widths never produce a remainder).

Attention variant (paper section 3.2; our reading, see also ``AttentionHead``): the local features
are the map the plain model would average-pool (after the final BN + leaky ReLU). The global
feature g replaces the global average pool with "a convolutional layer sandwiched between two
max-pooling layers": max-pool 2 (8x8 -> 4x4), conv 3x3 C -> C without padding, with bias, no
activation (4x4 -> 2x2), max-pool 2 (2x2 -> 1x1). The attention descriptor h = sum_n w_n l_n
replaces g as the input of the final linear layer, so G(x) = h.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionOutput, RobustModel

LRELU_SLOPE = 0.1
BN_MOMENTUM = 0.1  # PyTorch convention; TF decay 0.9
BN_EPS = 1e-3  # TF batch_norm default used by Madry's code


def per_image_standardization(x: torch.Tensor) -> torch.Tensor:
    """TF's ``per_image_standardization``: (x - mean) / max(std, 1 / sqrt(N)) per image.

    Mean and (population) std are taken over all N = C * H * W values of each image.
    """
    n = x[0].numel()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.var(dim=(1, 2, 3), keepdim=True, unbiased=False).sqrt()
    return (x - mean) / std.clamp_min(1.0 / math.sqrt(n))


class PerImageStandardization(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_image_standardization(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _pad_channels(x: torch.Tensor, extra: int) -> torch.Tensor:
    """Zero-pad the channel dimension by ``extra``: extra // 2 before, the rest after."""
    before = extra // 2
    after = extra - before
    return F.pad(x, (0, 0, 0, 0, before, after))


class ResidualUnit(nn.Module):
    """Madry's pre-activation residual unit ``_residual``."""

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool):
        super().__init__()
        if cout < cin:
            raise ValueError(f"residual unit widths must not shrink ({cin} -> {cout})")
        self.cin, self.cout, self.stride = cin, cout, stride
        self.activate_before_residual = activate_before_residual
        self.bn1 = _bn(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = _bn(cout)
        self.conv2 = _conv3x3(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activate_before_residual:
            x = F.leaky_relu(self.bn1(x), LRELU_SLOPE)
            orig = x
        else:
            orig = x
            x = F.leaky_relu(self.bn1(x), LRELU_SLOPE)
        x = self.conv1(x)
        x = F.leaky_relu(self.bn2(x), LRELU_SLOPE)
        x = self.conv2(x)
        if self.stride > 1:
            # Madry: avg_pool(orig, stride, stride, 'VALID') when the shape changes. With stride 1
            # the pool is the identity. (Madry pools only when in != out; an equal-width stride-2
            # unit never occurs in his configurations, and pooling it too keeps the shapes valid.)
            # ceil_mode only matters for odd map sizes (it matches the conv's output size then).
            orig = F.avg_pool2d(orig, kernel_size=self.stride, stride=self.stride, ceil_mode=True)
        if self.cin != self.cout:
            orig = _pad_channels(orig, self.cout - self.cin)
        return x + orig


def _init_madry_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (k * m.out_channels)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _init_unit_scaling_(linear: nn.Linear) -> None:
    bound = math.sqrt(3.0 / linear.in_features)
    nn.init.uniform_(linear.weight, -bound, bound)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class MadryResNet(RobustModel):
    """Madry's CIFAR ResNet; ``widths`` = [init conv, stage 1, stage 2, stage 3]."""

    has_attention = False
    model_name = "resnet"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 16, 32, 64),
        num_units: int = 5,
    ):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 4:
            raise ValueError(f"widths must have 4 entries (init conv + 3 stages), got {widths}")
        if num_units < 1:
            raise ValueError(f"num_units must be >= 1, got {num_units}")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.widths = widths
        self.num_units = int(num_units)

        self.standardize = PerImageStandardization()
        self.conv_init = _conv3x3(in_channels, widths[0], 1)
        strides = (1, 2, 2)
        activate_before_residual = (True, False, False)
        stages = []
        cin = widths[0]
        for s in range(3):
            cout = widths[s + 1]
            units = [ResidualUnit(cin, cout, strides[s], activate_before_residual[s])]
            units += [ResidualUnit(cout, cout, 1, False) for _ in range(self.num_units - 1)]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stage1, self.stage2, self.stage3 = stages
        self.bn_last = _bn(widths[3])
        self.feature_dim = widths[3]
        self.fc = nn.Linear(self._head_in_dim(), self.num_classes)
        _init_madry_(self)
        _init_unit_scaling_(self.fc)

    def _head_in_dim(self) -> int:
        return self.widths[3]

    def local_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last residual block's output after the final BN + leaky ReLU, (B, C, H/4, W/4)."""
        x = self.standardize(x)
        x = self.conv_init(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return F.leaky_relu(self.bn_last(x), LRELU_SLOPE)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_features(x).mean(dim=(2, 3))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)


class AttentionHead(nn.Module):
    """Global feature, compatibility MLP and attention pooling of the paper's section 3.2.

    Our reading of the paper (it gives no code):

    * global feature g: max-pool 2 -> conv 3x3 (C -> C, no padding, with bias, no activation) ->
      max-pool 2. For the 8x8 map of a 32x32 input that is 8 -> 4 -> 2 -> 1, so g is (B, C).
      For other sizes both pools use ceil_mode (no border row/column is dropped) and the result is
      max-pooled to 1x1 if still larger, i.e. the second stage is a global max over the conv map.
      The map after the first pool must be at least 3x3 (local map at least 5x5).
    * compatibility c_n = f([l_n; g]) with f a one-hidden-layer MLP (``hidden`` units, ReLU).
      Its first layer on the concatenation splits into W_l l_n + W_g g + b, computed as a 1x1
      conv over the map plus a per-image vector broadcast over positions. The output layer is a
      1x1 conv hidden -> 1 without bias: a constant added to every c_n cancels in the softmax, so
      its bias would be a parameter with identically zero gradient.
    * w = softmax of c over the H*W positions; h = sum_n w_n l_n, (B, C).
    """

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.channels = channels
        self.hidden = hidden
        self.global_conv = nn.Conv2d(channels, channels, kernel_size=3, padding=0, bias=True)
        self.local_proj = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)  # W_l, b
        self.global_proj = nn.Linear(channels, hidden, bias=False)  # W_g
        self.score = nn.Conv2d(hidden, 1, kernel_size=1, bias=False)  # output layer of f

    def global_feature(self, local: torch.Tensor) -> torch.Tensor:
        g = F.max_pool2d(local, kernel_size=2, stride=2, ceil_mode=True)
        if g.shape[-2] < 3 or g.shape[-1] < 3:
            raise ValueError(
                f"attention needs a local feature map of at least 5x5, got {tuple(local.shape[-2:])}"
                " (use inputs of at least 20x20)"
            )
        g = self.global_conv(g)
        g = F.max_pool2d(g, kernel_size=2, stride=2, ceil_mode=True)
        if g.shape[-2] > 1 or g.shape[-1] > 1:
            g = F.adaptive_max_pool2d(g, 1)
        return g.flatten(1)

    def forward(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """local (B, C, H, W) -> (weights (B, H, W), h (B, C))."""
        b, _, hh, ww = local.shape
        g = self.global_feature(local)
        hidden = self.local_proj(local) + self.global_proj(g)[:, :, None, None]
        scores = self.score(F.relu(hidden)).flatten(1)  # (B, H*W)
        weights = torch.softmax(scores, dim=1)
        h = torch.einsum("bn,bcn->bc", weights, local.flatten(2))
        return weights.reshape(b, hh, ww), h


class AttentionResNet(MadryResNet):
    """Madry's ResNet with the attention module replacing the global average pool."""

    has_attention = True
    model_name = "resnet_att"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 16, 32, 64),
        num_units: int = 5,
        att_hidden: int = 64,
    ):
        super().__init__(num_classes, in_channels, widths, num_units)
        self.att_hidden = int(att_hidden)
        self.att = AttentionHead(self.widths[3], self.att_hidden)
        _init_madry_(self.att.global_conv)  # same conv init as the backbone; MLP: PyTorch default

    def attention(self, x: torch.Tensor) -> AttentionOutput:
        local = self.local_features(x)
        weights, h = self.att(local)
        return AttentionOutput(weights=weights, local=local, features=h, logits=self.forward_head(h))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.att(self.local_features(x))
        return h
