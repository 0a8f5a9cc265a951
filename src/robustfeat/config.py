"""Typed, validated configuration: one frozen dataclass per concern.

A run is described by a ``Config`` built from a preset YAML file (``robustfeat/presets``), an optional
budget inside it, and ``key=value`` overrides from the command line. Every field is checked when the
config is built, unknown keys are rejected with a suggestion, and the fully resolved config is written
next to every run (``config.yaml``), so a run directory alone says how it was made.

Choices are typed as ``Literal`` and checked on construction; model/dataset compatibility comes from the
metadata each model registers (``robustfeat.models.model_info``). The options for single-step training
(beyond the paper) keep their key paths in the sections they act on, and sit together at the end of
each section under a "single-step training" comment; ``SINGLE_STEP_KEYS`` lists them, and
docs/training.md describes them together.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from .registry import suggest


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key, the value and what is expected."""


# ---------------------------------------------------------------------------------------------------------
# validation helpers


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def _int(key: str, value: Any, lo: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, value, "an integer" + (f" >= {lo}" if lo is not None else ""))
    if lo is not None and value < lo:
        _fail(key, value, f"an integer >= {lo}")


def _num(key: str, value: Any, lo: float | None = None, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "a finite number")
    if lo is not None and (value <= lo if strict else value < lo):
        _fail(key, value, f"a number {'>' if strict else '>='} {lo}")


def _choice(key: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{key}={value!r} is invalid: expected one of {', '.join(map(str, choices))}"
            f"{suggest(str(value), list(choices))}"
        )


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(key, value, "true or false")


def _opt_str(key: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip() or "\x00" in value):
        _fail(key, value, "a path (a non-empty string) or null")


