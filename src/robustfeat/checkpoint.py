"""Checkpoints: one safetensors file per checkpoint, written atomically, loaded without pickle.

A checkpoint holds the model weights (``model.*``; with ``optim.ema`` the weight average), the
optimizer's tensors (``optim.*``), with ``optim.ema`` the weights being trained (``train.*``) and, in
the safetensors metadata, the step, the optimizer's non-tensor state, the resolved config and the best
validation metric so far. Nothing in it is ever executed on load, so checkpoints can be exchanged.
Data order, augmentation and attack noise are derived from (seed, step), so the step is all the
random state a resume needs.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .fsutil import fsync_dir

FORMAT = "robustfeat-checkpoint-1"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, corrupt or does not fit its model."""


# ---------------------------------------------------------------------------------------------------------
# atomic file writes


TMP_SUFFIX = ".tmp"


def _temp_file(path: Path) -> tuple[int, str]:
    """Create ``.NAME.RANDOM.tmp`` beside ``path`` (exclusively) and return (fd, its path).

    Unlike ``tempfile.mkstemp`` (mode 0600) the file gets the permissions of any new file, 0666 minus
    the umask, so the renamed result is readable like the rest of the run directory.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), str(tmp)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    raise FileExistsError(f"cannot create a temporary file beside {str(path)!r}")  # pragma: no cover


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in ``directory`` (not recursive).

    Only names this module creates (``.NAME.HEX.tmp``) are touched; returns what was removed. Call it
    only when no other process writes into ``directory``.
    """
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for f in d.iterdir():
        name = f.name
        if name.startswith(".") and name.endswith(TMP_SUFFIX) and name.count(".") >= 3 and f.is_file():
            try:
                f.unlink()
                removed.append(f)
            except OSError:  # pragma: no cover - left for the next start
                pass
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, flush, fsync, then rename over it.

    A crash at any moment leaves either the old file or the new one at ``path``, never a torn file;
    at worst a ``.NAME.*.tmp`` file stays behind (``remove_stale_temp_files``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ---------------------------------------------------------------------------------------------------------
# optimizer state <-> flat tensors + json


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    train_model: torch.nn.Module | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Atomically write model (+ optimizer) state at ``step``; ``extra`` is any JSON-able dict and
    ``state`` further tensors of the run (saved under their own names, e.g. ``carry.delta``).

    With a weight average (``optim.ema``), ``model`` is the averaged model, the one every reader
    evaluates, and ``train_model`` the weights the optimizer steps, stored as ``train.*`` for resuming.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if train_model is not None:
        tensors.update({f"train.{k}": v.detach().cpu().contiguous() for k, v in train_model.state_dict().items()})
    meta: dict[str, str] = {
        "format": FORMAT,
        "step": str(int(step)),
        "config": json.dumps(config),
        "extra": json.dumps(extra or {}),
        "torch": torch.__version__,
    }
    for name, t in (state or {}).items():
        if name.split(".", 1)[0] in ("model", "train", "optim"):
            raise ValueError(f"state tensor name {name!r} collides with the checkpoint's own prefixes")
        tensors[name] = t.detach().cpu().contiguous()
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        meta["optimizer"] = json.dumps(opt_meta)
    # serialized in memory (a few MB for these models) so that the one atomic writer writes it
    atomic_write_bytes(path, save(tensors, metadata=meta))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint, with a CheckpointError for anything unreadable.

    Only the safetensors format is read (a JSON header and raw tensor bytes): a pickle, a
    ``torch.save`` file or anything else is refused without being executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable safetensors file ({reason}); it may be truncated "
            "or not a robustfeat checkpoint (pickled .pt/.pth files are never loaded)"
        ) from None
    if raw_meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {raw_meta.get('format')!r}, expected {FORMAT!r}"
        )
    try:
        meta: dict[str, Any] = {
            "step": int(raw_meta["step"]),
            "config": json.loads(raw_meta["config"]),
            "extra": json.loads(raw_meta.get("extra", "{}")),
            "optimizer": json.loads(raw_meta["optimizer"]) if "optimizer" in raw_meta else None,
        }
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has damaged metadata ({type(e).__name__}: {e})") from None
    problems = []
    if meta["step"] < 0:
        problems.append(f"step {meta['step']} < 0")
    if not isinstance(meta["config"], dict):
        problems.append("config is not a mapping")
    if not isinstance(meta["extra"], dict):
        problems.append("extra is not a mapping")
    if meta["optimizer"] is not None and not (
        isinstance(meta["optimizer"], dict) and isinstance(meta["optimizer"].get("param_groups"), list)
        and isinstance(meta["optimizer"].get("scalars", {}), dict)
    ):
        problems.append("optimizer state is malformed")
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} has damaged metadata: {'; '.join(problems)}")
    return tensors, meta


