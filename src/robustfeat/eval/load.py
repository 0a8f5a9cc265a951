"""Reading a trained run for evaluation and analysis: which checkpoint, the model, its config, its identity."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..build import build_model, resolve_device
from ..checkpoint import CheckpointError, check_architecture, load_into, read_checkpoint
from ..config import ConfigError, config_from_dict, read_config_file
from ..train.rundir import BEST, LAST, experiment_differences, same_training


def _run_dir(run_dir: Any) -> Path:
    if isinstance(run_dir, bool) or not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir).strip():
        raise CheckpointError(f"run_dir={run_dir!r} is invalid: expected the path of a run directory")
    return Path(run_dir)


def checkpoint_path(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """The checkpoint of a run: 'best' (validation PGD accuracy, clean for natural training;
    falls back to 'last'), 'last', or a path.

    Every way of not finding one is a one-line CheckpointError that says what is there instead: a file
    where a run directory is expected, a run whose weights were not kept, ``last`` deleted after the run.
    """
    run_dir = _run_dir(run_dir)
    if not isinstance(which, (str, os.PathLike)) or not str(which):
        raise CheckpointError(f"checkpoint {which!r} is invalid: expected best, last or the path of a checkpoint")
    if which not in ("best", "last"):
        path = Path(which)
        if path.is_dir():
            raise CheckpointError(f"checkpoint {str(path)!r} is a directory; expected best, last or a "
                                  ".safetensors file")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist (expected best, last or the path of "
                                  "a .safetensors file)")
        return path
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{str(run_dir)!r} is a file, not a run directory (a directory with config.yaml "
                              f"and {BEST}); to evaluate a checkpoint file, pass its run directory and "
                              "--checkpoint FILE")
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {str(run_dir)!r} does not exist")
    best, last = run_dir / BEST, run_dir / LAST
    if which == "best" and best.is_file():
        return best
    if last.is_file():
        return last
    if which == "last" and best.is_file():
        raise CheckpointError(f"{str(run_dir)!r} has no {LAST} (deleted once the run was over?); its best "
                              "checkpoint is there: use --checkpoint best")
    raise CheckpointError(f"run directory {str(run_dir)!r} holds no checkpoint (expected {BEST} or {LAST}); "
                          "a run published without its weights cannot be evaluated again")


def _check_belongs(run_dir: Path, path: Path, meta: dict[str, Any]) -> None:
    """Refuse a checkpoint that another run wrote (copied in, or given as --checkpoint) when its run
    directory's config.yaml says otherwise: its numbers would be reported as this run's."""
    cfg_file = run_dir / "config.yaml"
    if not run_dir.is_dir() or not cfg_file.exists():
        return  # a checkpoint alone carries its config
    saved = read_config_file(cfg_file).to_dict()
    if not same_training(saved, meta["config"]):
        raise CheckpointError(
            f"checkpoint {str(path)!r} was not written by the run in {str(run_dir)!r}: its config differs "
            f"from {str(cfg_file)!r} ({experiment_differences(meta['config'], saved)}: checkpoint / run); "
            "evaluate it in the run directory it came from")


def _device(device: Any) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ConfigError(f"device={device!r} is invalid: expected auto, cpu, cuda or cuda:N")
    return resolve_device(device)


def load_run(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, its Config, checkpoint metadata). The checkpoint must belong to
    the run: its config is the one of the run's config.yaml (when there is one)."""
    path = checkpoint_path(run_dir, which)
    device = _device(device)
    tensors, meta = read_checkpoint(path)
    _check_belongs(Path(run_dir), path, meta)
    try:
        cfg = config_from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} carries an invalid config: {e}") from None
    extra = meta["extra"]
    shape = []
    for key, hi in (("num_classes", 100_000), ("in_channels", 64)):
        v = extra.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise CheckpointError(f"checkpoint {str(path)!r} has damaged metadata: {key}={v!r}, expected 1-{hi}")
        shape.append(v)
    try:
        # The architecture is checked on the meta device first, so a checkpoint whose config asks
        # for an enormous model is refused before anything is allocated.
        with torch.device("meta"):
            skeleton = build_model(cfg.model, *shape)
        check_architecture(path, tensors, skeleton)
        del tensors, skeleton
        model = build_model(cfg.model, *shape)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot build its model ({e})") from None
    load_into(path, model)
    return model.to(device).eval(), cfg, meta


def load_model(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu") -> nn.Module:
    """A trained model as a plain ``nn.Module`` mapping [0, 1] images (B, C, H, W) to logits.

    It normalizes its input itself, so any attack library (AutoAttack, ...) can use it as is.
    """
    return load_run(run_dir, which, device)[0]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_identity(run_dir, which: str, cfg, meta) -> dict[str, Any]:
    """Which checkpoint was evaluated (path, sha256, step) and what it was trained as."""
    path = checkpoint_path(run_dir, which)
    return {
        "run_dir": str(run_dir), "checkpoint": str(path), "sha256": file_sha256(path), "step": meta["step"],
        "preset": cfg.name, "dataset": cfg.data.name, "model": cfg.model.name,
        "widths": list(cfg.model.widths) if cfg.model.widths else None, "method": cfg.method.name,
        "lam": cfg.lam, "seed": cfg.run.seed, "optim_steps": cfg.optim.steps,
    }
