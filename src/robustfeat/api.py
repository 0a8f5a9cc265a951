"""The Python entry points behind the command line: load a trained model, evaluate a run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .build import build_model, build_splits, resolve_device
from .checkpoint import CheckpointError, atomic_write_text, load_into, read_checkpoint
from .config import AttackConfig, Config, ConfigError, config_from_dict
from .evaluate import accuracy, wilson_interval
from .train import BEST, LAST, derived_seed


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
    _, meta = read_checkpoint(path)
    try:
        cfg = config_from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} carries an invalid config: {e}") from None
    extra = meta["extra"]
    model = build_model(cfg.model, int(extra["num_classes"]), int(extra["in_channels"]))
    load_into(path, model)
    return model.to(device).eval(), cfg, meta


def load_model(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu") -> nn.Module:
    """A trained model as a plain ``nn.Module`` mapping [0, 1] images (B, C, H, W) to logits.

    It normalizes its input itself, so any attack library (AutoAttack, ...) can use it as is.
    """
    return load_run(run_dir, which, device)[0]


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    which: str = "best",
    n: int | None = None,
    data_dir: str | None = None,
    attack: AttackConfig | None = None,
    device: str = "auto",
    batch_size: int = 500,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Clean and PGD accuracy of a run's checkpoint on the test set (``n``: a seeded random subset).

    Writes ``RUN_DIR/eval.json`` and returns the same dict.
    """
    dev = resolve_device(device)
    model, cfg, meta = load_run(run_dir, which, dev)
    splits = build_splits(cfg, data_dir)
    x, y = splits.x_test, splits.y_test
    if n is not None and n < len(y):
        g = torch.Generator().manual_seed(derived_seed(seed, 7))
        idx = torch.randperm(len(y), generator=g)[:n].sort().values
        x, y = x[idx], y[idx]
    attack = attack or cfg.eval_attack
    gen = torch.Generator(device=dev).manual_seed(derived_seed(seed, 3))
    t0 = time.time()
    acc = accuracy(model, x, y, attack, device=dev, batch_size=batch_size, generator=gen,
                   channels_last=cfg.run.channels_last, progress=progress)
    res = {
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint_path(run_dir, which)),
        "step": meta["step"],
        "preset": cfg.name,
        "dataset": cfg.data.name,
        "n": len(y),
        "attack": {"name": f"PGD-{attack.steps}", **attack.__dict__},
        "seconds": round(time.time() - t0, 1),
    }
    for k, v in acc.items():
        correct = round(v * len(y))
        res[k] = v
        res[f"{k}_ci95"] = list(wilson_interval(correct, len(y)))
    atomic_write_text(Path(run_dir) / "eval.json", json.dumps(res, indent=2))
    return res


def describe_config(cfg: Config) -> str:
    """One paragraph a person can read: what this run trains, on what, with which schedule."""
    a, o = cfg.attack, cfg.optim
    warm = f", eps ramped up over the first {a.eps_warmup_examples:,} examples" if a.eps_warmup_examples else ""
    lam = f", lambda={cfg.lam:g}" if cfg.lam else ""
    return (
        f"{cfg.method.name}{lam} on {cfg.data.name} with {cfg.model.name}; "
        f"training attack PGD-{a.steps} ({a.loss}), eps={a.eps:.4g}, step={a.step_size:.4g}{warm}; "
        f"{o.name} lr={o.lr:g}, batch {o.batch_size}, {o.steps:,} steps = {o.steps * o.batch_size:,} examples"
        + (f", lr x{o.gamma:g} at steps {list(o.milestones)}" if o.milestones else "")
    )
