"""The training loop: ``train(cfg, out_dir)``.

Per step: take the batch of this step, make its adversary with the training attack, compute the
method's loss (eq. 7), update. Every ``run.eval_every`` steps: clean and PGD accuracy on the
validation split, the ``last`` checkpoint, and ``best`` when the validation PGD accuracy (clean accuracy
for natural training) improved.
All randomness after initialisation (data order, augmentation, attack starts) is a function of
(seed, step), so ``resume=True`` continues exactly where the last checkpoint stopped.

Everything beyond that (eps schedules, weight average, carried starts, GradAlign, the rollback and
dead-start guards, your own regularizers and guards) is an extension: see ``extensions``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed
from ..attacks import accuracy, attack_from_config, start_noise
from ..build import (
    Splits,
    build_model,
    build_splits,
    check_model_fits,
    deterministic_kernels,
    precision_warning,
    resolve_device,
    training_autocast,
)
from ..checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from ..compiled import StepFunctions
from ..config import Config, ConfigError, check_intent
from ..data import DeviceLoader
from ..methods import METHODS, method_loss
from ..progress import progress_bar
from ..seeding import derived_seed
from . import extensions as ext_mod
from .errors import TrainingError
from .extensions import Batch, Extension, Run, Verdict, watches_validation
from .interrupt import Interrupted, StopSignals, signal_name
from .rundir import (
    BEST,
    LAST,
    MetricsLog,
    RunJson,
    check_new_run_dir,
    check_splits,
    experiment_differences,
    prepare_run_dir,
    resume_plan,
    same_experiment,
    tensorboard_writer,
)
from .schedule import attack_strength, learning_rate, make_optimizer
from .state import TrainState

ATTACK_STREAM = 1
EVAL_STREAM = 2


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    best_val: float
    """The best validation value of ``best_metric`` ('pgd_acc', or 'clean_acc' for natural training)."""
    last_val: dict[str, float]
    seconds: float
    note: str = ""
    """Set when nothing was trained: why (e.g. the resumed run had already finished)."""
    best_metric: str = "pgd_acc"


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
    extensions: Sequence[Extension] = (),
) -> TrainResult:
    """Train ``cfg`` into ``out_dir``. ``stop_after`` ends the process's work at that step (for tests
    of interruption); the run stays resumable. ``extensions`` run after the config's own (see
    ``robustfeat.train.extensions``).

    Everything is checked before anything is written (``start``). SIGINT and SIGTERM stop the run at
    the end of the step in progress with ``last`` saved there and the session recorded in run.json,
    then raise ``Interrupted`` (a KeyboardInterrupt); see ``robustfeat.train.interrupt``.
    """
    t_start = time.time()
    out = _out_path(out_dir)
    deterministic = cfg.run.deterministic if isinstance(cfg, Config) else False
    with deterministic_kernels(deterministic), StopSignals() as stop:
        try:
            run, run_json = start(cfg, out, resume=resume, data_dir=data_dir, progress=progress, splits=splits,
                                  command=command, extensions=extensions, t_start=t_start)
        except Interrupted as e:
            again = " (continue it with --resume)" if (out / LAST).is_file() else ""
            raise Interrupted(f"{e} during start-up, before the first step of this session: nothing was "
                              f"trained{again}", e.signum) from None
        if run_json is None:  # a resumed run that had already finished: nothing to do, nothing written
            state = run.state
            return TrainResult(out, state.step, state.best, run.last_val, 0.0,
                               note=f"the run had already finished at step {state.step:,}; nothing to do",
                               best_metric=state.metric)
        stop.defer()
        return _run_loop(run, run_json, stop, stop_after, t_start)


def _out_path(out_dir) -> Path:
    if isinstance(out_dir, bool) or not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        raise ConfigError(f"out_dir={out_dir!r} is invalid: expected the path of a run directory")
    return Path(out_dir)


def _run_loop(run: Run, run_json: RunJson, stop: StopSignals, stop_after: int | None,
              t_start: float) -> TrainResult:
    """The steps of this session; the session's record in run.json however it ends."""
    cfg, state, dctx = run.cfg, run.state, run.dctx
    start_step, total = state.step, cfg.optim.steps
    end = total if stop_after is None else min(total, stop_after)
    run.saved_step = start_step  # the step ``last`` holds
    tb = tensorboard_writer(run.out_dir) if cfg.run.tensorboard and dctx.main else None
    bar = progress_bar(total=total, initial=start_step, disable=not (run.progress and dctx.main), unit="step",
                       dynamic_ncols=True, desc=f"train {cfg.name}")
    meter = Meter(run, tb, bar)
    try:
        end = _steps(run, meter, tb, start_step, end, stop)
    except BaseException as e:
        dctx.close()
        _record_failure(run, run_json, start_step, t_start, e)
        if isinstance(e, Interrupted):  # a second signal: stopped within a step
            kept = (f"{str(run.out_dir / LAST)!r} holds step {run.saved_step:,}; continue with robustfeat train "
                    f"--resume {run.out_dir}") if run.saved_step else "no checkpoint was written yet"
            raise Interrupted(f"stopped at once by a second {signal_name(e.signum)}: the steps after the last "
                              f"checkpoint are lost; {kept}", e.signum) from None
        raise
    finally:
        bar.close()
        run.log.close()
        if tb is not None:
            tb.close()
    if run.saved_step != end:  # stopped between checkpoints (stop_after, a signal): save where it stopped
        save(run, end, None)
    seconds = time.time() - t_start
    ended = ("finished" if end == total else
             f"interrupted ({signal_name(stop.signum)})" if stop.requested else "stopped")
    run_json.finish(start_step, end, seconds, ended)
    best, last_val = dctx.broadcast_object((state.best, run.last_val))  # [distributed] rank 0's results
    dctx.barrier()
    dctx.close()
    if stop.requested and end < total:
        raise Interrupted(f"stopped by {signal_name(stop.signum)} after step {end:,} of {total:,}: "
                          f"{str(run.out_dir / LAST)!r} holds it; continue with robustfeat train --resume "
                          f"{run.out_dir}", stop.signum)
    return TrainResult(run.out_dir, end, best, last_val, seconds, best_metric=state.metric)