def _section(key: str, value: Any, cls: type) -> None:
    if not isinstance(value, cls):
        raise ConfigError(f"config section {key!r} must be a {cls.__name__}, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------------
# the sections

DatasetName = Literal["mnist", "mnist-sample", "cifar10", "cifar100", "npz"]
ModelInit = Literal["torch", "madry"]
AttackLoss = Literal["ce", "cw"]
BnMode = Literal["train", "eval"]
OptimName = Literal["sgd", "adam"]
Schedule = Literal["step", "cyclic"]
Precision = Literal["fp32", "bf16"]
Select = Literal["best-val", "final"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
CompileBackend = Literal["inductor", "aot_eager"]

MAX_SEED = (1 << 64) - 1
"""The largest seed (``robustfeat.seeding.derived_seed`` reads seeds as 64-bit integers)."""
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)
BN_MODES: tuple[str, ...] = get_args(BnMode)
ATTACK_LOSSES: tuple[str, ...] = get_args(AttackLoss)
PRECISIONS: tuple[str, ...] = get_args(Precision)
SELECTS: tuple[str, ...] = get_args(Select)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
COMPILE_BACKENDS: tuple[str, ...] = get_args(CompileBackend)
DATASET_FAMILIES: dict[str, str | None] = {
    "mnist": "mnist", "mnist-sample": "mnist", "cifar10": "cifar", "cifar100": "cifar", "npz": None,
}
"""The family of each dataset, matched against a model's (``ModelInfo.family``); None: any model."""
_FAMILY_NAMES = {"mnist": "MNIST", "cifar": "CIFAR"}

# The options for single-step training, beyond the paper (see docs/training.md).
SINGLE_STEP_KEYS = (
    "attack.start_scale", "attack.project", "attack.clip_start", "attack.eps_final", "attack.eps_final_from",
    "attack.carry", "method.grad_align", "optim.ema", "run.rollback_drop", "run.rollback_lr",
    "run.rollback_after", "run.restart_below",
)


@dataclass(frozen=True)
class DataConfig:
    name: DatasetName = "mnist"
    """Dataset: mnist, mnist-sample (embedded, offline), cifar10, cifar100 or npz (your own arrays)."""
    dir: str | None = None
    """Data directory; None -> $ROBUSTFEAT_DATA, else the user cache directory. --data-dir sets it."""
    path: str | None = None
    """For name=npz: the .npz file with x_train, y_train, x_test, y_test."""
    val_size: int = 5000
    """Images held out of the training set for model selection (never the test set); at least 1,
    since periodic validation picks the best checkpoint and watches for catastrophic overfitting."""
    train_size: int | None = None
    """Use only this many training images (after the validation split); None = all. For CPU budgets."""
    augment: bool = False
    """Pad 4 + random crop + horizontal flip, batched on the training device (CIFAR)."""
    coarse_labels: bool = False
    """CIFAR-100 only: the 20 coarse labels instead of the 100 fine ones."""

    def __post_init__(self) -> None:
        _choice("data.name", self.name, DATASET_NAMES)
        _opt_str("data.dir", self.dir)
        _opt_str("data.path", self.path)
        _int("data.val_size", self.val_size, 0)
        if self.val_size == 0:
            _fail("data.val_size", 0, "an integer >= 1: periodic validation selects the best checkpoint and "
                  "watches for catastrophic overfitting, and an empty split would log 0% accuracy")
        if self.train_size is not None:
            _int("data.train_size", self.train_size, 1)
        _bool("data.augment", self.augment)
        _bool("data.coarse_labels", self.coarse_labels)
        if self.name == "npz" and not self.path:
            _fail("data.path", self.path, "the path of a .npz file when data.name=npz")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mnist_cnn"
    """A registered model (robustfeat.models.list_models()); '_att' names carry the attention module."""
    widths: tuple[int, ...] | None = None
    """ResNet widths [stem, stage1, stage2, stage3]; None = the registered model's default."""
    att_hidden: int = 64
    """Hidden units of the attention MLP f([l_n; g]) (section 3.2: 64)."""
    init: ModelInit = "torch"
    """MNIST CNN weight init: torch (PyTorch's default) or madry (the TF reference: truncated normal,
    std 0.1, biases 0.1), which trains much more slowly on short schedules. The ResNets always use
    Madry's He-normal init."""

    def __post_init__(self) -> None:
        from .models import list_models, model_info

        _choice("model.name", self.name, list_models())
        if self.widths is not None:
            if not isinstance(self.widths, (list, tuple)) or len(self.widths) != 4:
                _fail("model.widths", self.widths, "a list of 4 positive integers, e.g. [16, 16, 32, 64]")
            for w in self.widths:
                _int("model.widths", w, 1)
            if list(self.widths) != sorted(self.widths):
                _fail("model.widths", self.widths, "non-decreasing widths (residual units never shrink)")
            if "widths" not in model_info(self.name).options:
                _fail("model.widths", self.widths, f"null: {self.name} has fixed widths (only ResNets take widths)")
            object.__setattr__(self, "widths", tuple(self.widths))
        _int("model.att_hidden", self.att_hidden, 1)
        _choice("model.init", self.init, get_args(ModelInit))

    @property
    def has_attention(self) -> bool:
        from .models import model_info

        return model_info(self.name).has_attention


@dataclass(frozen=True)
class AttackConfig:
    """An l_inf PGD attack. FGSM with random start is steps=1."""

    eps: float = 0.3
    """l_inf radius in [0, 1] pixel units (8/255 = 0.0313725 for CIFAR)."""
    step_size: float = 0.01
    """Step alpha of x <- proj(x + alpha * sign(grad))."""
    steps: int = 40
    restarts: int = 1
    """Random restarts; the worst case over restarts is kept per example."""
    random_start: bool = True
    """Start from a uniform point of the eps-ball (Madry et al.)."""
    loss: AttackLoss = "ce"
    """ce (cross-entropy) or cw (the CW margin loss, kappa=50)."""
    bn_mode: BnMode = "eval"
    """BatchNorm while attacking: eval (running statistics) or train (batch statistics). Running
    statistics are never updated by an attack either way."""

    def __post_init__(self) -> None:
        _num("attack.eps", self.eps, 0.0)
        if self.eps > 1:
            _fail("attack.eps", self.eps, "a radius in [0, 1] pixel units (e.g. 8/255 = 0.0314, not 8)")
        _num("attack.step_size", self.step_size, 0.0, strict=True)
        _int("attack.steps", self.steps, 0)
        _int("attack.restarts", self.restarts, 1)
        _bool("attack.random_start", self.random_start)
        _choice("attack.loss", self.loss, ATTACK_LOSSES)
        _choice("attack.bn_mode", self.bn_mode, BN_MODES)


@dataclass(frozen=True)
class TrainAttackConfig(AttackConfig):
    """The attack that makes training adversaries, with an optional eps warm-up."""

    bn_mode: BnMode = "train"
    """Madry's reference code attacks with batch statistics during training (running ones frozen)."""
    eps_warmup_examples: int = 0
    """Ramp eps (and the step size with it) linearly from 0 over this many training examples; 0 = off.
    Not in the paper: it lets short CPU budgets escape the chance-level plateau of PGD training."""

    # -- single-step training (beyond the paper; SINGLE_STEP_KEYS, and docs/training.md) --
    start_scale: float = 1.0
    """The random start is uniform in +-start_scale * eps (1 = the eps-ball, as PGD and FGSM-RS)."""
    project: bool = True
    """Project every iterate back onto the eps-ball (PGD, FGSM-RS). false: clip to [0, 1] only, so the
    training adversary may leave the ball, by up to start_scale * eps + steps * step_size. With
    start_scale=2, steps=1, step_size=eps this is N-FGSM (de Jorge et al. 2022), a single-step
    adversary that avoids catastrophic overfitting where FGSM-RS does not. Training only: evaluation
    attacks always stay in the ball."""
    clip_start: bool = True
    """false: take the first gradient at the random start x + noise before clipping it to [0, 1], as Wong
    et al.'s FGSM-RS reference code does (on MNIST, where most pixels are 0 or 1, clipping removes much
    of the start noise). Every iterate after a step is still clipped to [0, 1]. Training only."""
    eps_final: float = 0.0
    """Experimental (its only measurement was negative; see docs/training.md): from
    ``eps_final_from`` of the run on, ramp the training eps (and the step size with it) linearly from
    ``eps`` to ``eps_final`` at the last step. 0 = off. Validation and evaluation keep ``eval_attack.eps``."""
    eps_final_from: float = 0.4
    """Fraction of optim.steps where the eps_final ramp starts (0.4: the one-cycle lr's peak)."""
    carry: bool = False
    """Start each training image's attack from the perturbation it ended with on its previous visit
    (one epoch earlier), clipped to the current eps, instead of a fresh random start; an image's first
    visit keeps the random start. The single steps of successive epochs then add up to a multi-step
    adversary at FGSM's cost (the epoch prior of ATTA, Zheng et al. 2020, and FGSM-EP, Jia et al.
    2022). The perturbations (one per training image, float16) are kept in memory and in the ``last``
    checkpoint. One process only. Evaluate such models with ``--suite full`` (AutoAttack); see docs/training.md
    for what it was measured to do and why it goes with ``method.grad_align``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _int("attack.eps_warmup_examples", self.eps_warmup_examples, 0)
        _num("attack.eps_final", self.eps_final, 0.0)
        if self.eps_final > 1:
            _fail("attack.eps_final", self.eps_final, "a number in [0, 1] (0 = off)")
        _num("attack.eps_final_from", self.eps_final_from, 0.0)
        if self.eps_final_from >= 1:
            _fail("attack.eps_final_from", self.eps_final_from, "a fraction of the run in [0, 1)")
        if self.eps_final > 0 and self.eps <= 0:
            _fail("attack.eps_final", self.eps_final, "0 when attack.eps is 0")
        _num("attack.start_scale", self.start_scale, 0.0)
        _bool("attack.project", self.project)
        _bool("attack.clip_start", self.clip_start)
        if not self.clip_start and (self.steps < 1 or self.restarts != 1):
            _fail("attack.clip_start", self.clip_start, "true unless attack.steps >= 1 and attack.restarts = 1")
        _bool("attack.carry", self.carry)
        if self.carry and (self.steps < 1 or self.restarts != 1 or not self.random_start or not self.project):
            _fail("attack.carry", self.carry, "false unless attack.steps >= 1, attack.restarts = 1, "
                  "attack.random_start = true (an image's first visit starts at random) and attack.project = "
                  "true (a carried start is clipped to the eps-ball)")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "at"
    """natural, at, at-reg, at-att or at-att-reg (robustfeat.methods)."""
    lam: float | None = None
    """Weight of the L2 feature regularizer (eq. 7); None = the paper's value for the method."""

    # -- single-step training (beyond the paper; SINGLE_STEP_KEYS, and docs/training.md) --
    grad_align: float = 0.0
    """Weight of GradAlign (Andriushchenko & Flammarion 2020),
    grad_align * mean(1 - cos(grad_x CE(x), grad_x CE(x + eta))) with eta uniform in the eps-ball. It
    keeps the loss locally linear, which FGSM adversaries assume, and costs a double backward. 0 = off."""

    def __post_init__(self) -> None:
        from .methods import METHODS

        _choice("method.name", self.name, METHODS.names())
        if self.lam is not None:
            _num("method.lam", self.lam, 0.0)
        _num("method.grad_align", self.grad_align, 0.0)
        if self.grad_align > 0 and not METHODS.get(self.name).adversarial:
            _fail("method.grad_align", self.grad_align, f"0 for method {self.name!r} (it has no adversary)")


@dataclass(frozen=True)
class OptimConfig:
    name: OptimName = "adam"
    """sgd (momentum) or adam."""
    lr: float = 1e-4
    momentum: float = 0.9
    """SGD only."""
    weight_decay: float = 0.0
    batch_size: int = 50
    steps: int = 100_000
    """Optimizer steps (batches) in the whole run."""
    milestones: tuple[int, ...] = ()
    """Steps at which the learning rate is multiplied by `gamma`."""
    gamma: float = 0.1
    schedule: Schedule = "step"
    """step: lr * gamma^(milestones passed), the paper's schedules. cyclic: one triangle, linear from 0 up
    to `lr` at `peak` of the run and back down to 0 at the end (the schedule Wong et al. 2020 use for
    fast single-step training)."""
    peak: float = 0.4
    """cyclic only: where the learning rate peaks, as a fraction of `steps`."""

    # -- single-step training (beyond the paper; SINGLE_STEP_KEYS, and docs/training.md) --
    ema: float = 0.0
    """Decay of an exponential moving average of the weights (and buffers), updated after every step;
    0 = off. When on, validation, `best` and the `model.*` weights of every checkpoint are the
    average."""

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, get_args(OptimName))
        _choice("optim.schedule", self.schedule, get_args(Schedule))
        if not isinstance(self.peak, (int, float)) or isinstance(self.peak, bool) or not 0 < self.peak < 1:
            _fail("optim.peak", self.peak, "a fraction strictly between 0 and 1")
        _num("optim.lr", self.lr, 0.0, strict=True)
        _num("optim.momentum", self.momentum, 0.0)
        _num("optim.weight_decay", self.weight_decay, 0.0)
        _int("optim.batch_size", self.batch_size, 1)
        _int("optim.steps", self.steps, 1)
        if not isinstance(self.milestones, (list, tuple)):
            _fail("optim.milestones", self.milestones, "a list of step numbers")
        for m in self.milestones:
            _int("optim.milestones", m, 1)
        if list(self.milestones) != sorted(self.milestones):
            _fail("optim.milestones", self.milestones, "increasing step numbers")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        if self.schedule == "cyclic" and self.milestones:
            _fail("optim.milestones", list(self.milestones), "[] with optim.schedule=cyclic (its lr is one triangle)")
        _num("optim.gamma", self.gamma, 0.0, strict=True)
        if not isinstance(self.ema, (int, float)) or isinstance(self.ema, bool) or not 0 <= self.ema < 1:
            _fail("optim.ema", self.ema, "a decay in [0, 1), e.g. 0.999 (0 = no weight average)")


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    """Seeds the weights, the data order, the augmentation and the attacks' random starts."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    eval_every: int = 1000
    """Steps between evaluations on the validation split (and checkpoints)."""
    eval_size: int = 1000
    """Validation images used by each periodic evaluation (0 = the whole split)."""
    checkpoint_every: int = 0
    """Extra checkpoints between evaluations, in steps; 0 = only at evaluations and at the end."""
    select: Select = "best-val"
    """Which weights the ``best`` checkpoint holds (the ones every evaluation and analysis uses):
    best-val, those of the periodic validation with the highest selection metric (early stopping, as
    against robust overfitting in long step schedules); or final, the last step's, for short schedules
    that anneal the learning rate to 0, where a few noisy mid-schedule validations would pick weights
    that have not finished annealing. Validation runs and is logged either way."""
    log_every: int = 50
    """Steps between metric lines in metrics.jsonl."""
    tensorboard: bool = False
    channels_last: bool = True
    """Convolutions in NHWC layout (faster on CPU for these models)."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""
    sync_bn: bool = False
    """Multi-process runs (torchrun) only: SyncBatchNorm, i.e. BatchNorm statistics over the global batch
    instead of each rank's shard (CUDA only; PyTorch's SyncBatchNorm has no CPU kernel). Off: each rank
    normalizes with its shard's statistics and running statistics are rank 0's, as with DDP."""
    precision: Precision = "fp32"
    """Arithmetic of training's forward and backward passes: fp32 (default, the paper's numerics) or
    bf16 (autocast: convolutions and matrix products in bfloat16, weights, optimizer state, losses and
    BatchNorm statistics in fp32). A speed option that changes numerics, not the method: faster on CPUs
    with AMX (Sapphire Rapids and later) and on recent GPUs (see results/bench). Validation,
    `robustfeat eval` and every analysis always run in fp32."""
    attack_fp32: bool = False
    """With precision=bf16: craft the training adversary in fp32 and use bf16 only for the weight
    update (slower, but the attack's gradients are exactly those of fp32 training)."""
    compile: bool = False
    """torch.compile the training step: one PGD iteration (forward, input gradient, signed step,
    projection) and the method's loss with its backward (``robustfeat.compiled``). Same method, same
    random draws; the arithmetic equals the eager step's up to float rounding. Off by default: see
    docs/gpu.md for where it was measured to help. Needs attack.restarts = 1."""
    compile_mode: CompileMode = "default"
    """With run.compile: torch.compile's mode. default (fused kernels), reduce-overhead (also CUDA
    graphs on CUDA: no per-kernel launch cost), max-autotune, max-autotune-no-cudagraphs."""
    compile_backend: CompileBackend = "inductor"
    """With run.compile: inductor (generated kernels; needs a C compiler on CPUs), or aot_eager (the
    same tracing and autograd graphs on torch's own kernels, for tests and debugging)."""
    deterministic: bool = False
    """Deterministic kernels where torch has them (torch.use_deterministic_algorithms, warn-only;
    cuDNN without autotuning), for the duration of ``train``. CPU kernels are deterministic already; on
    CUDA this makes a resumed run equal the uninterrupted one bit for bit, at some speed."""

    # -- single-step training (beyond the paper; SINGLE_STEP_KEYS, and docs/training.md) --
    rollback_drop: float = 0.0
    """A guard against catastrophic overfitting: when a periodic validation's PGD accuracy
    falls more than this below the best so far (a fraction: 0.03 = 3 points), the run goes back to the
    ``best`` checkpoint's weights and optimizer state and multiplies its learning rate by
    ``rollback_lr`` from then on; the schedule and the data order go on from the current step. Each
    further drop does the same again. 0 = off. With it on, ``best`` also stores the optimizer state."""
    rollback_lr: float = 0.5
    """Factor applied to the learning rate at each rollback, in (0, 1]."""
    rollback_after: int = 0
    """First step whose validation may trigger a rollback, and the first whose best is a state to go
    back to: earlier validations, still near chance and noisy, only update the best, and while the best
    is one of them no drop rolls back."""
    restart_below: float = 0.0
    """A guard against dead starts: when a periodic validation's clean accuracy is
    below this (e.g. 0.2 on 10 classes: the network gives one class for every image), the weights are
    drawn afresh from a new seed and the optimizer state is cleared; the schedule and the data order go
    on from the current step. At most 3 times, then training stops with an error. 0 = off."""

    def __post_init__(self) -> None:
        _int("run.seed", self.seed, 0)
        if self.seed > MAX_SEED:  # derived_seed reads 64 bits: larger seeds would repeat smaller ones
            _fail("run.seed", self.seed, f"an integer in [0, 2**64 - 1] (seeds are 64-bit; {self.seed} would give "
                  f"the run of seed {self.seed & MAX_SEED})")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", self.device)
        ):
            _fail("run.device", self.device, "auto, cpu, cuda or cuda:N")
        _int("run.eval_every", self.eval_every, 1)
        _int("run.eval_size", self.eval_size, 0)
        _int("run.checkpoint_every", self.checkpoint_every, 0)
        _choice("run.select", self.select, SELECTS)
        _int("run.log_every", self.log_every, 1)
        _bool("run.tensorboard", self.tensorboard)
        _bool("run.channels_last", self.channels_last)
        _int("run.threads", self.threads, 0)
        _bool("run.sync_bn", self.sync_bn)
        _choice("run.precision", self.precision, PRECISIONS)
        _bool("run.attack_fp32", self.attack_fp32)
        _bool("run.compile", self.compile)
        _choice("run.compile_mode", self.compile_mode, COMPILE_MODES)
        _choice("run.compile_backend", self.compile_backend, COMPILE_BACKENDS)
        _bool("run.deterministic", self.deterministic)
        _num("run.rollback_drop", self.rollback_drop, 0.0)
        if self.rollback_drop >= 1:
            _fail("run.rollback_drop", self.rollback_drop, "a drop of validation PGD accuracy in [0, 1), "
                  "e.g. 0.03 = 3 points (0 = off)")
        _num("run.rollback_lr", self.rollback_lr, 0.0, strict=True)
        if self.rollback_lr > 1:
            _fail("run.rollback_lr", self.rollback_lr, "a learning-rate factor in (0, 1], e.g. 0.5")
        _int("run.rollback_after", self.rollback_after, 0)
        if self.select == "final" and self.rollback_drop > 0:
            _fail("run.select", self.select, "best-val with run.rollback_drop > 0 (a rollback goes back to the "
                  "best validation's weights, which run.select=final does not keep)")
        _num("run.restart_below", self.restart_below, 0.0)
        if self.restart_below >= 1:
            _fail("run.restart_below", self.restart_below, "a clean validation accuracy in [0, 1), e.g. 0.2 "
                  "(0 = off)")


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    """The preset this config came from (informational)."""
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    attack: TrainAttackConfig = field(default_factory=TrainAttackConfig)
    """The training adversary."""
    eval_attack: AttackConfig = field(default_factory=AttackConfig)
    """The attack of periodic validation and of `robustfeat eval` (the dataset's standard PGD)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        from .methods import METHODS
        from .models import model_info

        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            _fail("name", self.name, "a run name of letters, digits and . _ + - (it names the run directory)")
        if not isinstance(self.description, str):
            _fail("description", self.description, "a string")
        for key, cls in SECTIONS.items():
            _section(key, getattr(self, key), cls)
        spec = METHODS.get(self.method.name)
        if spec.attention and not self.model.has_attention:
            raise ConfigError(
                f"method.name={self.method.name!r} needs an attention model, but model.name="
                f"{self.model.name!r} has none: use {self.model.name}_att"
            )
        if not spec.attention and self.model.has_attention:
            raise ConfigError(
                f"model.name={self.model.name!r} has an attention module, but method.name="
                f"{self.method.name!r} is a method without attention: use {spec.with_attention_name()}"
            )
        info, family = model_info(self.model.name), self.data_family
        if family is not None and family != info.family:
            raise ConfigError(f"model.name={self.model.name!r} expects {info.inputs}, not {_FAMILY_NAMES[family]}")
        if self.run.compile and self.attack.restarts != 1:
            raise ConfigError(f"run.compile=true with attack.restarts={self.attack.restarts}: the compiled "
                              "training attack has one start; set attack.restarts=1 or run.compile=false")
        if self.attack.carry and self.data.augment:
            raise ConfigError("attack.carry=true with data.augment=true: a carried perturbation belongs to "
                              "last epoch's crop and flip of the image, not this epoch's; set one of them false")

    @property
    def lam(self) -> float:
        """The regularizer weight in force (the method's paper value unless set)."""
        from .methods import METHODS

        if self.method.lam is not None:
            return float(self.method.lam)
        return METHODS.get(self.method.name).default_lam(self.data_family)

    @property
    def data_family(self) -> str | None:
        """The dataset's family (mnist or cifar; None for npz), which the model must belong to."""
        return DATASET_FAMILIES[self.data.name]

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return [plain(i) for i in v]
            if isinstance(v, dict):
                return {k: plain(i) for k, i in v.items()}
            return v

        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "method": MethodConfig,
    "attack": TrainAttackConfig,
    "eval_attack": AttackConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}
