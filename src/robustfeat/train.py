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
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .attacks import attack_from_config
from .build import Splits, build_model, build_splits, resolve_device
from .checkpoint import atomic_write_text, load_into, save_checkpoint
from .config import Config, config_from_dict
from .data import DeviceLoader
from .evaluate import accuracy
from .methods import METHODS, method_loss

LAST = "checkpoints/last.safetensors"
BEST = "checkpoints/best.safetensors"


class TrainingError(Exception):
    """A run that cannot start or cannot go on (message is one line for the user)."""


# ---------------------------------------------------------------------------------------------------------
# small pieces


def derived_seed(seed: int, *tags: int) -> int:
    """A 63-bit seed from (seed, tags...), so every (purpose, step) gets its own independent stream."""
    h = seed & 0xFFFFFFFF
    for t in tags:
        h = (h * 0x9E3779B97F4A7C15 + (t & 0xFFFFFFFFFFFF) + 0x632BE59BD9B4E019) & 0x7FFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


ATTACK_STREAM = 1
EVAL_STREAM = 2


def learning_rate(cfg: Config, step: int) -> float:
    """Step schedule: lr * gamma^(number of milestones passed)."""
    passed = sum(1 for m in cfg.optim.milestones if step >= m)
    return cfg.optim.lr * cfg.optim.gamma**passed


def attack_strength(cfg: Config, step: int) -> tuple[float, float]:
    """(eps, step_size) of the training attack at ``step``, ramped linearly during the warm-up."""
    a = cfg.attack
    if a.eps_warmup_examples <= 0:
        return a.eps, a.step_size
    frac = min(1.0, (step + 1) * cfg.optim.batch_size / a.eps_warmup_examples)
    return a.eps * frac, a.step_size * frac


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
        self.path = path
        if resume_step is not None and path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    keep.append(line)
            atomic_write_text(path, "".join(k + "\n" for k in keep))
        self._f = open(path, "a")

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


def prepare_run_dir(out_dir: Path, cfg: Config, resume: bool, command: list[str] | None) -> None:
    """Check the output location before any work and write config.yaml (and run.json)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"output path {str(out_dir)!r} exists and is not a directory")
    if not resume and (out_dir / LAST).exists():
        raise TrainingError(
            f"run directory {str(out_dir)!r} already holds a run; pass --resume to continue it "
            "or --out NEW_DIR for a new one"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to the output directory {str(out_dir)!r}: {e.strerror}") from None
    atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())


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
    out_dir = Path(out_dir)
    if resume and (out_dir / "config.yaml").exists():
        import yaml

        saved = config_from_dict(yaml.safe_load((out_dir / "config.yaml").read_text()))
        if saved.to_dict() != cfg.to_dict():
            raise TrainingError(
                f"--resume: the config differs from the one saved in {str(out_dir / 'config.yaml')!r}; "
                "resume without --preset/overrides, or start a new run with --out"
            )
    device = resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if splits is None:
        splits = build_splits(cfg, data_dir)
    prepare_run_dir(out_dir, cfg, resume, command)

    torch.manual_seed(derived_seed(cfg.run.seed, 0))
    ds = splits.dataset
    model = build_model(cfg.model, ds.num_classes, ds.image_shape[0]).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    spec = METHODS.get(cfg.method.name)
    lam = cfg.lam

    start_step, best = 0, -1.0
    if resume and (out_dir / LAST).exists():
        meta = load_into(out_dir / LAST, model, optimizer)
        start_step = meta["step"]
        best = float(meta["extra"].get("best_val_pgd", -1.0))
    loader = DeviceLoader(
        splits.x_train, splits.y_train, batch_size=cfg.optim.batch_size, device=device,
        augment=cfg.data.augment, seed=cfg.run.seed, channels_last=cfg.run.channels_last,
    )
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
    history = json.loads(run_json.read_text()).get("sessions", []) if run_json.exists() else []
    atomic_write_text(run_json, json.dumps({**info, "sessions": history}, indent=2))

    log = MetricsLog(out_dir / "metrics.jsonl", start_step if resume else None)
    tb = _tensorboard(out_dir) if cfg.run.tensorboard else None
    total = cfg.optim.steps
    end = total if stop_after is None else min(total, stop_after)
    gen = torch.Generator(device=device)
    last_val: dict[str, float] = {}

    def checkpoint(step: int, val: dict[str, float] | None) -> None:
        nonlocal best
        improved = val is not None and val["pgd_acc"] > best
        if improved:
            best = val["pgd_acc"]
        extra = {"best_val_pgd": best, "val": val, "num_classes": ds.num_classes,
                 "in_channels": ds.image_shape[0], "classes": list(ds.classes)}
        save_checkpoint(out_dir / LAST, model, optimizer, step=step, config=cfg.to_dict(), extra=extra)
        if improved:
            save_checkpoint(out_dir / BEST, model, None, step=step, config=cfg.to_dict(), extra=extra)

    bar = tqdm(total=total, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True,
               desc=f"train {cfg.name}")
    sums: dict[str, torch.Tensor] = {}
    n_sum, t_log = 0, time.time()
    try:
        for step in range(start_step, end):
            model.train()
            for g in optimizer.param_groups:
                g["lr"] = learning_rate(cfg, step)
            x, y = loader.batch(step)
            x_adv = None
            eps, alpha = attack_strength(cfg, step)
            if spec.adversarial:
                gen.manual_seed(derived_seed(cfg.run.seed, ATTACK_STREAM, step))
                x_adv = attack_from_config(model, x, y, cfg.attack, generator=gen, keep_best=False,
                                           eps=eps, step_size=alpha)
            model.train()
            loss, parts = method_loss(model, x, x_adv, y, lam)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss at step {step}: {_to_float(parts)}; the last good checkpoint is "
                    f"{str(out_dir / LAST)!r} (lower optim.lr or check the data)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            for k, v in parts.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            n_sum += 1
            done = step + 1
            if done % cfg.run.log_every == 0 or done == total:
                now = time.time()
                rec = {"kind": "train", "step": done, "examples": done * cfg.optim.batch_size,
                       "lr": learning_rate(cfg, step), "eps": round(eps, 6),
                       **{k: round(float(v) / n_sum, 6) for k, v in sums.items()},
                       "examples_per_s": round(n_sum * cfg.optim.batch_size / max(now - t_log, 1e-9), 2)}
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
                last_val = evaluate_split(model, cfg, x_val, y_val, device)
                log.write({"kind": "eval", "step": done, "split": "val", "n": len(y_val), **last_val})
                if tb is not None:
                    for k, v in last_val.items():
                        tb.add_scalar(f"val/{k}", v, done)
                checkpoint(done, last_val)
            elif cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0:
                checkpoint(done, None)
    finally:
        bar.close()
        log.close()
        if tb is not None:
            tb.close()
    if stop_after is not None and end < total and end % cfg.run.eval_every != 0:
        checkpoint(end, None)
    seconds = time.time() - t_start
    history.append({**info, "from_step": start_step, "to_step": end, "wall_seconds": round(seconds, 1)})
    atomic_write_text(run_json, json.dumps({**info, "sessions": history}, indent=2))
    return TrainResult(out_dir, end, best, last_val, seconds)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # pragma: no cover - optional dependency
        raise TrainingError(
            "run.tensorboard=true needs the tensorboard package: pip install 'robustfeat[tensorboard]'"
        ) from e
    return SummaryWriter(str(out_dir / "tensorboard"))

