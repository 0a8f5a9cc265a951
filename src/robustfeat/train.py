"""The training loop: one readable function, ``train(cfg, out_dir)``.

Per step: take the batch of this step, make its adversary with the training attack (eps warm-up
optional), compute the method's loss (eq. 7), update. Every ``run.eval_every`` steps: clean and PGD
accuracy on the validation split, ``last`` checkpoint, and ``best`` when the validation PGD accuracy
improved. All randomness after initialisation (data order, augmentation, attack starts) is a
function of (seed, step), so ``resume=True`` continues exactly where the last checkpoint stopped.

Run directory:
    config.yaml            the fully resolved config
    run.json               git revision, command, machine, torch version, times
    metrics.jsonl          one JSON object per line: {"kind": "train"|"eval", "step": ..., ...}
    checkpoints/last.safetensors, checkpoints/best.safetensors

With ``optim.ema`` > 0, an exponential moving average of the weights is kept beside them; it is what
validation measures and what ``best`` and ``last`` hold as their model (``last`` also keeps the
trained weights, to resume).

With ``run.rollback_drop`` > 0, a validation whose PGD accuracy falls that far below the best (both
from step ``run.rollback_after`` on) sends the run back to ``best`` (weights and optimizer state, which
``best`` then also stores) with its learning rate scaled by ``run.rollback_lr``; the scale is kept in
``last``, so a resumed run goes on with it. With ``run.restart_below`` > 0, a validation whose clean
accuracy is below it (a dead start: one class for every image) draws the weights afresh from a new
seed and clears the optimizer state.

With ``attack.carry``, each training image's attack starts where its attack of the previous epoch
ended (``CarriedStarts``); those perturbations are part of ``last``, so a resumed run goes on exactly.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import distributed
from .attacks import attack_from_config, start_noise
from .build import Splits, build_model, build_splits, resolve_device, training_autocast
from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_into,
    read_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from .config import Config
from .data import DeviceLoader
from .evaluate import accuracy
from .methods import METHODS, grad_align_penalty, method_loss
from .seeding import derived_seed

LAST = "checkpoints/last.safetensors"
BEST = "checkpoints/best.safetensors"


class TrainingError(Exception):
    """A run that cannot start or cannot go on (message is one line for the user)."""


# ---------------------------------------------------------------------------------------------------------
# small pieces


ATTACK_STREAM = 1
MAX_RESTARTS = 3  # re-initializations of a dead start (run.restart_below) before training gives up
EVAL_STREAM = 2


def learning_rate(cfg: Config, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    step: lr * gamma^(number of milestones passed). cyclic: a triangle over the run, evaluated at the end
    of the step (``step + 1``) so that the first update is not a zero step: rising linearly from 0 to lr
    at ``peak * steps``, falling linearly to 0 at ``steps``.
    """
    o = cfg.optim
    if o.schedule == "cyclic":
        t, top = (step + 1) / o.steps, o.peak
        return o.lr * (t / top if t <= top else max(0.0, (1.0 - t) / (1.0 - top)))
    passed = sum(1 for m in o.milestones if step >= m)
    return o.lr * o.gamma**passed


