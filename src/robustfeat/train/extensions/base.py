"""The extension interface of the training loop: a base class whose hooks all do nothing.

An extension changes training without editing the loop. The loop calls the hooks of every extension
in order (the ones the config asks for first, then those passed to ``train(..., extensions=[...])``):

    per step       eps_scale -> attack_start -> [attack] -> after_attack -> [method loss] + extra_loss
                   -> [backward, optimizer step] -> after_update
    validation     on_validation_end (may roll back, restart or stop the run)
    checkpoints    checkpoint_tensors (saved in ``last``), load_tensors (on resume)
    set-up         setup (once the model, optimizer and loader exist, before a resume loads state)

A regularizer adds a term to the loss (``weight * penalty`` is added to the method's loss, and the
penalty is logged in metrics.jsonl under its name)::

    import torch
    from robustfeat.train import Extension, train

    class WeightNorm(Extension):
        def __init__(self, weight):
            self.weight = weight

        def extra_loss(self, run, batch):
            penalty = sum(p.square().sum() for p in run.model.parameters())
            return self.weight * penalty, {"weight_norm": penalty.detach()}

A guard watches the validations and may stop the run (it stays resumable)::

    from robustfeat.train import Extension, Verdict

    class StopAt(Extension):
        def __init__(self, pgd_acc):
            self.pgd_acc = pgd_acc

        def on_validation_end(self, run, step, val):
            return Verdict(val, stop=True) if val["pgd_acc"] >= self.pgd_acc else None

    # train(cfg, "runs/x", extensions=[WeightNorm(1e-4), StopAt(0.9)])

Randomness: a hook that draws random numbers must draw from ``batch.generator`` (seeded from (seed,
step) before the attack) so that a resumed run draws what an uninterrupted one would; state that
lives across steps belongs in ``checkpoint_tensors``. The add-ons of the config (EMA, carried starts,
GradAlign, the rollback and dead-start guards, the eps schedules) are extensions too: see the other
modules of this package.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ...build import Splits
from ...checkpoint import load_into
from ...compiled import StepFunctions
from ...config import Config
from ...distributed import Dist
from ..state import TrainState


@dataclass
class Batch:
    """One training step as the hooks see it."""

    step: int
    """The step (0-based)."""
    shape: torch.Size
    """The shape of the global batch (every process together)."""
    eps: float
    """The training attack's radius at this step (after every ``eps_scale``)."""
    step_size: float
    """The training attack's step at this step (scaled with eps)."""
    generator: torch.Generator
    """The step's attack generator (seeded from (seed, step) for adversarial methods); draw from it."""
    x: torch.Tensor | None = None
    """This process's images, float in [0, 1] (set after the starts are drawn)."""
    y: torch.Tensor | None = None
    """This process's labels."""
    x_adv: torch.Tensor | None = None
    """The training adversary of ``x`` (None for natural training)."""