def _steps(run: Run, meter: Meter, tb, start_step: int, end: int, stop: StopSignals) -> int:
    """Train from ``start_step`` up to ``end``; the step actually reached (earlier when a guard ends
    the run or a signal asks to stop, at the end of the step in progress)."""
    cfg, state, dctx = run.cfg, run.state, run.dctx
    spec, lam, exts, device = METHODS.get(cfg.method.name), cfg.lam, run.extensions, run.device
    optimizer, model, total = run.optimizer, run.model, cfg.optim.steps
    gen = torch.Generator(device=device)
    for step in range(start_step, end):
        # batch: this step's images (a pure function of seed and step), learning rate and eps
        model.train()
        if run.step_fns is not None:  # run.compile
            run.step_fns.begin_step()
        lr = set_learning_rate(optimizer, learning_rate(cfg, step) * state.lr_scale)
        x, y = run.loader.batch(step)
        batch = Batch(step, x.shape, *attack_strength(cfg, step, exts), gen)
        # adversary: the training attack on this process's rows, from the extensions' starts if any
        make_adversary(run, batch, x, y, spec.adversarial)
        # loss: the method's (eq. 7) plus the extensions' terms
        model.train()
        with training_autocast(cfg.run, device):
            loss, parts = total_loss(run, batch, lam)
        # update: gradients (and the loss) averaged over processes; a non-finite loss stops the run
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(dctx.average_gradients(model.parameters(), loss)):
            raise TrainingError(
                f"non-finite loss at step {step}: {_to_float(parts)}; the last good checkpoint is "
                f"{str(run.out_dir / LAST)!r} (lower optim.lr or check the data)"
            )
        optimizer.step()
        for ext in exts:
            ext.after_update(run, batch)
        # log: means of the loss parts every run.log_every steps
        done = step + 1
        meter.add(parts)
        if done % cfg.run.log_every == 0 or done == total:
            meter.write(done, lr, batch.eps)
        meter.bar.update(1)
        # validate and checkpoint: the extensions' guards may roll back, restart or stop the run
        if done % cfg.run.eval_every == 0 or done == total:
            verdict = validate(run, done, tb)
            save(run, done, run.last_val if verdict is None else verdict.val)
            if ends_run(verdict):
                return done
        elif cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0:
            save(run, done, None)
        if dctx.any(stop.requested):  # [distributed] every rank stops after the same step
            return done
    return end