def attack_strength(cfg: Config, step: int) -> tuple[float, float]:
    """(eps, step_size) of the training attack at ``step``: ramped up from 0 during the warm-up, and
    from eps towards ``attack.eps_final`` over the end of the run; the step size keeps its ratio."""
    a = cfg.attack
    scale = 1.0
    if a.eps_warmup_examples > 0:
        scale = min(1.0, (step + 1) * cfg.optim.batch_size / a.eps_warmup_examples)
    if a.eps_final > 0:
        start = a.eps_final_from * cfg.optim.steps
        frac = min(1.0, max(0.0, (step + 1 - start) / (cfg.optim.steps - start)))
        scale *= 1.0 + (a.eps_final / a.eps - 1.0) * frac
    return a.eps * scale, a.step_size * scale


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    # Weight decay on conv and linear weights only (not BN, not biases), as in Madry et al.'s code.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    return torch.optim.Adam(groups, lr=cfg.optim.lr)


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        rev = out.stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class MetricsLog:
    """metrics.jsonl, appended line by line (each line flushed; a torn last line is dropped on resume)."""

    def __init__(self, path: Path, resume_step: int | None):
        """``resume_step``: keep the records up to that step (the resumed checkpoint's), drop the rest
        and any torn line; None: a new run, which starts the file afresh."""
        self.path = path
        if resume_step is not None and path.exists():
            keep = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= resume_step:
                    keep.append(line)
            atomic_write_text(path, "".join(k + "\n" for k in keep))
        self._f = open(path, "a" if resume_step is not None else "w")  # noqa: SIM115 - closed by close()

    def write(self, rec: dict[str, Any]) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _to_float(d: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    best_val_pgd: float
    last_val: dict[str, float]
    seconds: float


def evaluate_split(
    model: torch.nn.Module, cfg: Config, x_u8: torch.Tensor, y: torch.Tensor, device: torch.device
) -> dict[str, float]:
    """Clean and PGD accuracy (the config's eval attack) on uint8 images, deterministic."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derived_seed(cfg.run.seed, EVAL_STREAM))
    return accuracy(
        model, x_u8, y, cfg.eval_attack, device=device, batch_size=max(cfg.optim.batch_size, 200),
        generator=gen, channels_last=cfg.run.channels_last, progress=False,
    )


def prepare_run_dir(
    out_dir: Path, cfg: Config, resume: bool, command: list[str] | None, splits: Splits | None = None
) -> None:
    """Check the output location before any work and write config.yaml.

    Refused before any training step: a path that is not a directory, a directory that already holds
    a run (without ``resume``), a location that cannot be written, and (given ``splits``) one without
    room for the checkpoints. A directory this call created is removed again when it refuses.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"output path {str(out_dir)!r} exists and is not a directory")
    if not resume and (out_dir / LAST).exists():
        raise TrainingError(
            f"run directory {str(out_dir)!r} already holds a run; pass --resume to continue it "
            "or --out NEW_DIR for a new one"
        )
    if splits is not None:  # what would otherwise fail only after the directory exists
        if cfg.optim.batch_size > len(splits.y_train):
            raise TrainingError(
                f"optim.batch_size={cfg.optim.batch_size} is larger than the {len(splits.y_train)} training "
                "examples; lower optim.batch_size or raise data.train_size"
            )
        if cfg.run.tensorboard:
            _tensorboard_class()
    created = None  # the topmost directory this call creates
    for d in (out_dir, *out_dir.absolute().parents):
        if d.exists() or d.is_symlink():
            break
        created = d
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # temporary files of atomic writes that a killed process left behind
        for d in (out_dir, out_dir / "checkpoints"):
            remove_stale_temp_files(d)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
        if splits is not None:
            check_free_space(out_dir, checkpoint_bytes(cfg, splits))
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    except OSError as e:
        _remove_created(created)
        raise TrainingError(
            f"cannot write to the output directory {str(out_dir)!r}: {e.strerror or e}"
        ) from None
    except BaseException:
        _remove_created(created)
        raise


def _remove_created(d: Path | None) -> None:
    if d is not None:
        shutil.rmtree(d, ignore_errors=True)


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
        tensors = read_checkpoint(path)[0]
        got = {k: tensors.get(k) for k in ("carry.delta", "carry.seen")}
        if any(t is None or t.shape != ref.shape or t.dtype != ref.dtype
               for t, ref in zip(got.values(), (self.delta, self.seen))):
            raise CheckpointError(f"{str(path)!r} holds no carried attack starts of this training split "
                                  "(attack.carry); it was not written by this config")
        self.delta.copy_(got["carry.delta"])
        self.seen.copy_(got["carry.seen"])