TOP_LEVEL = ("name", "description")
_NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,199}")
# values that are paths or free text: never read as fractions or numbers
_TEXT_KEYS = ("name", "description", "dir", "path", "device")


def config_from_dict(d: dict[str, Any]) -> Config:
    """Build and validate a Config; unknown sections or keys are a ConfigError with a suggestion."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(d).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key in TOP_LEVEL:
            kwargs[key] = value
            continue
        if key not in SECTIONS:
            raise ConfigError(
                f"unknown config section {key!r}{suggest(key, [*SECTIONS, *TOP_LEVEL])}; "
                f"known: {', '.join([*TOP_LEVEL, *SECTIONS])}"
            )
        cls = SECTIONS[key]
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
        names = [f.name for f in fields(cls)]
        for k in value:
            if k not in names:
                raise ConfigError(
                    f"unknown key {key}.{k}{suggest(k, names)}; known keys of {key}: {', '.join(names)}"
                )
        try:
            kwargs[key] = cls(**value)
        except TypeError as e:  # pragma: no cover - guarded by the key check above
            raise ConfigError(f"config section {key!r}: {e}") from None
    return Config(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# presets, budgets and overrides

PRESET_DIR = "presets"


def _preset_files() -> dict[str, Any]:
    root = resources.files("robustfeat") / PRESET_DIR
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> list[str]:
    """Every preset that is a complete experiment (files starting with '_' are shared bases)."""
    return sorted(n for n in _preset_files() if not n.startswith("_"))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_raw(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    files = _preset_files()
    if name not in files:
        raise ConfigError(
            f"unknown preset {name!r}{suggest(name, list_presets())}; run 'robustfeat presets' to list them"
        )
    if name in seen:
        raise ConfigError(f"preset {name!r} inherits from itself ({' -> '.join([*seen, name])})")
    try:
        raw = safe_load_unique(files[name].read_text()) or {}
    except ConfigError as e:
        raise ConfigError(f"preset {name!r}: {e}") from None
    return _inherit(raw, (*seen, name))


def _inherit(raw: dict[str, Any], seen: tuple[str, ...]) -> dict[str, Any]:
    """``raw`` on top of the preset its ``inherit:`` names (budgets merged too); ``raw`` without one."""
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"inherit={parent!r} is invalid: expected the name of a preset, e.g. inherit: _cifar10")
    base = _load_raw(parent, seen)
    budgets = _deep_merge(base.pop("budgets", {}) or {}, raw.pop("budgets", {}) or {})
    raw = _deep_merge(base, raw)
    raw["budgets"] = budgets
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives a key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML reports it itself
                    continue
                if first is not None:
                    where = f"line {line}" if first == line else f"lines {first} and {line}"
                    raise ConfigError(f"key {key!r} is given twice ({where}); keep one of them")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys with a ConfigError (the config files' reader)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: nothing is executed


def preset_budgets(name: str) -> list[str]:
    return ["paper", *sorted((_load_raw(name).get("budgets") or {}).keys())]


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=0.01' -> (['optim', 'lr'], 0.01); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, _, raw_value = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {text!r} is invalid: expected KEY=VALUE with KEY like optim.lr")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r} is invalid: the value is not valid YAML") from None
    if isinstance(value, str) and parts[-1] not in _TEXT_KEYS:  # allow fractions such as eps=8/255
        value = parse_fraction(value)
    return parts, value


_SCI_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_fraction(s: str) -> Any:
    """'8/255' -> 0.0313...; '1e-3' -> 0.001 (YAML 1.1 reads exponents without a dot as strings); any
    other string is returned as it is. The one parser of such values in the package."""
    if _SCI_RE.fullmatch(s.strip()):
        return float(s)
    num, slash, den = s.partition("/")
    if slash:
        try:
            value = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return s
        return value if math.isfinite(value) else s
    return s




def _set(d: dict, parts: list[str], value: Any, text: str) -> None:
    if len(parts) == 1:
        if parts[0] in SECTIONS:
            raise ConfigError(f"override {text!r} is invalid: {parts[0]!r} is a section; set {parts[0]}.KEY")
        d[parts[0]] = value
        return
    if len(parts) != 2:
        raise ConfigError(f"override {text!r} is invalid: keys have the form SECTION.KEY, e.g. optim.lr")
    section = d.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"override {text!r} is invalid: {parts[0]!r} is not a section")
    section[parts[1]] = value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = _deep_merge(d, {})
    for text in overrides:
        parts, value = parse_override(text)
        _set(out, parts, value, text)
    return out


def _fractions(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: v if k in _TEXT_KEYS else _fractions(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_fractions(v) for v in d]
    if isinstance(d, str):
        return parse_fraction(d)
    return d


def _check_load_args(preset: Any, budget: Any, overrides: Any, path: Any) -> list[str]:
    """The overrides as a list, after refusing arguments of the wrong type or that contradict each other."""
    if preset is not None and (not isinstance(preset, str) or not preset):
        raise ConfigError(f"preset={preset!r} is invalid: expected a preset name such as 'mnist-at'")
    if preset is not None and path is not None:
        raise ConfigError(f"both preset={preset!r} and a config file {str(path)!r} given: a run has one config; "
                          "pass one of them (changes go in overrides)")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"path={path!r} is invalid: expected the path of a YAML file")
    if not isinstance(budget, str):
        raise ConfigError(f"budget={budget!r} is invalid: expected a budget name such as 'cpu' or 'paper'")
    return as_overrides(overrides)


def as_overrides(overrides: Any) -> list[str]:
    """``overrides`` as a list of KEY=VALUE strings (None: none); a single string is refused, since it
    would be read character by character."""
    if overrides is None:
        return []
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(f"overrides={overrides!r} is a string: expected a list of KEY=VALUE strings, "
                          f"e.g. [{overrides!r}]")
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides={overrides!r} is invalid: expected a list of KEY=VALUE strings")
    return list(overrides)


def _read_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a config file holds; every problem is a ConfigError naming the file."""
    where = f"config file {str(path)!r}"
    try:
        text = Path(path).read_text()
        raw = safe_load_unique(text)
    except IsADirectoryError:
        raise ConfigError(f"{where} is a directory, not a YAML file (a run directory's config is "
                          "RUN_DIR/config.yaml)") from None
    except OSError as e:
        raise ConfigError(f"cannot read {where}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not a text (UTF-8) file") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        raise ConfigError(f"{where} is empty: expected a mapping of sections, e.g. 'optim: {{lr: 0.01}}' "
                          "(an empty file is not read as 'all defaults')")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping of sections, got {type(raw).__name__}")
    try:
        raw = _inherit(raw, ())
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    packaged = _preset_files().get(Path(path).stem)
    if "name" not in raw and packaged is not None and packaged.read_text() == text:
        raw["name"] = Path(path).stem  # a packaged preset's file, given as --config: that preset
    return raw