@dataclass
class Run:
    """A training run in progress: what the hooks may read and change."""

    cfg: Config
    out_dir: Path
    dctx: Dist
    """The process's place in a multi-process run (``dctx.main``: rank 0, which writes the files)."""
    model: torch.nn.Module
    """The weights the optimizer trains."""
    optimizer: torch.optim.Optimizer
    splits: Splits
    loader: Any
    """The training split's ``DeviceLoader`` (``loader.indices(step)``: the images of a step)."""
    state: TrainState
    log: Any
    """metrics.jsonl: ``log.write({"kind": ..., "step": ..., ...})`` (does nothing on ranks other than 0)."""
    extensions: list[Extension] = field(default_factory=list)
    evaluated: torch.nn.Module | None = None
    """The model validation measures and checkpoints store as ``model.*`` (``model`` unless an
    extension keeps a weight average)."""
    progress: bool = False
    t_start: float = field(default_factory=time.time)
    wall_before: float = 0.0
    """Wall seconds of the run's earlier sessions."""
    last_val: dict[str, float] = field(default_factory=dict)
    saved_step: int = 0
    """The step the ``last`` checkpoint holds (as far as this session knows)."""
    step_fns: StepFunctions | None = None
    """With ``run.compile``: the compiled adversary and loss of a step (None: the eager functions)."""

    def __post_init__(self) -> None:
        if self.evaluated is None:
            self.evaluated = self.model

    @property
    def device(self) -> torch.device:
        return self.dctx.device

    def wall_s(self) -> float:
        """The run's training time so far (all sessions), as metrics records carry it."""
        return round(self.wall_before + time.time() - self.t_start, 1)

    def say(self, message: str) -> None:
        """A line for the user above the progress bar (rank 0, with progress on)."""
        if self.dctx.main and self.progress:
            tqdm.write(message)

    def load(self, path: Path) -> dict[str, Any]:
        """Load a checkpoint's weights (and weight average) and optimizer state; its metadata."""
        averaged = None if self.evaluated is self.model else self.evaluated
        return load_into(path, self.model, self.optimizer, averaged=averaged)


@dataclass(frozen=True)
class Verdict:
    """What an ``on_validation_end`` hook decided (returning None means: nothing, go on)."""

    val: dict[str, float] | None
    """The validation that ``last`` records for this step; None: the current weights are no candidate
    for ``best`` (e.g. just drawn afresh)."""
    stop: bool = False
    """End the run after this checkpoint (it stays resumable)."""
    error: str | None = None
    """End the run with ``TrainingError(error)`` after this checkpoint."""


class Extension:
    """Base class of training extensions; override the hooks you need (each default does nothing)."""

    resumable_best: bool = False
    """True: ``best`` also holds the optimizer state (and trained weights), so it can be gone back to."""

    def setup(self, run: Run) -> None:
        """Once, after the model, optimizer and loader exist and before a resume loads ``last``."""

    def eps_scale(self, step: int) -> float:
        """A factor on the training attack's eps (and step size) at ``step``; factors multiply."""
        return 1.0

    def attack_start(self, run: Run, batch: Batch) -> torch.Tensor | None:
        """The perturbations (shape ``batch.shape``) the attack starts from instead of its random
        start, or None. The first extension that returns one wins; later ones are not asked."""
        return None

    def after_attack(self, run: Run, batch: Batch) -> None:
        """After the adversary ``batch.x_adv`` is made."""

    def extra_loss(self, run: Run, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """A term added to the method's loss (weighted already), and detached 0-d tensors to log by
        name; or None. Runs in the step's autocast context, after the method's loss."""
        return None

    def after_update(self, run: Run, batch: Batch) -> None:
        """After the optimizer step."""

    def on_validation_end(self, run: Run, step: int, val: dict[str, float]) -> Verdict | None:
        """After the periodic validation of ``step`` (``val``: clean_acc and pgd_acc, rank 0's numbers
        on every process), before its checkpoint. The first extension that returns a Verdict decides;
        later ones are not asked."""
        return None

    def on_reinit(self, run: Run) -> None:
        """The weights were drawn afresh and the optimizer state cleared: drop state tied to them."""

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to keep in ``last`` (names with a prefix of your own, not model/train/optim)."""
        return {}

    def load_tensors(self, run: Run, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """On resume, after ``run.state`` is restored: every tensor of ``last`` (at ``path``)."""

    def state_bytes(self, splits: Splits) -> int:
        """Bytes of ``checkpoint_tensors`` (for the free-space check before the run starts)."""
        return 0

    def resumable_bytes(self, model_bytes: int) -> int:
        """Bytes this extension adds to each checkpoint a run can resume from (``last``, and ``best``
        when it is resumable)."""
        return 0


def watches_validation(extension: Extension) -> bool:
    """Whether ``extension`` overrides ``on_validation_end`` (then every process needs rank 0's numbers)."""
    return type(extension).on_validation_end is not Extension.on_validation_end