def checkpoint_bytes(cfg: Config, splits: Splits) -> int:
    """Bytes of the ``last`` and ``best`` checkpoints of this run (the model is built on the meta
    device, so nothing is allocated)."""
    ds = splits.dataset
    with torch.device("meta"):
        model = build_model(cfg.model, ds.num_classes, ds.image_shape[0])
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_per_param = 2 if cfg.optim.name == "adam" else 1  # Adam: two moments; SGD: momentum
    resumable = model_bytes * (1 + state_per_param + (1 if cfg.optim.ema > 0 else 0))  # + train.* with EMA
    carried = 0
    if cfg.attack.carry:  # float16 perturbations and a bool per training image, in last only
        carried = len(splits.y_train) * (2 * int(torch.tensor(splits.x_train.shape[1:]).prod()) + 1)
    return resumable + carried + (resumable if cfg.run.rollback_drop > 0 else model_bytes)


def check_free_space(out_dir: Path, need_bytes: int) -> None:
    """Refuse to start when ``out_dir`` cannot hold ``need_bytes`` of checkpoints twice (the old and
    the new file exist together while one is replaced) plus a margin for metrics."""
    need = 2 * need_bytes + (16 << 20)
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError:  # pragma: no cover - file systems without statvfs
        return
    for f in (out_dir / LAST, out_dir / BEST):  # replaced files give their space back
        if f.is_file():
            free += f.stat().st_size
    if free < need:
        raise TrainingError(
            f"not enough free space in {str(out_dir)!r}: {free / 2**20:.0f} MiB free, the checkpoints of this "
            f"run need about {need / 2**20:.0f} MiB; free some space or pass --out on another disk"
        )


def _saved_config(out_dir: Path) -> Config:
    """The config.yaml of a run directory, with a one-line error if it is damaged."""
    from .config import ConfigError, read_config_file

    try:
        return read_config_file(out_dir / "config.yaml")
    except ConfigError as e:
        raise TrainingError(f"--resume: the run's config.yaml is damaged or invalid ({e})") from None


