"""The Python entry points behind the command line: load a trained model, evaluate a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .build import build_model
from .checkpoint import CheckpointError, check_architecture, load_into, read_checkpoint
from .config import AttackConfig, Config, ConfigError, config_from_dict
from .train import BEST, LAST


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


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    which: str = "best",
    n: int | None = None,
    data_dir: str | None = None,
    attack: AttackConfig | None = None,
    suite: str | None = None,
    source: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on the test set (``n``: a fixed seeded subset) and write RUN_DIR/eval/.

    ``suite`` None: natural accuracy and one attack (``attack``, default the preset's ``eval_attack``);
    'quick', 'paper' or 'full': the evaluation suite of ``robustfeat eval`` (``robustfeat.eval_run``).
    The result has ``clean_acc``, ``pgd_acc`` and ``attack`` besides the suite's rows and checks.
    """
    from .eval_run import evaluate_run_suite
    from .suite import Row

    rows = None
    if suite is None:
        if attack is None:
            _, cfg, _ = load_run(run_dir, which, "cpu")
            attack = cfg.eval_attack
        rows = [Row("natural"), Row("whitebox", attack.loss, attack.steps, attack.eps, attack.step_size,
                                    attack.restarts, attack.random_start, attack.bn_mode)]
    return evaluate_run_suite(run_dir, suite=suite or "quick", rows=rows, source=source, n=n, which=which,
                              data_dir=data_dir, device=device, batch_size=batch_size, seed=seed,
                              progress=progress, eps=attack.eps if attack else None,
                              step_size=attack.step_size if attack else None)


def describe_config(cfg: Config) -> str:
    """One paragraph a person can read: what this run trains, on what, with which schedule."""
    a, o = cfg.attack, cfg.optim
    warm = f", eps ramped up over the first {a.eps_warmup_examples:,} examples" if a.eps_warmup_examples else ""
    if a.eps_final:
        warm += f", then from {a.eps_final_from:.0%} of the run towards eps={a.eps_final:.4g} at its end"
    if a.carry:
        warm += ", each image's attack starting where its previous epoch's ended"
    lam = f", lambda={cfg.lam:g}" if cfg.lam else ""
    return (
        f"{cfg.method.name}{lam} on {cfg.data.name} with {cfg.model.name}; "
        f"training attack PGD-{a.steps} ({a.loss}), eps={a.eps:.4g}, step={a.step_size:.4g}{warm}; "
        f"{o.name} lr={o.lr:g}, batch {o.batch_size}, {o.steps:,} steps = {o.steps * o.batch_size:,} examples"
        + (f", lr x{o.gamma:g} at steps {list(o.milestones)}" if o.milestones else "")
        + (f", cyclic lr peaking at {o.peak:.0%} of the run" if o.schedule == "cyclic" else "")
        + (f"; GradAlign weight {cfg.method.grad_align:g}" if cfg.method.grad_align else "")
    )
