"""``optim.ema``: an exponential moving average of the weights (and buffers), updated after every step.

The average (torch's own ``AveragedModel``) is what validation measures and what ``best`` and
``last`` hold as their ``model.*``; ``last`` also keeps the trained weights (``train.*``) to resume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .base import Batch, Extension, Run


class WeightAverage(Extension):
    def __init__(self, decay: float):
        self.decay = decay
        self.averaged: AveragedModel | None = None

    def setup(self, run: Run) -> None:
        self.averaged = AveragedModel(run.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        run.evaluated = self.averaged.module

    def load_tensors(self, run: Run, tensors: dict[str, torch.Tensor], path: Path) -> None:
        # (the average's weights came with the model's); not 0: the next update averages, not copies
        self.averaged.n_averaged.fill_(max(run.state.step, 1))

    def after_update(self, run: Run, batch: Batch) -> None:
        self.averaged.update_parameters(run.model)

    def on_reinit(self, run: Run) -> None:
        """The average starts again from the new weights."""
        run.evaluated.load_state_dict(run.model.state_dict())
        self.averaged.n_averaged.zero_()

    def resumable_bytes(self, model_bytes: int) -> int:
        return model_bytes  # train.*
