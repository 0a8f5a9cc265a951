"""Checkpoints: one safetensors file per checkpoint, written atomically, loaded without pickle.

A checkpoint holds the model weights (``model.*``), the optimizer's tensors (``optim.*``) and, in the
safetensors metadata, the step, the optimizer's non-tensor state, the resolved config and the best
validation metric so far. Nothing in it is ever executed on load, so checkpoints can be exchanged.
Data order, augmentation and attack noise are derived from (seed, step), so the step is all the
random state a resume needs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "robustfeat-checkpoint-1"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, corrupt or does not fit its model."""


# ---------------------------------------------------------------------------------------------------------
# atomic file writes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, flush, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
) -> None:
    """Atomically write model (+ optimizer) state at ``step``; ``extra`` is any JSON-able dict."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta: dict[str, str] = {
        "format": FORMAT,
        "step": str(int(step)),
        "config": json.dumps(config),
        "extra": json.dumps(extra or {}),
        "torch": torch.__version__,
    }
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        meta["optimizer"] = json.dumps(opt_meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint, with a CheckpointError for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        raw_meta = header.get("__metadata__", {}) or {}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable safetensors file ({e}); it may be truncated "
            "or not a robustfeat checkpoint"
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
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has damaged metadata ({e})") from None
    return tensors, meta


def load_into(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``); returns its metadata.

    A checkpoint whose tensors do not fit the model (other architecture or widths) is refused with a
    message listing the first mismatches, never loaded partially.
    """
    tensors, meta = read_checkpoint(path)
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or shape:
        bits = []
        if missing:
            bits.append(f"missing {missing[:3]}")
        if unexpected:
            bits.append(f"unexpected {unexpected[:3]}")
        if shape:
            k = shape[0]
            bits.append(f"{k} has shape {tuple(weights[k].shape)} but the model expects {tuple(expected[k].shape)}")
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model architecture: {'; '.join(bits)}"
        )
    for k, v in weights.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite values in {k}")
    model.load_state_dict(weights)
    if optimizer is not None:
        if meta["optimizer"] is None:
            raise CheckpointError(f"checkpoint {str(path)!r} has no optimizer state to resume from")
        opt = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        try:
            optimizer.load_state_dict(_unflatten_optimizer(opt, meta["optimizer"]))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {str(path)!r}: optimizer state does not fit ({e})") from None
    return meta
