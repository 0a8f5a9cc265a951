"""The AutoAttack row of the evaluation suite (standard version, ``pyautoattack`` package), resumable.

Resuming works in chunks: the examples are split into chunks and each finished chunk's adversarial
images are saved (safetensors) under ``state_dir``, keyed by the model's fingerprint, eps, seed and the
chunk's images. A rerun loads finished chunks, re-validates and re-classifies them, and attacks only
the rest. (AutoAttack's own ``state_path`` is not used: a run restored from it returns the clean image
for examples broken before the interruption, so those could not be re-verified.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn

from ..attacks import check_adversary, predicts
from ..checkpoint import atomic_write_bytes
from ..data import batch_starts, to_float_images
from ..progress import write_line

# Examples per saved chunk. On a CPU a 1,000-image chunk of a CIFAR ResNet takes about an hour, so a stop
# would lose the whole row; 100 bounds the loss to minutes there. On a GPU the larger chunk keeps batches full.
CHUNK = 1000
CPU_CHUNK = 100
_LOGGER = "auto-attack"  # pyautoattack's logger


class _StageLines(logging.Handler):
    """Forwards AutoAttack's own stage messages ("running apgd-ce", "robust accuracy after APGD-CE: ...")
    as lines on stderr: a chunk can take an hour on a CPU, and its progress bar moves once per chunk."""

    def __init__(self, prefix: str):
        super().__init__(logging.DEBUG)
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith(("running ", "robust accuracy after ")):
            write_line(f"{self.prefix}: {msg}")


@contextlib.contextmanager
def _stage_lines(enabled: bool, prefix: str) -> Iterator[None]:
    log = logging.getLogger(_LOGGER)
    level, handler = log.level, _StageLines(prefix)
    if enabled:
        log.setLevel(logging.DEBUG)
        log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _chunk_key(fingerprint: str, eps: float, seed: int, xc: torch.Tensor, yc: torch.Tensor) -> str:
    h = hashlib.sha256(f"{fingerprint}|{eps!r}|{seed}".encode())
    h.update(xc.detach().cpu().contiguous().numpy().tobytes())
    h.update(yc.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def run_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clean: torch.Tensor,
    *,
    eps: float,
    seed: int,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
    state_dir: str | Path | None = None,
    progress: bool = True,
    fingerprint: str = "",
    chunk: int | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Per example: robust under AutoAttack (standard, l_inf ``eps``) and correct on the clean image.
    ``num_classes`` below 10 caps APGD-T's and FAB-T's 9 target classes at num_classes - 1 (AutoAttack
    fails with more targets than wrong classes). ``chunk`` defaults to ``CPU_CHUNK`` on a CPU, else ``CHUNK``."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise RuntimeError("the AutoAttack row needs the 'pyautoattack' package (pip install pyautoattack)") from e
    logging.getLogger(_LOGGER).setLevel(logging.WARNING)
    n = len(y)
    if chunk is None:
        chunk = CPU_CHUNK if device.type == "cpu" else CHUNK
    robust = torch.zeros(n, dtype=torch.bool)
    state = Path(state_dir) if state_dir is not None else None
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device, seed=seed % 2**31)
    if num_classes is not None:
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, num_classes - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, num_classes - 1)
    for start in batch_starts(n, chunk, desc="AutoAttack", unit="chunk", progress=progress):
        idx = clean[start : start + chunk].nonzero().squeeze(1) + start
        if len(idx) == 0:
            continue
        # NCHW for AutoAttack: it flattens gradients with .view, which fails on channels_last tensors
        xc = to_float_images(x[idx], device)
        yc = y[idx].to(device)
        path = None
        if state is not None:
            path = state / f"aa-{_chunk_key(fingerprint, eps, seed, xc, yc)}.safetensors"
        if path is not None and path.exists():
            x_adv = load_file(str(path))["x_adv"].to(device)
        else:
            prefix = (f"AutoAttack, images {start:,}-{min(start + chunk, n) - 1:,} "
                      f"({len(idx):,} correctly classified; accuracies below are of these)")
            with _stage_lines(progress, prefix):
                x_adv, _ = aa.run_standard_evaluation(xc, yc, batch_size=batch_size)
            if path is not None:
                atomic_write_bytes(path, save_tensors({"x_adv": x_adv.detach().cpu().contiguous()}))
        x_adv = x_adv.to(xc.dtype)
        check_adversary(xc, x_adv, eps)
        if channels_last and x_adv.dim() == 4:  # classified in the layout the rest of the suite uses
            x_adv = x_adv.contiguous(memory_format=torch.channels_last)
        ok = torch.zeros(len(idx), dtype=torch.bool)
        with torch.no_grad():
            for b in range(0, len(idx), batch_size):
                ok[b : b + batch_size] = predicts(model(x_adv[b : b + batch_size]), yc[b : b + batch_size]).cpu()
        robust[idx] = ok
    return robust