def _weights(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_architecture(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str = "model."
) -> None:
    """CheckpointError unless the checkpoint's ``model.*`` (or ``prefix``) tensors have exactly the
    model's names, shapes and dtypes (works on a model built on the ``meta`` device, so nothing is
    allocated)."""
    weights = _weights(tensors, prefix)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    dtype = sorted(k for k in set(expected) & set(weights)
                   if expected[k].is_floating_point() != weights[k].is_floating_point())
    if missing or unexpected or shape or dtype:
        bits = []
        if missing:
            bits.append(f"missing {missing[:3]}")
        if unexpected:
            bits.append(f"unexpected {unexpected[:3]}")
        if shape:
            k = shape[0]
            bits.append(f"{k} has shape {tuple(weights[k].shape)} but the model expects {tuple(expected[k].shape)}")
        if dtype:
            k = dtype[0]
            bits.append(f"{k} has dtype {weights[k].dtype} but the model expects {expected[k].dtype}")
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model architecture of its config: {'; '.join(bits)}"
        )


def _load_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], model: torch.nn.Module,
                  prefix: str) -> None:
    check_architecture(path, tensors, model, prefix)
    weights = _weights(tensors, prefix)
    for k, v in weights.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite values in {prefix}{k}")
    model.load_state_dict(weights)


def load_into(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    averaged: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``); returns its metadata.

    To resume a run with a weight average, pass the average as ``averaged``: it receives the
    checkpoint's ``model.*`` tensors and ``model`` its ``train.*`` ones. A checkpoint whose tensors
    do not fit the model (other architecture or widths) is refused with a message listing the first
    mismatches, never loaded partially.
    """
    tensors, meta = read_checkpoint(path)
    if averaged is None:
        _load_weights(path, tensors, model, "model.")
    else:
        if not any(k.startswith("train.") for k in tensors):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds no training weights (train.*) beside its weight average; "
                "it cannot resume a run with optim.ema > 0"
            )
        _load_weights(path, tensors, averaged, "model.")
        _load_weights(path, tensors, model, "train.")
    if optimizer is not None:
        if meta["optimizer"] is None:
            raise CheckpointError(f"checkpoint {str(path)!r} has no optimizer state to resume from")
        opt = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        try:
            optimizer.load_state_dict(_unflatten_optimizer(opt, meta["optimizer"]))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"checkpoint {str(path)!r}: optimizer state does not fit ({e})") from None
        # torch checks only the parameter counts; a state tensor of another shape would fail (or
        # broadcast silently) at the first step, so check shapes and values here.
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0:
                    continue
                if value.shape != param.shape:
                    raise CheckpointError(
                        f"checkpoint {str(path)!r}: optimizer state {key!r} has shape {tuple(value.shape)} "
                        f"for a parameter of shape {tuple(param.shape)}"
                    )
                if value.is_floating_point() and not torch.isfinite(value).all():
                    raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite optimizer state {key!r}")
    return meta
