"""``attack.carry``: each training image's attack starts where its attack of the previous epoch ended.

The single steps of successive epochs then add up to a multi-step adversary at a single step's cost.
The perturbations (one per training image, float16) are kept on the training device and in ``last``,
so a resumed run goes on exactly; an image not yet visited (or visited before a dead-start restart)
takes the usual random start. One process only. See docs/training.md for when it helps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...attacks import start_noise
from ...build import Splits
from ...checkpoint import CheckpointError, read_checkpoint
from ..errors import TrainingError
from .base import Batch, Extension, Run


class CarriedStarts:
    """The starts of ``attack.carry``: per training image, the perturbation its last attack ended with.

    Kept as float16 on the training device (MNIST's 55,000 images: 86 MB); an image not yet visited
    (or visited before a dead-start restart) takes the usual random start instead.
    """

    def __init__(self, n: int, image_shape: tuple[int, ...], device: torch.device):
        self.delta = torch.zeros((n, *image_shape), dtype=torch.float16, device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)

    def starts(self, idx: torch.Tensor, random_delta: torch.Tensor, eps: float) -> torch.Tensor:
        """The start perturbations of the images ``idx``: the carried ones clipped to the current eps
        (it grows during a warm-up), ``random_delta`` for images without one."""
        carried = self.delta[idx].to(random_delta.dtype).clamp_(-eps, eps)
        return torch.where(self.seen[idx].view(-1, *([1] * (random_delta.dim() - 1))), carried, random_delta)

    def store(self, idx: torch.Tensor, delta: torch.Tensor) -> None:
        self.delta[idx] = delta.to(torch.float16)
        self.seen[idx] = True

    def forget(self) -> None:
        self.seen.zero_()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"carry.delta": self.delta, "carry.seen": self.seen}

    def load(self, path: Path) -> None:
        """The carried starts of the checkpoint ``path``."""
        self.load_tensors(read_checkpoint(path)[0], path)

    def load_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        got = {k: tensors.get(k) for k in ("carry.delta", "carry.seen")}
        if any(t is None or t.shape != ref.shape or t.dtype != ref.dtype
               for t, ref in zip(got.values(), (self.delta, self.seen))):
            raise CheckpointError(f"{str(path)!r} holds no carried attack starts of this training split "
                                  "(attack.carry); it was not written by this config")
        self.delta.copy_(got["carry.delta"])
        self.seen.copy_(got["carry.seen"])


class CarryStarts(Extension):
    """Starts each image's attack from its carried perturbation (the random start on a first visit)."""

    def __init__(self, start_scale: float, distributed: bool):
        if distributed:
            raise TrainingError("attack.carry keeps every training image's perturbation in one process; it does "
                                "not support torchrun (run it in one process, or set attack.carry=false)")
        self.start_scale = start_scale
        self.carried: CarriedStarts | None = None
        self._idx: torch.Tensor | None = None

    def setup(self, run: Run) -> None:
        x_train = run.splits.x_train
        self.carried = CarriedStarts(len(run.splits.y_train), tuple(x_train.shape[1:]), run.device)

    def attack_start(self, run: Run, batch: Batch) -> torch.Tensor:
        # the same draws the attack would make, for first visits
        self._idx = run.loader.indices(batch.step)
        fresh = start_noise(batch.shape, 1, generator=batch.generator, device=run.device)[0]
        return self.carried.starts(self._idx, (2.0 * fresh - 1.0) * (batch.eps * self.start_scale), batch.eps)

    def after_attack(self, run: Run, batch: Batch) -> None:
        self.carried.store(self._idx, batch.x_adv - batch.x)

    def on_reinit(self, run: Run) -> None:
        self.carried.forget()  # the dead model's perturbations are no start for the new one

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.carried.tensors()

    def load_tensors(self, run: Run, tensors: dict[str, torch.Tensor], path: Path) -> None:
        self.carried.load_tensors(tensors, path)

    def state_bytes(self, splits: Splits) -> int:
        # float16 perturbations and a bool per training image
        return len(splits.y_train) * (2 * int(torch.tensor(splits.x_train.shape[1:]).prod()) + 1)
