"""The run directory: its layout, its preparation, and the files written beside the checkpoints.

    config.yaml            the fully resolved config
    run.json               git revision, command, machine, torch version, and one entry per session
    metrics.jsonl          one JSON object per line: {"kind": "train"|"eval"|..., "step": ..., ...}
    checkpoints/last.safetensors, checkpoints/best.safetensors
    tensorboard/           with run.tensorboard=true

See docs/run-directory.md for what each file holds; ``robustfeat.checkpoint`` for the checkpoint format.
"""

from __future__ import annotations

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
from ..checkpoint import atomic_write_text, remove_stale_temp_files
from ..config import Config, ConfigError, config_from_dict, read_config_file
from .errors import TrainingError

LAST = "checkpoints/last.safetensors"
BEST = "checkpoints/best.safetensors"


# ---------------------------------------------------------------------------------------------------------
# preparation


def prepare_run_dir(
    out_dir: Path, cfg: Config, resume: bool, command: list[str] | None, splits: Splits | None = None,
    extensions: Sequence[Any] = (),
) -> None:
    """Check the output location before any work and write config.yaml.

    Refused before any training step: a path that is not a directory, a directory that already holds
    a run (without ``resume``), a location that cannot be written, and (given ``splits``) one without
    room for the checkpoints (of the run with ``extensions``). A directory this call created is removed
    again when it refuses.
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
            tensorboard_class()
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


def same_experiment(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Configs equal up to where the data lives (data.dir may differ between machines). Both are read
    back through the config classes first, so a config saved before a key existed compares with the
    key's default (which is, by rule, the behaviour from before the key existed)."""

    def norm(d: dict[str, Any]) -> dict[str, Any]:
        try:
            d = config_from_dict(d).to_dict()
        except ConfigError:
            pass  # an invalid saved config compares as it is (and so differs)
        return {**d, "data": {k: v for k, v in (d.get("data") or {}).items() if k != "dir"}}

    return norm(a) == norm(b)


# ---------------------------------------------------------------------------------------------------------
# provenance: run.json


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

    def finish(self, from_step: int, to_step: int, seconds: float) -> None:
        """Add this session's entry."""
        self.sessions.append({**self.info, "from_step": from_step, "to_step": to_step,
                              "wall_seconds": round(seconds, 1)})
        self._save()

    def _save(self) -> None:
        if self.write:
            atomic_write_text(self.path, json.dumps({**self.info, "sessions": self.sessions}, indent=2))


# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl and tensorboard


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
