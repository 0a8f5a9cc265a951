"""The run directory: its layout, its preparation, and the files written beside the checkpoints.

    config.yaml            the fully resolved config
    run.json               git revision, command, machine, torch version, and one entry per session
    metrics.jsonl          one JSON object per line: {"kind": "train"|"eval"|..., "step": ..., ...}
    checkpoints/last.safetensors, checkpoints/best.safetensors
    tensorboard/           with run.tensorboard=true

See docs/run-directory.md for what each file holds; ``robustfeat.checkpoint`` for the checkpoint format.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..build import Splits, build_model
from ..checkpoint import CheckpointError, atomic_write_text, read_checkpoint, remove_stale_temp_files
from ..config import Config, ConfigError, config_from_dict, read_config_file
from .errors import TrainingError

LAST = "checkpoints/last.safetensors"
BEST = "checkpoints/best.safetensors"


# ---------------------------------------------------------------------------------------------------------
# preparation


RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", LAST, BEST)
"""The files training writes; a directory holding any of them holds a run."""


def check_layout(out_dir: Path) -> None:
    """Refuse a run directory whose files or folders are of the wrong kind (e.g. ``checkpoints`` a file),
    which training would only discover when it first writes there."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"output path {str(out_dir)!r} exists and is not a directory")
    ckpt = out_dir / "checkpoints"
    if (ckpt.exists() or ckpt.is_symlink()) and not ckpt.is_dir():
        raise TrainingError(f"{str(ckpt)!r} is not a directory: a run keeps its checkpoints there; move it away "
                            "or pass --out NEW_DIR")
    for name in RUN_FILES:
        f = out_dir / name
        if (f.exists() or f.is_symlink()) and not f.is_file():
            raise TrainingError(f"{str(f)!r} is not a file (it is where training writes {name}); move it away "
                                "or pass --out NEW_DIR")


def prepare_run_dir(
    out_dir: Path, cfg: Config, resume: bool, command: list[str] | None, splits: Splits | None = None,
    extensions: Sequence[Any] = (),
) -> None:
    """Check the output location before any work and write config.yaml.

    Refused before any training step: a path that is not a directory, a directory that already holds
    a run (without ``resume``), a location that cannot be written, and (given ``splits``) one without
    room for the checkpoints (of the run with ``extensions``). A directory this call created is removed
    again when it refuses. On ``resume`` config.yaml is rewritten only when its text differs (another
    ``data.dir``, or a config saved before a key existed).
    """
    if not resume:
        check_new_run_dir(out_dir)
    check_layout(out_dir)
    if splits is not None:  # what would otherwise fail only after the directory exists
        check_splits(cfg, splits)
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
            check_free_space(out_dir, checkpoint_bytes(cfg, splits, extensions))
        text, cfg_file = cfg.to_yaml(), out_dir / "config.yaml"
        if not (cfg_file.is_file() and cfg_file.read_text(errors="replace") == text):
            atomic_write_text(cfg_file, text)
    except OSError as e:
        _remove_created(created)
        raise TrainingError(
            f"cannot write to the output directory {str(out_dir)!r}: {e.strerror or e}"
        ) from None
    except BaseException:
        _remove_created(created)
        raise


def check_splits(cfg: Config, splits: Splits) -> None:
    """What the data and the installed packages must allow before a run starts: a batch no larger than
    the training split, and tensorboard when the config asks for it."""
    if cfg.optim.batch_size > len(splits.y_train):
        raise TrainingError(
            f"optim.batch_size={cfg.optim.batch_size} is larger than the {len(splits.y_train)} training "
            "examples; lower optim.batch_size or raise data.train_size"
        )
    if cfg.run.tensorboard:
        tensorboard_class()


