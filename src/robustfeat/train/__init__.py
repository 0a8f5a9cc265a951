"""Training: ``train(cfg, out_dir)`` and what it is made of.

    loop         train(): the per-step body, validation and checkpoints
    interrupt    SIGINT / SIGTERM: stop at a step boundary with a resumable checkpoint (Interrupted)
    state        TrainState: step, best, learning-rate scale, counters (round-trips through ``last``)
    rundir       the run directory: layout, preparation, free-space check, run.json, metrics.jsonl
    schedule     the optimizer, the learning-rate schedule, the training attack's eps per step
    extensions   the extension interface and the config's add-ons (EMA, carried starts, GradAlign,
                 rollback and dead-start guards, eps schedules)
"""

from __future__ import annotations

from ..seeding import derived_seed
from .errors import TrainingError
from .extensions import Batch, CarriedStarts, Extension, Run, Verdict
from .extensions.dead_start import MAX_RESTARTS
from .interrupt import Interrupted
from .loop import ATTACK_STREAM, EVAL_STREAM, TrainResult, evaluate_split, train
from .rundir import (
    BEST,
    LAST,
    RUN_FILES,
    MetricsLog,
    check_free_space,
    checkpoint_bytes,
    finished_step,
    git_revision,
    machine_info,
    prepare_run_dir,
    recorded_step,
    resume_plan,
    same_experiment,
)
from .schedule import attack_strength, learning_rate, make_optimizer
from .state import TrainState

# derived_seed lives in robustfeat.seeding; it is re-exported for code written against the old train.py

__all__ = [
    "ATTACK_STREAM", "BEST", "EVAL_STREAM", "LAST", "MAX_RESTARTS", "RUN_FILES", "Batch", "CarriedStarts",
    "Extension", "Interrupted", "MetricsLog", "Run", "TrainResult", "TrainState", "TrainingError", "Verdict",
    "attack_strength", "check_free_space", "checkpoint_bytes", "derived_seed", "evaluate_split", "finished_step",
    "git_revision", "learning_rate", "machine_info", "make_optimizer", "prepare_run_dir", "recorded_step",
    "resume_plan", "same_experiment", "train",
]