def check_intent(cfg: Config) -> None:
    """Refuse settings that are valid one by one but cannot be meant together (a one-line ConfigError).

    Checked for every new run (``load_config`` and ``train``), not for configs read back from a run
    directory, so that runs of older code stay readable.
    """
    o, r, d = cfg.optim, cfg.run, cfg.data
    late = [m for m in o.milestones if m >= o.steps]
    if late:
        raise ConfigError(
            f"optim.milestones={list(o.milestones)} is invalid with optim.steps={o.steps}: the learning rate would "
            f"never decay at {late[0]} (not before the last step); set milestones below {o.steps}, or "
            "optim.milestones=[] for a constant rate")
    if r.eval_size > d.val_size:
        raise ConfigError(
            f"run.eval_size={r.eval_size} is more than the data.val_size={d.val_size} validation images; lower "
            "run.eval_size, or set run.eval_size=0 to validate on the whole split")


def load_config(
    preset: str | None = None,
    budget: str = "paper",
    overrides: list[str] | None = None,
    path: str | Path | None = None,
) -> Config:
    """A preset (or a YAML file), one of its budgets, then command-line overrides, validated.

    Arguments of the wrong type, a preset together with a file, a file that is empty or gives a key
    twice, and settings that cannot be meant together (``check_intent``) are refused with a ConfigError.
    """
    return _load_config(preset, budget, overrides, path, intent=True)