def _same_experiment(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Configs equal up to where the data lives (data.dir may differ between machines). Both are read
    back through the config classes first, so a config saved before a key existed compares with the
    key's default (which is, by rule, the behaviour from before the key existed)."""
    from .config import ConfigError, config_from_dict

    def norm(d: dict[str, Any]) -> dict[str, Any]:
        try:
            d = config_from_dict(d).to_dict()
        except ConfigError:
            pass  # an invalid saved config compares as it is (and so differs)
        return {**d, "data": {k: v for k, v in (d.get("data") or {}).items() if k != "dir"}}

    return norm(a) == norm(b)


def _history(run_json: Path) -> list[Any]:
    try:
        sessions = json.loads(run_json.read_text()).get("sessions", [])
    except (OSError, ValueError, AttributeError):  # missing or damaged: the history starts again
        return []
    return sessions if isinstance(sessions, list) else []


def train(
    cfg: Config,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    data_dir: str | None = None,
    progress: bool = True,
    splits: Splits | None = None,
    command: list[str] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``cfg`` into ``out_dir``. ``stop_after`` ends the process's work at that step (for tests
    of interruption); the run stays resumable."""
    t_start = time.time()
    if not isinstance(cfg, Config):
        from .config import ConfigError

        raise ConfigError(f"train() needs a Config (robustfeat.load_config(...)), got {type(cfg).__name__}")
    out_dir = Path(out_dir)
    if resume and (out_dir / "config.yaml").exists():
        saved = _saved_config(out_dir)
        if not _same_experiment(saved.to_dict(), cfg.to_dict()):
            raise TrainingError(
                f"--resume: the config differs from the one saved in {str(out_dir / 'config.yaml')!r}; "
                "resume without --preset/overrides, or start a new run with --out"
            )
    # [distributed] torchrun: join the process group (no-op in one process); see distributed.py
    dctx = distributed.setup(resolve_device(cfg.run.device))
    device = dctx.device
    dctx.check_batch(cfg.optim.batch_size)
    if cfg.attack.carry and dctx.active:
        raise TrainingError("attack.carry keeps every training image's perturbation in one process; it does "
                            "not support torchrun (run it in one process, or set attack.carry=false)")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if splits is None:
        splits = build_splits(cfg, data_dir)
    if dctx.main:
        prepare_run_dir(out_dir, cfg, resume, command, splits=splits)
    dctx.barrier()

    torch.manual_seed(derived_seed(cfg.run.seed, 0))
    ds = splits.dataset
    model = build_model(cfg.model, ds.num_classes, ds.image_shape[0]).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.run.sync_bn:
        model = distributed.convert_sync_batchnorm(model, dctx)
    dctx.broadcast_parameters(model)
    optimizer = make_optimizer(cfg, model)
    # beyond the paper: an exponential moving average of the weights and buffers (torch's own
    # AveragedModel); when on, it is the model validated and saved as model.* (see checkpoint.py)
    averaged = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema), use_buffers=True)
                if cfg.optim.ema > 0 else None)
    evaluated = model if averaged is None else averaged.module
    spec = METHODS.get(cfg.method.name)
    lam = cfg.lam

    start_step, best, best_step = 0, -1.0, -1  # best validation PGD accuracy so far and its step
    lr_scale, rollbacks = 1.0, 0  # changed only by the rollback guard (run.rollback_drop)
    restarts = 0  # changed only by the dead-start guard (run.restart_below)
    if resume and (out_dir / LAST).exists():
        meta = load_into(out_dir / LAST, model, optimizer, averaged=None if averaged is None else evaluated)
        if averaged is not None:
            averaged.n_averaged.fill_(max(meta["step"], 1))  # not 0: the next update averages, not copies
        if not _same_experiment(meta["config"], cfg.to_dict()):
            raise CheckpointError(
                f"{str(out_dir / LAST)!r} was written by another config than {str(out_dir / 'config.yaml')!r}; "
                "refusing to resume from it"
            )
        start_step = meta["step"]
        best = meta["extra"].get("best_val_pgd", -1.0)
        if isinstance(best, bool) or not isinstance(best, (int, float)) or not start_step <= cfg.optim.steps:
            raise CheckpointError(f"{str(out_dir / LAST)!r} has damaged metadata (step {start_step}, "
                                  f"best_val_pgd {best!r})")
        best = float(best)
        best_step = meta["extra"].get("best_step")
        if best_step is None:  # written before best_step was kept: best's own step
            best_step = read_checkpoint(out_dir / BEST)[1]["step"] if best >= 0 and (out_dir / BEST).exists() else -1
        if isinstance(best_step, bool) or not isinstance(best_step, int) or not -1 <= best_step <= start_step:
            raise CheckpointError(f"{str(out_dir / LAST)!r} has damaged metadata (best_step {best_step!r})")
        lr_scale, rollbacks = meta["extra"].get("lr_scale", 1.0), meta["extra"].get("rollbacks", 0)
        restarts = meta["extra"].get("restarts", 0)
        if (isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not 0 < lr_scale <= 1
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in (rollbacks, restarts))):
            raise CheckpointError(f"{str(out_dir / LAST)!r} has damaged metadata (lr_scale {lr_scale!r}, "
                                  f"rollbacks {rollbacks!r}, restarts {restarts!r})")
        lr_scale = float(lr_scale)
    loader = DeviceLoader(
        splits.x_train, splits.y_train, batch_size=cfg.optim.batch_size, device=device,
        augment=cfg.data.augment, seed=cfg.run.seed, channels_last=cfg.run.channels_last,
    )
    carry = None
    if cfg.attack.carry and spec.adversarial:
        carry = CarriedStarts(len(splits.y_train), tuple(splits.x_train.shape[1:]), device)
        if resume and (out_dir / LAST).exists():
            carry.load(out_dir / LAST)
    n_eval = len(splits.y_val) if cfg.run.eval_size == 0 else min(cfg.run.eval_size, len(splits.y_val))
    x_val, y_val = splits.x_val[:n_eval], splits.y_val[:n_eval]

    info = {
        "command": command or sys.argv,
        "git_revision": git_revision(),
        "machine": machine_info(device),
        "preset": cfg.name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    run_json = out_dir / "run.json"
    history = _history(run_json) if resume else []
    # wall seconds of the earlier sessions: records carry the run's total training time so far
    wall_before = sum(float(h.get("wall_seconds", 0.0)) for h in history if isinstance(h, dict))
    if dctx.main:
        atomic_write_text(run_json, json.dumps({**info, "sessions": history}, indent=2))

    # [distributed] files and progress on rank 0 only
    log = (MetricsLog(out_dir / "metrics.jsonl", start_step if resume else None) if dctx.main
           else distributed.Discard())
    tb = _tensorboard(out_dir) if cfg.run.tensorboard and dctx.main else None
    total = cfg.optim.steps
    end = total if stop_after is None else min(total, stop_after)
    gen = torch.Generator(device=device)
    last_val: dict[str, float] = {}

    def checkpoint(step: int, val: dict[str, float] | None) -> None:
        nonlocal best, best_step
        if not dctx.main:  # [distributed] the other ranks wait for rank 0's evaluation and checkpoint
            dctx.barrier()
            return
        improved = val is not None and val["pgd_acc"] > best
        if improved:
            best, best_step = val["pgd_acc"], step
        extra = {"best_val_pgd": best, "best_step": best_step, "val": val, "num_classes": ds.num_classes,
                 "in_channels": ds.image_shape[0], "classes": list(ds.classes),
                 "lr_scale": lr_scale, "rollbacks": rollbacks, "restarts": restarts}
        for m in (model,) if averaged is None else (model, evaluated):  # never save broken weights
            for name, t in m.state_dict().items():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise TrainingError(
                        f"non-finite weights ({name}) after step {step}; the last good checkpoint is "
                        f"{str(out_dir / LAST)!r} (lower optim.lr or check the data)"
                    )
        # best before last: a kill between the two writes resumes from the previous last checkpoint,
        # which redoes this evaluation and rewrites best, so best is never older than last says.
        train_model = model if averaged is not None else None
        if improved:  # with the rollback guard, best is also a state to go back to
            guarded = cfg.run.rollback_drop > 0
            save_checkpoint(out_dir / BEST, evaluated, optimizer if guarded else None, step=step,
                            config=cfg.to_dict(), extra=extra, train_model=train_model if guarded else None)
        save_checkpoint(out_dir / LAST, evaluated, optimizer, step=step, config=cfg.to_dict(), extra=extra,
                        train_model=train_model, state=None if carry is None else carry.tensors())
        dctx.barrier()

    def dropped(step: int, val: dict[str, float]) -> bool:
        """Rank 0's verdict of the rollback guard on this validation, on every rank. Only a best from
        rollback_after on is a state to go back to: an earlier one is still near chance (with a lower lr
        a seed can sit at 21% PGD accuracy at step 1,000 and 13% at step 4,000)."""
        drop, after = cfg.run.rollback_drop, cfg.run.rollback_after
        fire = (dctx.main and drop > 0 and step >= after and best_step >= after
                and val["pgd_acc"] < best - drop)
        return bool(dctx.broadcast_object(fire))

    def roll_back(step: int, val: dict[str, float]) -> dict[str, float]:
        """Go back to best's weights and optimizer state with a smaller lr; returns best's validation.
        Every rank reads best from the run directory, as resuming does (a shared file system)."""
        nonlocal lr_scale, rollbacks
        meta = load_into(out_dir / BEST, model, optimizer, averaged=None if averaged is None else evaluated)
        lr_scale *= cfg.run.rollback_lr
        rollbacks += 1
        log.write({"kind": "rollback", "step": step, "to_step": meta["step"], "val_pgd_acc": val["pgd_acc"],
                   "best_val_pgd": best, "lr_scale": lr_scale, "rollbacks": rollbacks,
                   "wall_s": round(wall_before + time.time() - t_start, 1)})
        if dctx.main and progress:
            tqdm.write(f"step {step}: validation PGD accuracy {val['pgd_acc']:.3f} is more than "
                       f"{cfg.run.rollback_drop:g} below the best {best:.3f}; back to step {meta['step']} "
                       f"with the learning rate x{lr_scale:g}")
        return meta["extra"].get("val") or val

    def dead(val: dict[str, float]) -> bool:
        """Rank 0's verdict of the dead-start guard on this validation, on every rank."""
        fire = dctx.main and val["clean_acc"] < cfg.run.restart_below
        return bool(dctx.broadcast_object(fire))

    def restart(step: int, val: dict[str, float]) -> None:
        """Draw the weights afresh (the seed's next initialization) and clear the optimizer state; the
        schedule and the data order go on from ``step``. The dead model is not a candidate for best."""
        nonlocal restarts
        if restarts >= MAX_RESTARTS:
            checkpoint(step, None)
            raise TrainingError(
                f"step {step}: validation clean accuracy {val['clean_acc']:.3f} is below run.restart_below="
                f"{cfg.run.restart_below:g} after {restarts} re-initializations; the network does not start "
                "learning (try a lower optim.lr, an eps warm-up (attack.eps_warmup_examples) or another "
                f"run.seed); the state is in {str(out_dir / LAST)!r}"
            )
        restarts += 1
        torch.manual_seed(derived_seed(cfg.run.seed, 0, restarts))
        # (SyncBatchNorm and channels_last keep BatchNorm's state-dict keys and the weights' layout)
        model.load_state_dict(build_model(cfg.model, ds.num_classes, ds.image_shape[0]).state_dict())
        dctx.broadcast_parameters(model)
        optimizer.state.clear()
        if carry is not None:  # the dead model's perturbations are no start for the new one
            carry.forget()
        if averaged is not None:  # the average starts again from the new weights
            evaluated.load_state_dict(model.state_dict())
            averaged.n_averaged.zero_()
        log.write({"kind": "restart", "step": step, "val_clean_acc": val["clean_acc"],
                   "val_pgd_acc": val["pgd_acc"], "restarts": restarts,
                   "wall_s": round(wall_before + time.time() - t_start, 1)})
        if dctx.main and progress:
            tqdm.write(f"step {step}: validation clean accuracy {val['clean_acc']:.3f} is below "
                       f"{cfg.run.restart_below:g} (a dead start); weights drawn afresh ({restarts} of at "
                       f"most {MAX_RESTARTS}), optimizer state cleared")
        checkpoint(step, None)

    bar = tqdm(total=total, initial=start_step, disable=not (progress and dctx.main), unit="step",
               dynamic_ncols=True, desc=f"train {cfg.name}")
    sums: dict[str, torch.Tensor] = {}
    n_sum, t_log = 0, time.time()
    try:
        for step in range(start_step, end):
            model.train()
            lr = learning_rate(cfg, step) * lr_scale
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = loader.batch(step)
            x_adv, noise, start = None, None, None
            eps, alpha = attack_strength(cfg, step)
            if spec.adversarial:
                gen.manual_seed(derived_seed(cfg.run.seed, ATTACK_STREAM, step))
                if dctx.active and cfg.attack.random_start:  # [distributed] the global batch's starts
                    noise = start_noise(x.shape, cfg.attack.restarts, generator=gen, device=device)
                    noise = dctx.shard(noise, dim=1)
                if carry is not None:  # the same draws the attack would make, for first visits
                    idx = loader.indices(step)
                    fresh = start_noise(x.shape, 1, generator=gen, device=device)[0]
                    start = carry.starts(idx, (2.0 * fresh - 1.0) * (eps * cfg.attack.start_scale), eps)
            batch_shape = x.shape
            x, y = dctx.shard(x), dctx.shard(y)  # [distributed] this rank's rows of the global batch
            if spec.adversarial:
                with training_autocast(cfg.run, device, attack=True):
                    x_adv = attack_from_config(model, x, y, cfg.attack, generator=gen, keep_best=False,
                                               eps=eps, step_size=alpha, noise=noise, start=start)
                if carry is not None:
                    carry.store(idx, x_adv - x)
            model.train()
            with training_autocast(cfg.run, device):
                loss, parts = method_loss(model, x, x_adv, y, lam)
                if cfg.method.grad_align > 0:  # beyond the paper: keeps single-step adversaries strong
                    eta = torch.empty(batch_shape, device=device).uniform_(-eps, eps, generator=gen)
                    ga = grad_align_penalty(model, x, y, dctx.shard(eta))  # [distributed] this rank's rows
                    parts["grad_align"] = ga.detach()
                    loss = loss + cfg.method.grad_align * ga
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # [distributed] gradients (and the loss) averaged over ranks; the loss itself in one process
            if not torch.isfinite(dctx.average_gradients(model.parameters(), loss)):
                raise TrainingError(
                    f"non-finite loss at step {step}: {_to_float(parts)}; the last good checkpoint is "
                    f"{str(out_dir / LAST)!r} (lower optim.lr or check the data)"
                )
            optimizer.step()
            if averaged is not None:
                averaged.update_parameters(model)

            for k, v in parts.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            n_sum += 1
            done = step + 1
            if done % cfg.run.log_every == 0 or done == total:
                now = time.time()
                sums = dctx.average(sums)  # [distributed] metrics of the global batch
                rec = {"kind": "train", "step": done, "examples": done * cfg.optim.batch_size,
                       "lr": lr, "eps": round(eps, 6),
                       **{k: round(float(v) / n_sum, 6) for k, v in sums.items()},
                       "examples_per_s": round(n_sum * cfg.optim.batch_size / max(now - t_log, 1e-9), 2),
                       "wall_s": round(wall_before + now - t_start, 1)}
                log.write(rec)
                if tb is not None:
                    for k, v in rec.items():
                        if isinstance(v, float):
                            tb.add_scalar(f"train/{k}", v, done)
                bar.set_postfix({k: rec[k] for k in ("loss", "ce", "reg", "adv_acc", "acc", "examples_per_s")
                                 if k in rec}, refresh=False)
                sums, n_sum, t_log = {}, 0, now
            bar.update(1)
            if done % cfg.run.eval_every == 0 or done == total:
                last_val = evaluate_split(evaluated, cfg, x_val, y_val, device) if dctx.main else {}
                if cfg.run.rollback_drop > 0 or cfg.run.restart_below > 0:  # [distributed] the guards
                    last_val = dctx.broadcast_object(last_val)  # act, and log, on rank 0's numbers everywhere
                log.write({"kind": "eval", "step": done, "split": "val", "n": len(y_val), **last_val,
                           "wall_s": round(wall_before + time.time() - t_start, 1)})
                if tb is not None:
                    for k, v in last_val.items():
                        tb.add_scalar(f"val/{k}", v, done)
                if dropped(done, last_val):  # before last is written, so a kill here redoes the rollback
                    checkpoint(done, roll_back(done, last_val))
                elif dead(last_val):  # likewise: a kill before the new last redoes the restart
                    restart(done, last_val)
                else:
                    checkpoint(done, last_val)
            elif cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0:
                checkpoint(done, None)
    except BaseException:
        dctx.close()
        raise
    finally:
        bar.close()
        log.close()
        if tb is not None:
            tb.close()
    if stop_after is not None and end < total and end % cfg.run.eval_every != 0:
        checkpoint(end, None)
    seconds = time.time() - t_start
    history.append({**info, "from_step": start_step, "to_step": end, "wall_seconds": round(seconds, 1)})
    if dctx.main:
        atomic_write_text(run_json, json.dumps({**info, "sessions": history}, indent=2))
    best, last_val = dctx.broadcast_object((best, last_val))  # [distributed] rank 0's results everywhere
    dctx.barrier()
    dctx.close()
    return TrainResult(out_dir, end, best, last_val, seconds)


def _tensorboard_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - optional dependency
        raise TrainingError(
            "run.tensorboard=true needs the tensorboard package: pip install 'robustfeat[tensorboard]'"
        ) from None
    return SummaryWriter


def _tensorboard(out_dir: Path):
    return _tensorboard_class()(str(out_dir / "tensorboard"))