def check_new_run_dir(out_dir: Path) -> None:
    """Refuse to start a new run where one already is (nothing of it may be overwritten)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"output path {str(out_dir)!r} exists and is not a directory")
    for parent in out_dir.absolute().parents:  # e.g. --out RUN/checkpoints: a run inside a run
        if (parent / "config.yaml").is_file() and any((parent / n).exists() for n in RUN_FILES[1:]):
            raise TrainingError(f"output path {str(out_dir)!r} is inside the run directory {str(parent)!r}; "
                                "pass --out NEW_DIR outside it")
    present = [n for n in RUN_FILES if (out_dir / n).exists()]
    if not present:
        return
    how = ("pass --resume to continue it" if (out_dir / LAST).is_file() else
           f"it cannot be resumed ({LAST} is missing); delete it yourself to train again there")
    raise TrainingError(f"run directory {str(out_dir)!r} already holds a run ({', '.join(present)}); {how}, "
                        "or pass --out NEW_DIR for a new one")


def _remove_created(d: Path | None) -> None:
    if d is not None:
        shutil.rmtree(d, ignore_errors=True)


def checkpoint_bytes(cfg: Config, splits: Splits, extensions: Sequence[Any] = ()) -> int:
    """Bytes of the ``last`` and ``best`` checkpoints of this run (the model is built on the meta
    device, so nothing is allocated). ``extensions`` add their own tensors (``Extension.state_bytes``,
    ``Extension.resumable_bytes``) and may make ``best`` resumable (``Extension.resumable_best``)."""
    ds = splits.dataset
    with torch.device("meta"):
        model = build_model(cfg.model, ds.num_classes, ds.image_shape[0])
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_per_param = 2 if cfg.optim.name == "adam" else 1  # Adam: two moments; SGD: momentum
    resumable = model_bytes * (1 + state_per_param) + sum(e.resumable_bytes(model_bytes) for e in extensions)
    last = resumable + sum(e.state_bytes(splits) for e in extensions)
    return last + (resumable if any(e.resumable_best for e in extensions) else model_bytes)


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


# ---------------------------------------------------------------------------------------------------------
# resuming: is the saved run the same experiment?


def saved_config(out_dir: Path) -> Config:
    """The config.yaml of a run directory, with a one-line error if it is damaged."""
    try:
        return read_config_file(out_dir / "config.yaml")
    except ConfigError as e:
        raise TrainingError(f"--resume: the run's config.yaml is damaged or invalid ({e})") from None


def _experiment(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict as the comparison of experiments sees it: read back through the config classes
    (a config saved before a key existed takes the key's default, by rule the behaviour from before the
    key existed), without data.dir."""
    try:
        d = config_from_dict(d).to_dict()
    except ConfigError:
        pass  # an invalid saved config compares as it is (and so differs)
    return {**d, "data": {k: v for k, v in (d.get("data") or {}).items() if k != "dir"}}


def same_experiment(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Configs equal up to where the data lives (data.dir may differ between machines)."""
    return _experiment(a) == _experiment(b)


NAMING_KEYS = (("run", "select"),)
"""Keys that decide which checkpoint is named ``best``, never what any checkpoint holds."""


def same_training(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Configs that train the same weights step by step: ``same_experiment`` up to ``NAMING_KEYS``
    (a checkpoint written before ``run.select`` existed belongs to its run after the run adopts it)."""
    a, b = _experiment(a), _experiment(b)
    for sec, key in NAMING_KEYS:
        for d in (a, b):
            if isinstance(d.get(sec), dict):
                d[sec] = {k: v for k, v in d[sec].items() if k != key}
    return a == b


def experiment_differences(a: dict[str, Any], b: dict[str, Any], limit: int = 3) -> str:
    """The first keys where two configs differ as experiments, e.g. "method.name 'at' / 'at-reg'"."""
    a, b = _experiment(a), _experiment(b)
    out = []
    for sec in sorted(set(a) | set(b), key=str):
        x, y = a.get(sec), b.get(sec)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{sec}.{k} {x.get(k)!r} / {y.get(k)!r}" for k in sorted(set(x) | set(y), key=str)
                    if x.get(k) != y.get(k)]
        elif x != y:
            out.append(f"{sec} {x!r} / {y!r}")
    return ", ".join(out[:limit]) + (", ..." if len(out) > limit else "")


def first_checkpoint_step(cfg: Config) -> int:
    """The first step at which training writes ``last``."""
    every = [cfg.run.eval_every, cfg.optim.steps] + ([cfg.run.checkpoint_every] if cfg.run.checkpoint_every else [])
    return min(every)


