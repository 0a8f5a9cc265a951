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

from .attacks import eval_mode
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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products in hardware (AVX512-BF16 or AMX). Without
    either, oneDNN emulates them and bf16 training is many times slower than fp32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(f()) for f in probes if f is not None)


def precision_warning(run: RunConfig, device: torch.device) -> str | None:
    """A one-line warning when ``run.precision=bf16`` would run slower than fp32 on ``device``: a CPU
    without bf16 hardware (results/bench/amd-epyc-avx2: 13x slower on AT PGD-5). None otherwise."""
    if run.precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16():
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    return (f"run.precision=bf16 on a CPU without bf16 hardware (capability {cap}, no AVX512-BF16 or AMX): "
            "expect training many times slower than fp32; set run.precision=fp32 unless you need bf16's numerics")


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
    """The dataset of ``cfg`` and its train / validation split; ``data.train_size`` beyond the training
    images left after the validation split is a ConfigError (it would train on fewer than asked)."""
    d = cfg.data
    ds = load_dataset(d.name, data_dir or d.dir, path=d.path, download=download, coarse=d.coarse_labels)
    (x_tr, y_tr), (x_val, y_val) = train_val_split(ds, d.val_size, seed=0)
    if d.train_size is not None:
        if d.train_size > len(y_tr):
            raise ConfigError(
                f"data.train_size={d.train_size} is more than the {len(y_tr):,} training images of {ds.name} "
                f"left after the validation split (data.val_size={d.val_size}); lower it, or set "
                "data.train_size=null to use all of them")
        x_tr, y_tr = x_tr[: d.train_size], y_tr[: d.train_size]
    return Splits(ds, x_tr, y_tr, x_val, y_val)


def check_model_fits(model: torch.nn.Module, cfg: ModelConfig, image_shape: tuple[int, ...], what: str) -> None:
    """ConfigError unless ``model`` (built from ``cfg``) takes (C, H, W) images of ``what`` (the data, in
    words): one forward pass of one blank image in eval mode, which changes no weight or statistic."""
    p = next(model.parameters())
    x = torch.zeros(1, *image_shape, device=p.device)
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    except (ValueError, RuntimeError) as e:
        c, h, w = image_shape
        raise ConfigError(
            f"model.name={cfg.name!r} cannot take the {c}x{h}x{w} images of {what} (it is made for "
            f"{model_info(cfg.name).inputs}: {' '.join(str(e).split())[:160]}); use images of that size or "
            "another model (robustfeat.list_models())") from None


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
