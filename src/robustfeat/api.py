"""The Python entry points in one import: load a trained model, evaluate a run, describe a config.

The functions live in ``robustfeat.eval`` (loading and evaluating runs); this module gathers them
with ``describe_config`` for code that imports ``robustfeat.api``.
"""

from __future__ import annotations

from .config import Config
from .eval import checkpoint_path, evaluate_run, load_model, load_run

__all__ = ["checkpoint_path", "describe_config", "evaluate_run", "load_model", "load_run"]


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