def metrics_records(out_dir: Path) -> list[dict[str, Any]]:
    """The readable records of metrics.jsonl that have an integer step (torn or damaged lines skipped)."""
    try:
        lines = (out_dir / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
            out.append(rec)
    return out


def recorded_sessions(out_dir: Path) -> list[dict[str, Any]]:
    """The sessions run.json records (empty when it is missing or unreadable)."""
    return [h for h in _history(out_dir / "run.json") if isinstance(h, dict)]


def finished_step(out_dir: Path, steps: int) -> int | None:
    """``steps`` when the run's own records say it trained all of them, else None.

    The records are the sessions of run.json (a session that ended at the last step; written after the
    final checkpoint) and, for a run.json without sessions, the final validation in metrics.jsonl
    (written at the last step only). Neither needs a checkpoint, so a published run that keeps only
    ``best`` (or no weights at all) is still known to be finished.
    """
    sessions = recorded_sessions(out_dir)
    if any(_step_of(h.get("to_step")) >= steps and h.get("ended", "finished") == "finished" for h in sessions):
        return steps
    if not sessions and any(r.get("kind") == "eval" and r["step"] == steps for r in metrics_records(out_dir)):
        return steps
    return None


def _step_of(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else -1


def recorded_step(out_dir: Path) -> int:
    """The furthest step any file of the run records (0 when none does): ``best``'s step, the sessions of
    run.json, the validations of metrics.jsonl."""
    steps = [0, *(_step_of(h.get("to_step")) for h in recorded_sessions(out_dir)),
             *(r["step"] for r in metrics_records(out_dir) if r.get("kind") == "eval")]
    if (out_dir / BEST).is_file():
        try:
            steps.append(read_checkpoint(out_dir / BEST)[1]["step"])
        except CheckpointError as e:  # still the user's file: never trained over
            raise TrainingError(f"{e}; and without {LAST} nothing can continue this run: move the file away, or "
                                "train with --out NEW_DIR") from None
    return max(steps)


def _check_run_json(path: Path) -> None:
    """A resumed session rewrites run.json with the sessions it read: refuse one it cannot read, which
    would be replaced by a history that starts again."""
    if not path.exists():
        return
    try:
        info = json.loads(path.read_text())
        ok = isinstance(info, dict) and isinstance(info.get("sessions", []), list)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        ok = False
    if not ok:
        raise TrainingError(f"--resume: {str(path)!r} is damaged (not the JSON that training writes); move it "
                            "away to resume (the session history then starts again with this session)")


def resume_plan(out_dir: Path, cfg: Config) -> dict[str, Any] | None:
    """What ``train(resume=True)`` may do in ``out_dir``, decided before anything is written.

    Returns the metadata of ``last`` to continue from, or None to start at step 0 (there is no run
    yet, or nothing in the directory that a start from step 0 would not write again identically).
    Raises a one-line TrainingError for a run whose ``last`` is missing while other results exist:
    a finished run (resumability ended when ``last`` was deleted) or an unfinished one.
    """
    check_layout(out_dir)
    _check_run_json(out_dir / "run.json")
    if (out_dir / "config.yaml").exists():
        saved = saved_config(out_dir).to_dict()
        if not same_experiment(saved, cfg.to_dict()):
            raise TrainingError(
                f"--resume: the config differs from the one saved in {str(out_dir / 'config.yaml')!r} "
                f"({experiment_differences(saved, cfg.to_dict())}: saved / given); resume without "
                "--preset/overrides, or start a new run with --out"
            )
    if (out_dir / LAST).is_file():
        return read_checkpoint(out_dir / LAST)[1]
    done = finished_step(out_dir, cfg.optim.steps)
    if done is not None:
        kept = ("its best checkpoint still evaluates (robustfeat eval)" if (out_dir / BEST).is_file() else
                "its records and evaluations stay as they are")
        raise TrainingError(
            f"--resume: the run in {str(out_dir)!r} finished at step {done:,}, and without its {LAST} "
            f"(deleted) it cannot be continued; {kept}, or train again with --out NEW_DIR")
    step = recorded_step(out_dir)
    if step > first_checkpoint_step(cfg):
        raise TrainingError(
            f"--resume: {str(out_dir)!r} holds results up to step {step:,} but no {LAST} to continue from, "
            "and resuming would retrain from step 0 over them; start a new run with --out NEW_DIR, or delete "
            "the directory yourself to train it again there")
    return None


# ---------------------------------------------------------------------------------------------------------
# provenance: run.json


@functools.cache
def git_revision() -> str:
    """The checkout's commit (with -dirty for uncommitted changes to tracked files), read once per process:
    a long-lived process (a script that trains and evaluates one item after another) keeps running the
    code it imported, so every record it writes names the revision of its first look, not a commit
    made while it ran."""
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


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (Linux; empty elsewhere)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what ``platform`` knows, maybe '')."""
    return _cpuinfo().get("model name") or platform.processor()


def cpu_id() -> str:
    """Vendor, family, model and stepping ('' where /proc/cpuinfo is missing). Virtual machines often
    name every CPU generation alike ("AMD EPYC"); these numbers tell the generations apart."""
    f = _cpuinfo()
    parts = [f.get("vendor_id", "")] + [f"{k} {f[v]}" for k, v in
                                        (("family", "cpu family"), ("model", "model"), ("stepping", "stepping"))
                                        if v in f]
    return " ".join(p for p in parts if p)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where a run or an evaluation was computed. The CPU and the vector instructions torch dispatches
    to belong here because CPU kernels round differently on other hardware: a rerun on the same CPU
    repeats a run bit for bit, one on another CPU only statistically."""
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _history(run_json: Path) -> list[Any]:
    try:
        sessions = json.loads(run_json.read_text()).get("sessions", [])
    except (OSError, ValueError, AttributeError):  # missing or damaged: the history starts again
        return []
    return sessions if isinstance(sessions, list) else []


class RunJson:
    """run.json: this session's provenance, and one entry per finished session (``sessions``)."""

    def __init__(self, out_dir: Path, cfg: Config, device: torch.device, command: list[str] | None,
                 resume: bool, write: bool):
        """Reads the sessions of a resumed run and writes the file at once (``write``: rank 0 only)."""
        self.path, self.write = out_dir / "run.json", write
        self.info = {
            "command": command or sys.argv,
            "git_revision": git_revision(),
            "machine": machine_info(device),
            "preset": cfg.name,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.sessions = _history(self.path) if resume else []
        # wall seconds of the earlier sessions: records carry the run's total training time so far
        self.wall_before = sum(float(h.get("wall_seconds", 0.0)) for h in self.sessions if isinstance(h, dict))
        self._save()

    def finish(self, from_step: int, to_step: int, seconds: float, ended: str = "finished") -> None:
        """Add this session's entry: ``to_step`` is the step ``last`` holds at its end, ``ended`` how it
        ended: finished (the run's last step), stopped (``stop_after`` or a guard), interrupted (SIGINT,
        SIGTERM) or error."""
        self.sessions.append({**self.info, "from_step": from_step, "to_step": to_step,
                              "wall_seconds": round(seconds, 1), "ended": ended})
        self._save()

    def _save(self) -> None:
        if self.write:
            atomic_write_text(self.path, json.dumps({**self.info, "sessions": self.sessions}, indent=2))


# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl and tensorboard


class MetricsLog:
    """metrics.jsonl, appended line by line (each line flushed; a torn last line is dropped on resume)."""

    def __init__(self, path: Path, resume_step: int | None):
        """``resume_step``: keep the records up to that step (the resumed checkpoint's), drop the later
        ones (written again by this session) and a torn last line; lines that are not records are kept
        as they are (never written by training, so not training's to drop). None: a new run, which
        starts the file afresh."""
        self.path = path
        if resume_step is not None and path.exists():
            lines = path.read_text(errors="replace").splitlines()
            keep = []
            for i, line in enumerate(lines):
                try:
                    rec = json.loads(line)
                except ValueError:
                    if i < len(lines) - 1:
                        keep.append(line)
                    continue
                if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)) or rec["step"] <= resume_step:
                    keep.append(line)
            atomic_write_text(path, "".join(k + "\n" for k in keep))
        self._f = open(path, "a" if resume_step is not None else "w")  # noqa: SIM115 - closed by close()

    def write(self, rec: dict[str, Any]) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def tensorboard_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - optional dependency
        raise TrainingError(
            "run.tensorboard=true needs the tensorboard package: pip install 'robustfeat[tensorboard]'"
        ) from None
    return SummaryWriter


def tensorboard_writer(out_dir: Path):
    return tensorboard_class()(str(out_dir / "tensorboard"))
