"""The training state beside the weights: step, best validation, learning-rate scale and counters.

It travels in the ``extra`` metadata of every checkpoint under the key names below;
:meth:`TrainState.from_checkpoint` reads it back, also from checkpoints of earlier versions, and refuses
damaged values with a one-line error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, read_checkpoint

METRIC_NAMES = {"pgd_acc": "PGD accuracy", "clean_acc": "clean accuracy"}
"""The selection metrics (keys of a validation) and how messages name them."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class TrainState:
    """What a resumed run needs besides weights, optimizer state and the config."""

    step: int = 0
    """Optimizer steps done."""
    best: float = -1.0
    """Best validation value of ``metric`` so far (-1: none yet); stored as ``best_val``."""
    best_step: int = -1
    """The step of ``best`` (-1: none yet)."""
    lr_scale: float = 1.0
    """Factor on the scheduled learning rate (changed by the rollback guard)."""
    rollbacks: int = 0
    """Rollbacks done so far (run.rollback_drop)."""
    restarts: int = 0
    """Re-initializations of a dead start so far (run.restart_below)."""
    metric: str = "pgd_acc"
    """The validation accuracy that picks ``best`` (``MethodSpec.selection_metric``); stored as
    ``best_metric``."""

    def record(self, step: int, val: dict[str, float] | None, final_step: int | None = None) -> bool:
        """Take a validation of ``step`` into account; whether it becomes the best. With ``final_step``
        (``run.select=final``) only the validation of that step does, whatever its value."""
        if val is None:
            return False
        improved = step == final_step if final_step is not None else val[self.metric] > self.best
        if improved:
            self.best, self.best_step = val[self.metric], step
        return improved

    def extra(self, val: dict[str, float] | None, dataset: Any) -> dict[str, Any]:
        """The checkpoint's ``extra`` metadata (this key order is what every checkpoint holds)."""
        return {"best_val": self.best, "best_metric": self.metric, "best_step": self.best_step, "val": val,
                "num_classes": dataset.num_classes, "in_channels": dataset.image_shape[0],
                "classes": list(dataset.classes), "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
                "restarts": self.restarts}

    @classmethod
    def from_checkpoint(cls, path: Path, meta: dict[str, Any], total_steps: int, best_path: Path,
                        metric: str = "pgd_acc") -> TrainState:
        """The state kept in the metadata ``meta`` of the checkpoint ``path``, validated; ``metric`` is the
        run's selection metric.

        A checkpoint written before ``best_step`` was kept takes the step of ``best_path`` (the run's
        ``best``) as the best's step. One written before ``best_metric`` was kept holds ``best_val_pgd``,
        a PGD accuracy. A best chosen by another metric than ``metric`` (a natural run trained by an
        older version, which chose by PGD accuracy) is forgotten, so the next validation writes ``best``
        again by ``metric``.
        """
        extra = meta["extra"]
        step = meta["step"]
        key = "best_val" if "best_val" in extra else "best_val_pgd"
        best = extra.get(key, -1.0)
        if not _is_number(best) or not step <= total_steps:
            raise CheckpointError(f"{str(path)!r} has damaged metadata (step {step}, {key} {best!r})")
        stored_metric = extra.get("best_metric", "pgd_acc")
        if stored_metric not in METRIC_NAMES:
            raise CheckpointError(f"{str(path)!r} has damaged metadata (best_metric {stored_metric!r})")
        best_step = extra.get("best_step")
        if best_step is None:  # written before best_step was kept: best's own step
            best_step = read_checkpoint(best_path)[1]["step"] if best >= 0 and best_path.exists() else -1
        if not _is_int(best_step) or not -1 <= best_step <= step:
            raise CheckpointError(f"{str(path)!r} has damaged metadata (best_step {best_step!r})")
        if stored_metric != metric:
            best, best_step = -1.0, -1
        lr_scale, rollbacks, restarts = extra.get("lr_scale", 1.0), extra.get("rollbacks", 0), extra.get("restarts", 0)
        if (not _is_number(lr_scale) or not 0 < lr_scale <= 1
                or any(not _is_int(n) or n < 0 for n in (rollbacks, restarts))):
            raise CheckpointError(f"{str(path)!r} has damaged metadata (lr_scale {lr_scale!r}, "
                                  f"rollbacks {rollbacks!r}, restarts {restarts!r})")
        return cls(step=step, best=float(best), best_step=best_step, lr_scale=float(lr_scale),
                   rollbacks=rollbacks, restarts=restarts, metric=metric)