def _record_failure(run: Run, run_json: RunJson, start_step: int, t_start: float, e: BaseException) -> None:
    """Record a session that ended with an error or a second signal in run.json (its time counts): it
    kept what ``last`` holds. Never masks the error itself."""
    ended = (f"interrupted ({signal_name(e.signum)})" if isinstance(e, Interrupted)
             else "interrupted" if isinstance(e, KeyboardInterrupt) else f"error ({type(e).__name__})")
    with contextlib.suppress(Exception):  # e.g. the full disk that failed the run: its own error matters
        run_json.finish(start_step, run.saved_step, time.time() - t_start, ended)


# ---------------------------------------------------------------------------------------------------------
# the pieces of a step


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def make_adversary(run: Run, batch: Batch, x: torch.Tensor, y: torch.Tensor, adversarial: bool) -> None:
    """Set the batch's rows of this process (``batch.x``, ``batch.y``) and, for an adversarial method,
    their training adversary (``batch.x_adv``)."""
    cfg, dctx = run.cfg, run.dctx
    noise = start = None
    if adversarial:
        batch.generator.manual_seed(derived_seed(cfg.run.seed, ATTACK_STREAM, batch.step))
        if dctx.active and cfg.attack.random_start:  # [distributed] the global batch's draws, this rank's rows
            noise = dctx.shard(start_noise(batch.shape, cfg.attack.restarts, generator=batch.generator,
                                           device=run.device), dim=1)
        for ext in run.extensions:
            start = ext.attack_start(run, batch)
            if start is not None:
                break
    batch.x, batch.y = dctx.shard(x), dctx.shard(y)
    if not adversarial:
        return
    kw = {"generator": batch.generator, "eps": batch.eps, "step_size": batch.step_size, "noise": noise,
          "start": start}
    with training_autocast(cfg.run, run.device, attack=True):
        if run.step_fns is not None:  # run.compile
            batch.x_adv = run.step_fns.adversary(run.model, batch.x, batch.y, cfg.attack, **kw)
        else:
            batch.x_adv = attack_from_config(run.model, batch.x, batch.y, cfg.attack, keep_best=False, **kw)
    for ext in run.extensions:
        ext.after_attack(run, batch)


