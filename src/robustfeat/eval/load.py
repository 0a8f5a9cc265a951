"""Reading a trained run for evaluation and analysis: which checkpoint, the model, its config, its identity."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..build import build_model
from ..checkpoint import CheckpointError, check_architecture, load_into, read_checkpoint
from ..config import ConfigError, config_from_dict
from ..train.rundir import BEST, LAST


def checkpoint_path(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """The checkpoint of a run: 'best' (validation PGD accuracy; falls back to 'last'), 'last', or a path."""
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        return Path(which)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {str(run_dir)!r} does not exist")
    best, last = run_dir / BEST, run_dir / LAST
    if which == "best" and best.exists():
        return best
    if last.exists():
        return last
    raise CheckpointError(f"run directory {str(run_dir)!r} holds no checkpoint (expected {LAST})")


def load_run(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, its Config, checkpoint metadata)."""
    path = checkpoint_path(run_dir, which)
    tensors, meta = read_checkpoint(path)
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
