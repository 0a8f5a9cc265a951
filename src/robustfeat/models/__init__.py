"""Model registry: every model maps [0, 1] images (B, C, H, W) to logits (see ``base``).

    model = create_model("resnet_att", num_classes=10, in_channels=3)
    model = create_model("resnet", num_classes=100, in_channels=3, widths=[16, 48, 96, 192])

Registered names:

* ``mnist_cnn``: Madry's MNIST CNN (kwargs: ``input_size`` = 28, ``hidden`` = 1024).
* ``resnet`` [16, 16, 32, 64], ``resnet_wide3`` [16, 48, 96, 192] (the paper's 3x wide model),
  ``resnet_madry_wide`` [16, 160, 320, 640] (Madry's wide model): Madry's CIFAR ResNet
  (kwargs: ``widths``, ``num_units`` = 5).
* ``resnet_att``, ``resnet_wide3_att``, ``resnet_madry_wide_att``: the same backbones with the
  paper's attention module (kwargs: ``widths``, ``num_units`` = 5, ``att_hidden`` = 64).
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry
from .base import AttentionOutput, RobustModel
from .mnist_cnn import MnistCNN
from .resnet import AttentionResNet, MadryResNet, per_image_standardization

__all__ = [
    "MODELS",
    "AttentionOutput",
    "AttentionResNet",
    "MadryResNet",
    "MnistCNN",
    "RobustModel",
    "create_model",
    "list_models",
    "per_image_standardization",
]

MODELS: Registry[Callable[..., RobustModel]] = Registry("model")


@MODELS.register("mnist_cnn")
def mnist_cnn(num_classes: int, in_channels: int, **kw) -> RobustModel:
    return MnistCNN(num_classes=num_classes, in_channels=in_channels, **kw)


_RESNET_WIDTHS = {
    "resnet": (16, 16, 32, 64),
    "resnet_wide3": (16, 48, 96, 192),
    "resnet_madry_wide": (16, 160, 320, 640),
}


def _resnet_factory(default_widths: tuple[int, ...], attention: bool) -> Callable[..., RobustModel]:
    cls = AttentionResNet if attention else MadryResNet

    def factory(num_classes: int, in_channels: int, widths=None, **kw) -> RobustModel:
        return cls(
            num_classes=num_classes,
            in_channels=in_channels,
            widths=default_widths if widths is None else widths,
            **kw,
        )

    return factory


for _name, _widths in _RESNET_WIDTHS.items():
    MODELS.add(_name, _resnet_factory(_widths, attention=False))
    MODELS.add(f"{_name}_att", _resnet_factory(_widths, attention=True))


def create_model(name: str, num_classes: int, in_channels: int, **kwargs) -> RobustModel:
    """Build the registered model ``name``; ``kwargs`` override its defaults (e.g. ``widths``).

    Unknown names raise ``KeyError`` naming the nearest registered name.
    """
    model = MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.model_name = name
    return model


def list_models() -> list[str]:
    return MODELS.names()
