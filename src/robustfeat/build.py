"""Config -> objects: the device, the data splits and the model of a run.

The only place that turns config values into data and models, shared by training, evaluation and
``robustfeat.load_model``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import Config, ConfigError, ModelConfig, RunConfig
from .data import Dataset, load_dataset, train_val_split
from .models import RobustModel, create_model, model_info


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is invalid: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} but this torch build sees no CUDA device; use run.device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"run.device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"run.device={name!r} but this machine has no MPS device; use run.device=cpu")
    return dev


def training_autocast(run: RunConfig, device: torch.device, *, attack: bool = False):
    """The autocast context of training's passes under ``run.precision``: off for fp32; bfloat16 for
    bf16, except for the adversary's passes when ``run.attack_fp32`` is set. Only training uses it:
    validation and evaluation always run in fp32."""
    enabled = run.precision == "bf16" and not (attack and run.attack_fp32)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """``run.deterministic``: inside the block, torch picks deterministic kernels where it has them
    (warn-only where it has none) and cuDNN does not autotune; the previous settings come back after."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    # cuBLAS reads this when it creates its handle: a fixed workspace makes its GEMMs deterministic
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


@dataclass
class Splits:
    """uint8 images (N, C, H, W) and int64 labels of the three splits, on the CPU."""

    dataset: Dataset
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def x_test(self) -> torch.Tensor:
        return self.dataset.x_test

    @property
    def y_test(self) -> torch.Tensor:
        return self.dataset.y_test


def build_splits(cfg: Config, data_dir: str | None = None, download: bool = True) -> Splits:
    d = cfg.data
    ds = load_dataset(d.name, data_dir or d.dir, path=d.path, download=download, coarse=d.coarse_labels)
    (x_tr, y_tr), (x_val, y_val) = train_val_split(ds, d.val_size, seed=0)
    if d.train_size is not None:
        x_tr, y_tr = x_tr[: d.train_size], y_tr[: d.train_size]
    return Splits(ds, x_tr, y_tr, x_val, y_val)


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> RobustModel:
    """The model of ``cfg``, given the ``model.*`` options its registration says it takes."""
    takes = model_info(cfg.name).options
    kwargs: dict = {}
    if cfg.widths is not None:  # (the config refuses widths for a model that does not take them)
        kwargs["widths"] = list(cfg.widths)
    if "att_hidden" in takes:
        kwargs["att_hidden"] = cfg.att_hidden
    if "init" in takes:
        kwargs["init"] = cfg.init
    return create_model(cfg.name, num_classes=num_classes, in_channels=in_channels, **kwargs)