def _load_config(preset: Any, budget: Any, overrides: Any, path: Any, *, intent: bool) -> Config:
    overrides = _check_load_args(preset, budget, overrides, path)
    if path is not None:
        raw = _read_yaml_file(path)
    else:
        raw = _load_raw(preset or "mnist-at")
        raw.setdefault("name", preset)
    budgets = raw.pop("budgets", {}) or {}
    if budget != "paper":
        if not isinstance(budgets, dict) or budget not in budgets:
            known = sorted(budgets) if isinstance(budgets, dict) else []
            raise ConfigError(
                f"unknown budget {budget!r} for {preset or path}{suggest(budget, known)}; "
                f"known: {', '.join(['paper', *known])}"
            )
        if not isinstance(budgets[budget], dict):
            raise ConfigError(f"budget {budget!r} of {preset or path} must be a mapping of sections")
        raw = _deep_merge(raw, budgets[budget])
    raw = _fractions(raw)
    raw = apply_overrides(raw, overrides)
    cfg = config_from_dict(raw)
    if intent:
        check_intent(cfg)
    return cfg


def read_config_file(path: str | Path) -> Config:
    """The config of a YAML file such as a run's ``config.yaml`` (not checked by ``check_intent``: a saved
    run's config is what it was trained with); every problem is a ConfigError that names the file."""
    try:
        return _load_config(None, "paper", None, path, intent=False)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if str(path) in msg else f"{path}: {msg}") from None