def total_loss(run: Run, batch: Batch, lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The method's loss plus every extension's term; the parts to log."""
    loss_fn = method_loss if run.step_fns is None else run.step_fns.loss  # run.compile
    loss, parts = loss_fn(run.model, batch.x, batch.x_adv, batch.y, lam)
    for ext in run.extensions:
        extra = ext.extra_loss(run, batch)
        if extra is not None:
            term, logged = extra
            loss = loss + term
            parts.update(logged)
    return loss, parts


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


def validate(run: Run, step: int, tb) -> Verdict | None:
    """Validate (rank 0), log the result, and ask the extensions' guards; their verdict, if any."""
    cfg, dctx = run.cfg, run.dctx
    x_val, y_val = run.splits.x_val, run.splits.y_val
    n_eval = len(y_val) if cfg.run.eval_size == 0 else min(cfg.run.eval_size, len(y_val))
    val = evaluate_split(run.evaluated, cfg, x_val[:n_eval], y_val[:n_eval], run.device) if dctx.main else {}
    if any(watches_validation(e) for e in run.extensions):  # [distributed] guards act, and log, on
        val = dctx.broadcast_object(val)  # rank 0's numbers everywhere
    run.last_val = val
    run.log.write({"kind": "eval", "step": step, "split": "val", "n": n_eval, **val, "wall_s": run.wall_s()})
    if tb is not None:
        for k, v in val.items():
            tb.add_scalar(f"val/{k}", v, step)
    # before last is written, so a kill here redoes what a guard did
    for ext in run.extensions:
        verdict = ext.on_validation_end(run, step, val)
        if verdict is not None:
            return verdict
    return None


def ends_run(verdict: Verdict | None) -> bool:
    """Whether a guard's verdict ends the run (with a TrainingError when it says so)."""
    if verdict is not None and verdict.error:
        raise TrainingError(verdict.error)
    return verdict is not None and verdict.stop


def save(run: Run, step: int, val: dict[str, float] | None) -> None:
    """Checkpoint ``last`` (and ``best`` when ``val`` is a new best) at ``step``; rank 0 writes, the
    other ranks wait for it."""
    if not run.dctx.main:
        run.dctx.barrier()
        run.saved_step = step
        return
    cfg, state, model, evaluated = run.cfg, run.state, run.model, run.evaluated
    improved = state.record(step, val, final_step=cfg.optim.steps if cfg.run.select == "final" else None)
    extra = state.extra(val, run.splits.dataset)
    for m in (model,) if evaluated is model else (model, evaluated):  # never save broken weights
        for name, t in m.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise TrainingError(
                    f"non-finite weights ({name}) after step {step}; the last good checkpoint is "
                    f"{str(run.out_dir / LAST)!r} (lower optim.lr or check the data)"
                )
    # best before last: a kill between the two writes resumes from the previous last checkpoint,
    # which redoes this evaluation and rewrites best, so best is never older than last says.
    train_model = model if evaluated is not model else None
    if improved:  # a resumable best (the rollback guard's) also holds what training needs
        full = any(e.resumable_best for e in run.extensions)
        save_checkpoint(run.out_dir / BEST, evaluated, run.optimizer if full else None, step=step,
                        config=cfg.to_dict(), extra=extra, train_model=train_model if full else None)
    tensors = {k: t for e in run.extensions for k, t in e.checkpoint_tensors().items()}
    save_checkpoint(run.out_dir / LAST, evaluated, run.optimizer, step=step, config=cfg.to_dict(), extra=extra,
                    train_model=train_model, state=tensors or None)
    run.saved_step = step
    run.dctx.barrier()


class Meter:
    """Running sums of the loss parts between two ``train`` records of metrics.jsonl."""

    def __init__(self, run: Run, tb, bar):
        self.run, self.tb, self.bar = run, tb, bar
        self.sums: dict[str, torch.Tensor] = {}
        self.n, self.t_log = 0, time.time()

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.n += 1

    def write(self, done: int, lr: float, eps: float) -> None:
        now, bs = time.time(), self.run.cfg.optim.batch_size
        sums = self.run.dctx.average(self.sums)  # [distributed] metrics of the global batch
        rec = {"kind": "train", "step": done, "examples": done * bs, "lr": lr, "eps": round(eps, 6),
               **{k: round(float(v) / self.n, 6) for k, v in sums.items()},
               "examples_per_s": round(self.n * bs / max(now - self.t_log, 1e-9), 2),
               "wall_s": round(self.run.wall_before + now - self.run.t_start, 1)}
        self.run.log.write(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"train/{k}", v, done)
        self.bar.set_postfix({k: rec[k] for k in ("loss", "ce", "reg", "adv_acc", "acc", "examples_per_s")
                              if k in rec}, refresh=False)
        self.sums, self.n, self.t_log = {}, 0, now


def _to_float(d: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------------------
# set-up


def check_start(cfg: Config, out_dir: Path, resume: bool) -> dict | None:
    """The checks of a session that need neither data nor model, before anything is written: the
    config (``check_intent`` for a new run; a resumed run keeps the config it was trained with) and
    the run directory (``check_new_run_dir``, or ``resume_plan``). Returns ``last``'s metadata when
    the session continues from it."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"train() needs a Config (robustfeat.load_config(...)), got {type(cfg).__name__}")
    if not resume:
        check_intent(cfg)
        check_new_run_dir(out_dir)
        return None
    meta = resume_plan(out_dir, cfg)
    if meta is None and not (out_dir / "config.yaml").exists():  # nothing saved: the config is the caller's
        check_intent(cfg)
    if meta is not None and not same_experiment(meta["config"], cfg.to_dict()):
        raise CheckpointError(
            f"{str(out_dir / LAST)!r} was written by another config than {str(out_dir / 'config.yaml')!r} "
            f"({experiment_differences(meta['config'], cfg.to_dict())}); refusing to resume from it"
        )
    return meta


def start(cfg: Config, out_dir: Path, *, resume: bool, data_dir: str | None, progress: bool,
          splits: Splits | None, command: list[str] | None, extensions: Sequence[Extension],
          t_start: float) -> tuple[Run, RunJson | None]:
    """Everything before the first step. What can be checked is checked before anything is written
    (``check_start``, the data and the model's fit with it, and on resume all of ``last``, loaded into
    the model); then the run directory is prepared. Returns ``(run, None)`` without writing anything
    when the resumed run had already finished."""
    last_meta = check_start(cfg, out_dir, resume)
    # [distributed] torchrun: join the process group (no-op in one process); see distributed.py
    dctx = distributed.setup(resolve_device(cfg.run.device))
    dctx.check_batch(cfg.optim.batch_size)
    exts = [*ext_mod.from_config(cfg, distributed=dctx.active), *extensions]
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if splits is None:
        splits = build_splits(cfg, data_dir)
    ds, device = splits.dataset, dctx.device
    check_splits(cfg, splits)

    # model and optimizer: the seed's first initialization, the same on every rank
    torch.manual_seed(derived_seed(cfg.run.seed, 0))
    model = build_model(cfg.model, ds.num_classes, ds.image_shape[0]).to(device)
    check_model_fits(model, cfg.model, ds.image_shape,
                     f"data.name={cfg.data.name!r}" + (f" ({cfg.data.path})" if cfg.data.path else ""))
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.run.sync_bn:
        model = distributed.convert_sync_batchnorm(model, dctx)
    dctx.broadcast_parameters(model)
    loader = DeviceLoader(
        splits.x_train, splits.y_train, batch_size=cfg.optim.batch_size, device=device,
        augment=cfg.data.augment, seed=cfg.run.seed, channels_last=cfg.run.channels_last,
    )
    run = Run(cfg=cfg, out_dir=out_dir, dctx=dctx, model=model, optimizer=make_optimizer(cfg, model),
              splits=splits, loader=loader, state=TrainState(metric=METHODS.get(cfg.method.name).selection_metric), log=None, extensions=exts, progress=progress,
              t_start=t_start, step_fns=StepFunctions(cfg.run) if cfg.run.compile else None)
    for ext in exts:
        ext.setup(run)
    if last_meta is not None:
        resume_from_last(run)
        if run.state.step >= cfg.optim.steps:
            run.last_val = last_meta["extra"].get("val") or {}
            dctx.close()
            return run, None
    if dctx.main:
        if (warning := precision_warning(cfg.run, device)) is not None:
            print(f"robustfeat train: warning: {warning}", file=sys.stderr, flush=True)
        prepare_run_dir(out_dir, cfg, resume, command, splits=splits, extensions=exts)
    dctx.barrier()
    run_json = RunJson(out_dir, cfg, device, command, resume, write=dctx.main)
    run.wall_before = run_json.wall_before
    # [distributed] files and progress on rank 0 only
    run.log = (MetricsLog(out_dir / "metrics.jsonl", run.state.step if resume else None) if dctx.main
               else distributed.Discard())
    return run, run_json


def resume_from_last(run: Run) -> None:
    """Load ``last`` into the run: weights, optimizer state, training state, extensions' tensors."""
    path = run.out_dir / LAST
    meta = run.load(path)
    if not same_experiment(meta["config"], run.cfg.to_dict()):
        raise CheckpointError(
            f"{str(path)!r} was written by another config than {str(run.out_dir / 'config.yaml')!r}; "
            "refusing to resume from it"
        )
    run.state = TrainState.from_checkpoint(path, meta, run.cfg.optim.steps, run.out_dir / BEST, run.state.metric)
    loading = [e for e in run.extensions if type(e).load_tensors is not Extension.load_tensors]
    tensors = read_checkpoint(path)[0] if loading else {}
    for ext in loading:
        ext.load_tensors(run, tensors, path)
