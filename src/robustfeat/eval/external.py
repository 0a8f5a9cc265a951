"""Evaluating a model defined outside robustfeat (``robustfeat eval --model MODULE:FUNCTION --weights FILE
--dataset NAME``): the same suite, checks, curves and files as for a run directory.

The model is built by calling a factory with no arguments: ``package.module:function`` (imported as a
module; the current directory is searched first, as ``python -m`` does) or ``path/to/file.py:function``.
It must return an ``nn.Module`` that maps [0, 1] images (B, C, H, W) to logits (B, num_classes), with
any normalization inside. ``--weights`` is a state dict: a ``.safetensors`` file, or a torch file
read with ``weights_only=True`` (nothing is unpickled beyond tensors and plain containers); a dict
holding the state dict under ``state_dict`` or ``model``, and DataParallel's ``module.`` prefixes,
are accepted. eps and step size default to the dataset's presets (MNIST 0.3 / 0.01 with PGD-40 as the
headline, CIFAR 8/255 / 2/255 with PGD-20).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, load_config
from ..data import DATASETS, load_dataset, to_float_images
from .load import file_sha256
from .precheck import ModelOutputError, check_output
from .run import QUICK_N, check_suite, device_of, evaluate_test_set, finish, load_other_run
from .suite import model_fingerprint

DATASET_PRESETS = {"mnist": "mnist-at", "mnist-sample": "mnist-at", "cifar10": "cifar10-at",
                   "cifar100": "cifar100-at"}
"""The preset whose evaluation attack (eps, step, headline PGD steps) a dataset's models default to."""


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``module:function`` or ``path/to/file.py:function``."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"--model {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.models:build or "
                          "examples/plain_cnn.py:build")
    module = _import(mod_name, spec)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"--model {spec!r}: {mod_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"--model {spec!r}: {attr!r} is a {type(fn).__name__}, expected a callable returning "
                          "an nn.Module")
    return fn


def _import(name: str, spec: str):
    if name.endswith(".py") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--model {spec!r}: no such file {name!r}")
        mspec = importlib.util.spec_from_file_location(f"_robustfeat_external_{path.stem}", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        return module
    sys.path.insert(0, os.getcwd())  # as ``python -m`` does: modules beside the caller are found
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"--model {spec!r}: cannot import {name!r} ({e})") from None
    finally:
        sys.path.remove(os.getcwd())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or ``weights_only`` torch file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix, in one line
        raise ConfigError(f"--weights {str(path)!r}: not a readable safetensors or weights-only torch file "
                          f"({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"--weights {str(path)!r}: expected a state dict (parameter name -> tensor), found "
                          f"{type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def build_external(spec: str, weights: str | os.PathLike | None) -> nn.Module:
    """The model ``spec``'s factory returns, with ``weights`` loaded (strictly) when given."""
    model = load_factory(spec)()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec!r} returned a {type(model).__name__}, expected a torch.nn.Module "
                          "mapping [0, 1] images to logits")
    if weights is not None:
        state = read_state_dict(weights)
        missing, unexpected = _key_mismatch(model, state)
        if missing or unexpected:
            raise ConfigError(f"--weights {str(weights)!r} do not fit --model {spec!r}: missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{'...' if len(unexpected) > 3 else ''}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # shape mismatches
            raise ConfigError(f"--weights {str(weights)!r} do not fit --model {spec!r}: "
                              f"{' '.join(str(e).split())[:300]}") from None
    return model


def _key_mismatch(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    own = set(model.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, dataset: str, device) -> None:
    """Run ``model`` on two test images: it must accept [0, 1] images of the dataset's shape and return
    (2, num_classes) logits, else a one-line ``ModelOutputError`` saying what was expected."""
    xb, yb = to_float_images(x[:2], device), y[:2].to(device)
    try:
        with torch.no_grad():
            out = model.eval()(xb)
    except Exception as e:  # noqa: BLE001 - whatever the model raises, the user gets one line
        raise ModelOutputError(f"the model failed on a {tuple(xb.shape)} batch of [0, 1] {dataset} images "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); it must map [0, 1] "
                               f"images (B, {', '.join(map(str, xb.shape[1:]))}) to logits (B, {num_classes})"
                               ) from None
    check_output(out, xb, yb, num_classes)


def default_attack(dataset: str) -> tuple[float, float, list[int]]:
    """(eps, step size, the headline PGD steps) of a dataset's preset evaluation attack."""
    a = load_config(DATASET_PRESETS[dataset]).eval_attack
    return a.eps, a.step_size, [a.steps] if a.loss == "ce" else []


def evaluate_external(
    spec: str,
    *,
    dataset: str,
    weights: str | os.PathLike | None = None,
    suite: str = "quick",
    n: int | None = None,
    data_dir: str | None = None,
    eps: float | None = None,
    step_size: float | None = None,
    restarts: int = 1,
    source: str | os.PathLike | None = None,
    source_which: str = "best",
    transfer_from: str | os.PathLike | None = None,
    transfer_which: str = "best",
    device: str = "auto",
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
    curves: bool = False,
) -> dict[str, Any]:
    """``evaluate_run`` for a model built by ``spec`` (``module:function``) with ``weights``, on the test
    set of ``dataset``; writes to ``out_dir`` (default: WEIGHTS_DIR/eval-WEIGHTS_STEM, else
    ./eval-FUNCTION). Black-box and transfer sources are run directories trained on the same data."""
    check_suite(suite, None)
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    dev = device_of(device)
    defaults = default_attack(dataset) if dataset in DATASET_PRESETS else None
    if defaults is None and (eps is None or step_size is None):
        raise ConfigError(f"--dataset {dataset!r} has no default threat model; pass --eps and --step-size")
    d_eps, d_step, extra = defaults or (eps, step_size, [])
    eps = d_eps if eps is None else float(eps)
    step_size = d_step if step_size is None else float(step_size)
    data = load_dataset(dataset, data_dir)
    model = build_external(spec, weights).to(dev)
    probe(model, data.x_test, data.y_test, data.num_classes, dataset, dev)
    ident = _identity(spec, weights, dataset, model)
    shape = {"num_classes": data.num_classes, "in_channels": data.image_shape[0]}
    src_model, src_ident = load_other_run(source, source_which, dev, ident, dataset, shape, "black-box source")
    tr_model, tr_ident = load_other_run(transfer_from, transfer_which, dev, ident, dataset, shape, "transfer source")
    out = Path(out_dir) if out_dir is not None else _default_out(spec, weights)
    res, idx = evaluate_test_set(
        model, data.x_test, data.y_test, n=QUICK_N if n is None and suite == "quick" else n, seed=seed, out=out,
        eps=eps, step_size=step_size, suite=suite, source=src_model, transfer=tr_model, extra_pgd_steps=extra,
        headline=extra[0] if extra else None,
        restarts=restarts, batch_size=batch_size, device=dev, progress=progress, curves=curves,
        num_classes=data.num_classes)
    res.update(model=ident, source=src_ident, transfer_source=tr_ident, paper=None)
    return finish(res, out, idx)


def _identity(spec: str, weights, dataset: str, model: nn.Module) -> dict[str, Any]:
    return {"factory": spec, "checkpoint": None if weights is None else str(weights),
            "sha256": file_sha256(weights) if weights is not None else model_fingerprint(model),
            "step": None, "preset": None, "dataset": dataset, "seed": None}


def _default_out(spec: str, weights) -> Path:
    if weights is not None:
        w = Path(weights)
        return w.parent / f"eval-{w.stem}"
    return Path(f"eval-{spec.rpartition(':')[2]}")
