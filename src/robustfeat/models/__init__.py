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

Each model is registered with its metadata (:class:`ModelInfo`: input shape, dataset family, whether
it has attention, which ``model.*`` config options it takes), which the config checks against the
dataset and the method::

    model_info("resnet_att").has_attention   # True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..registry import Registry
from .base import AttentionOutput, RobustModel
from .mnist_cnn import MnistCNN
from .resnet import AttentionResNet, MadryResNet, per_image_standardization

__all__ = [
    "MODELS",
    "MODEL_INFO",
    "AttentionOutput",
    "AttentionResNet",
    "MadryResNet",
    "MnistCNN",
    "ModelInfo",
    "RobustModel",
    "create_model",
    "list_models",
    "model_info",
    "per_image_standardization",
    "register_model",
]


@dataclass(frozen=True)
class ModelInfo:
    """What the config needs to know about a registered model without building it."""

    name: str
    input_shape: tuple[int, int, int]
    """(channels, height, width) of the images it was designed for."""
    family: str
    """The dataset family it belongs to: 'mnist' or 'cifar' (``robustfeat.config.DATASET_FAMILIES``)."""
    has_attention: bool = False
    """Whether it carries the attention module (what the -att methods need)."""
    options: tuple[str, ...] = ()
    """The ``model.*`` config options it takes as keyword arguments: widths, att_hidden, init."""

    @property
    def inputs(self) -> str:
        """The images it expects, in words (for error messages)."""
        c, h, w = self.input_shape
        return f"{h}x{w} MNIST images" if self.family == "mnist" else f"{h}x{w} {'colour' if c == 3 else 'grey'} images"


MODELS: Registry[Callable[..., RobustModel]] = Registry("model")
MODEL_INFO: Registry[ModelInfo] = Registry("model")


def register_model(info: ModelInfo) -> Callable[[Callable[..., RobustModel]], Callable[..., RobustModel]]:
    """Register a factory ``(num_classes, in_channels, **kwargs) -> RobustModel`` with its metadata."""

    def deco(factory: Callable[..., RobustModel]) -> Callable[..., RobustModel]:
        MODEL_INFO.add(info.name, info)
        return MODELS.register(info.name)(factory)

    return deco


def model_info(name: str) -> ModelInfo:
    """The metadata of the registered model ``name`` (KeyError naming the nearest name if unknown)."""
    return MODEL_INFO.get(name)


@register_model(ModelInfo("mnist_cnn", (1, 28, 28), "mnist", options=("init",)))
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
    register_model(ModelInfo(_name, (3, 32, 32), "cifar", options=("widths",)))(
        _resnet_factory(_widths, attention=False))
    register_model(ModelInfo(f"{_name}_att", (3, 32, 32), "cifar", has_attention=True,
                             options=("widths", "att_hidden")))(_resnet_factory(_widths, attention=True))


def create_model(name: str, num_classes: int, in_channels: int, **kwargs) -> RobustModel:
    """Build the registered model ``name``; ``kwargs`` override its defaults (e.g. ``widths``).

    Unknown names raise ``KeyError`` naming the nearest registered name.
    """
    model = MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.model_name = name
    return model


def list_models() -> list[str]:
    return MODELS.names()
