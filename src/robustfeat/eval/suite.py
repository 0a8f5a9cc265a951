"""The evaluation suite on any model that maps [0, 1] images to logits (``evaluate_model``): every
accuracy of the paper's robustness tables, AutoAttack, and the gradient-masking checks (``checks``).

A suite is a list of rows (``Row``). Rows that share an attack (same loss, eps, step size, restarts)
and differ only in the number of steps are computed by *one* PGD run that records, per example, the
first misclassified iterate (``pgd_budgets``): PGD-5/20/100/200 cost 200 steps, not 325, and give
exactly what four separate ``robustfeat.attacks.pgd(keep_best=True)`` calls with the same generator give.

Counting: an example counts as robust under a row only if the model classifies the clean image *and*
the adversarial image correctly (the clean image is itself a point of the eps-ball), so no attacked
row can exceed natural accuracy. Clean predictions are computed once and only correctly classified
examples are attacked. Every adversarial batch passes ``check_adversary`` before it is counted.

Black-box rows craft adversaries on a source model (an independently trained copy) using the source's
gradients only (last iterate, as Madry et al.), then classify them with the target under no_grad.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn

from ..attacks import check_adversary, eval_mode, pgd_budgets
from ..build import resolve_device
from ..checkpoint import atomic_write_bytes
from ..config import AttackConfig, ConfigError
from ..data import DataError, batch_starts, to_float_images
from ..seeding import derived_seed
from .autoattack import run_autoattack
from .checks import (
    check_images,
    check_labels,
    check_settings,
    masking_checks,
    masking_suspected,
    model_classes,
)
from .stats import wilson_interval

SUITES = ("quick", "paper", "full")
PGD_STEPS = (5, 20, 100, 200)
CW_STEPS = (30, 100)
LARGE_EPS = 0.5
LARGE_EPS_STEPS = 50


# ---------------------------------------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class Row:
    """One line of the results table. kind: natural, whitebox, blackbox, sanity (large eps) or autoattack."""

    kind: str
    loss: str = "ce"
    steps: int = 0
    eps: float = 0.0
    step_size: float = 0.0
    restarts: int = 1
    random_start: bool = True
    bn_mode: str = "eval"

    @property
    def id(self) -> str:
        if self.kind in ("natural", "autoattack"):
            return self.kind
        name = f"{self.kind}/{'pgd' if self.loss == 'ce' else 'cw'}-{self.steps}"
        return f"{name}-eps{self.eps:g}" if self.kind == "sanity" else name

    @property
    def title(self) -> str:
        if self.kind == "natural":
            return "Natural"
        if self.kind == "autoattack":
            return "AutoAttack (standard)"
        attack = f"{'PGD' if self.loss == 'ce' else 'CW'} {self.steps} steps"
        if self.kind == "sanity":
            return f"Sanity, {attack}, eps {self.eps:g}"
        return f"{'White box' if self.kind == 'whitebox' else 'Black box'}, {attack}"

    @property
    def group(self) -> tuple:
        """Rows with the same group share one multi-budget PGD run."""
        return (self.kind, self.loss, self.eps, self.step_size, self.restarts, self.random_start, self.bn_mode)


def suite_rows(
    suite: str,
    *,
    eps: float,
    step_size: float,
    black_box: bool = False,
    extra_pgd_steps: Sequence[int] = (),
    restarts: int = 1,
    large_eps: float = LARGE_EPS,
) -> list[Row]:
    """The rows of a named suite.

    quick: natural, PGD at ``extra_pgd_steps`` (the preset's validation attack) or PGD-20, CW-30.
    paper: natural, PGD-5/20/100/200 (+ ``extra_pgd_steps``, e.g. MNIST's PGD-40), CW-30/100, and a
    large-eps PGD sanity row. full: paper + AutoAttack. Black-box rows repeat the white-box attacks on
    a source model when ``black_box``.
    """
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    AttackConfig(eps=eps, step_size=step_size, restarts=restarts)  # validates the values
    if suite == "quick":
        pgd_steps, cw_steps = sorted(set(extra_pgd_steps) or {20}), [30]
    else:
        pgd_steps, cw_steps = sorted(set(PGD_STEPS) | set(extra_pgd_steps)), list(CW_STEPS)
    attacks = [("ce", k) for k in pgd_steps if k > 0] + [("cw", k) for k in cw_steps]
    rows = [Row("natural")]
    for kind in ("whitebox", "blackbox") if black_box else ("whitebox",):
        rows += [Row(kind, loss, k, eps, step_size, restarts) for loss, k in attacks]
    if suite != "quick":
        rows.append(Row("sanity", "ce", LARGE_EPS_STEPS, large_eps, 2.5 * large_eps / LARGE_EPS_STEPS, 1))
    if suite == "full":
        rows.append(Row("autoattack", eps=eps))
    return rows


# ---------------------------------------------------------------------------------------------------------
# the evaluation


def _seed_tag(text: str) -> int:
    return zlib.crc32(text.encode())


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state (names, shapes, values): which weights were evaluated."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def default_batch_size(device: torch.device) -> int:
    """Examples per attack batch: large on a GPU (scaled by its memory), modest on a CPU."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return 1000 if total >= 40 * 2**30 else 500
    return 250


def evaluate_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    suite: str = "paper",
    rows: Sequence[Row] | None = None,
    source: nn.Module | None = None,
    extra_pgd_steps: Sequence[int] = (),
    restarts: int = 1,
    large_eps: float = LARGE_EPS,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    progress: bool = True,
    autoattack_dir: str | Path | None = None,
    state_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` ([0, 1] images -> logits) on (x, y) with a suite's rows.

    ``x``: uint8 (N, C, H, W) or float in [0, 1]; ``y``: (N,) labels. ``source``: the model black-box
    adversaries are crafted on (adds black-box rows). ``rows`` overrides ``suite``. ``autoattack_dir``:
    where AutoAttack keeps finished chunks so an interrupted evaluation resumes. ``state_dir``: where
    the PGD / CW rows keep each finished batch's results, so an interrupted PGD-200 over a whole test
    set resumes at the first unfinished batch (results are identical: each batch's attack noise is a
    function of (seed, row group, batch start)).
    Returns {"settings", "n", "rows": [...], "checks": [...], "masking_suspected", "per_example"}.
    Settings, images and labels are checked before anything runs (``robustfeat.eval.checks``: a
    ConfigError or DataError naming the value). Raises ``InvalidAdversary`` if any adversarial batch
    leaves the threat model.
    """
    check_settings(eps=eps, step_size=step_size, restarts=restarts, batch_size=batch_size, seed=seed)
    check_images(x, y)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    classes = model_classes(model, x, device, channels_last)
    check_labels(y, classes)
    if source is not None and model_classes(source, x, device, channels_last, "the black-box source") != classes:
        raise DataError("the black-box source gives another number of classes than the evaluated model")
    custom = rows is not None
    if rows is None:
        rows = suite_rows(suite, eps=eps, step_size=step_size, black_box=source is not None,
                          extra_pgd_steps=extra_pgd_steps, restarts=restarts, large_eps=large_eps)
    rows = list(rows)
    if any(r.kind == "blackbox" for r in rows) and source is None:
        raise ConfigError("black-box rows need a source model (--source RUN_DIR)")
    n = len(y)
    batch_size = batch_size or default_batch_size(device)
    y = y.to(torch.long)

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        xb = x[i : i + batch_size]
        return to_float_images(xb, device, channels_last), y[i : i + batch_size].to(device)

    flags: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    with eval_mode(model, source):  # BN running statistics are used and never updated; modes restored after
        with torch.no_grad():
            # clean predictions, once: every row counts only examples classified correctly here
            t0 = time.time()
            clean = torch.zeros(n, dtype=torch.bool)
            for i in batch_starts(n, batch_size, desc="natural", progress=progress):
                xb, yb = batch(i)
                clean[i : i + batch_size] = (model(xb).argmax(1) == yb).cpu()
            flags["natural"], seconds["natural"] = clean, time.time() - t0

        groups: dict[tuple, list[Row]] = {}
        for r in rows:
            if r.kind in ("whitebox", "blackbox", "sanity"):
                groups.setdefault(r.group, []).append(r)
        cache = _BatchCache(state_dir, model, source, seed) if state_dir is not None else None
        for members in groups.values():
            _run_group(model, source, members, clean, batch, n, batch_size, seed, progress, flags, seconds,
                       cache)
        if any(r.kind == "autoattack" for r in rows):
            t0 = time.time()
            flags["autoattack"] = run_autoattack(
                model, x, y, clean, eps=eps, seed=seed, batch_size=batch_size, device=device,
                channels_last=channels_last, state_dir=autoattack_dir, progress=progress,
                fingerprint=model_fingerprint(model))
            seconds["autoattack"] = time.time() - t0

    out_rows = []
    for r in rows:
        f = flags[r.id]
        correct = int(f.sum())
        out_rows.append({
            "id": r.id, "title": r.title, **asdict(r),
            "n": n, "correct": correct, "accuracy": correct / n,
            "ci95": list(wilson_interval(correct, n)), "seconds": round(seconds.get(r.id, 0.0), 2),
        })
    checks = masking_checks(out_rows)
    return {
        "settings": {
            "suite": "custom" if custom else suite, "eps": eps, "step_size": step_size,
            "restarts": restarts, "random_start": True, "bn_mode": "eval", "seed": seed,
            "batch_size": batch_size, "device": str(device), "large_eps": large_eps,
            "counting": "robust = clean prediction correct and adversarial prediction correct",
        },
        "n": n,
        "model_fingerprint": model_fingerprint(model),
        "source_fingerprint": model_fingerprint(source) if source is not None else None,
        "rows": out_rows,
        "checks": checks,
        "masking_suspected": masking_suspected(checks),
        "per_example": flags,
    }


class _BatchCache:
    """Finished batches of the PGD / CW rows on disk, keyed by everything their result depends on."""

    def __init__(self, state_dir: str | Path, model: nn.Module, source: nn.Module | None, seed: int):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.base = f"{model_fingerprint(model)}|{model_fingerprint(source) if source is not None else ''}|{seed}"

    def path(self, group: tuple, budgets: list[int], start: int, xs: torch.Tensor, ys: torch.Tensor) -> Path:
        h = hashlib.sha256(f"{self.base}|{group!r}|{budgets}|{start}".encode())
        h.update(xs.detach().cpu().contiguous().numpy().tobytes())
        h.update(ys.detach().cpu().contiguous().numpy().tobytes())
        return self.dir / f"pgd-{h.hexdigest()[:32]}.safetensors"

    @staticmethod
    def load(path: Path, budgets: list[int], size: int) -> dict[int, torch.Tensor] | None:
        if not path.exists():
            return None
        try:
            t = load_file(str(path))
            out = {k: t[f"k{k}"].bool() for k in budgets}
        except (SafetensorError, OSError, KeyError, ValueError):  # damaged: recomputed, never trusted
            return None
        return out if all(v.shape == (size,) for v in out.values()) else None

    @staticmethod
    def save(path: Path, ok: dict[int, torch.Tensor]) -> None:
        atomic_write_bytes(path, save_tensors({f"k{k}": v.to(torch.uint8).contiguous() for k, v in ok.items()}))


def _run_group(model, source, members, clean, batch, n, batch_size, seed, progress, flags, seconds,
               cache: _BatchCache | None = None) -> None:
    """One multi-budget PGD run per batch for rows that differ only in their step count."""
    r0 = members[0]
    budgets = sorted({r.steps for r in members})
    robust = {k: torch.zeros(n, dtype=torch.bool) for k in budgets}
    attacker = source if r0.kind == "blackbox" else model
    desc = f"{r0.kind} {'PGD' if r0.loss == 'ce' else 'CW'}-{'/'.join(map(str, budgets))}"
    tag = _seed_tag(repr(r0.group))
    t0 = time.time()
    for i in batch_starts(n, batch_size, desc=desc, progress=progress):
        idx = clean[i : i + batch_size].nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        xb, yb = batch(i)
        dev_idx = idx.to(xb.device)
        xs, ys = xb[dev_idx], yb[dev_idx]
        path = cache.path(r0.group, budgets, i, xs, ys) if cache is not None else None
        done = cache.load(path, budgets, len(idx)) if path is not None else None
        if done is not None:
            for k, ok in done.items():
                robust[k][i + idx] = ok
            continue
        gen = torch.Generator(device=xs.device).manual_seed(derived_seed(seed, tag, i))
        advs = pgd_budgets(attacker, xs, ys, eps=r0.eps, step_size=r0.step_size, budgets=budgets,
                           restarts=r0.restarts, random_start=r0.random_start, loss=r0.loss,
                           bn_mode=r0.bn_mode, generator=gen, keep_best=r0.kind != "blackbox")
        batch_ok = {}
        for k, xa in advs.items():
            check_adversary(xs, xa, r0.eps)
            with torch.no_grad():
                batch_ok[k] = (model(xa).argmax(1) == ys).cpu()
            robust[k][i + idx] = batch_ok[k]
        if path is not None:
            cache.save(path, batch_ok)
    per_row = (time.time() - t0) / len(members)
    for r in members:
        flags[r.id], seconds[r.id] = robust[r.steps], per_row


def replace_eps(rows: Sequence[Row], eps: float, step_size: float) -> list[Row]:
    """The same rows with another eps / step size (the sanity row keeps its own)."""
    return [r if r.kind in ("natural", "sanity") else replace(r, eps=eps, step_size=step_size) for r in rows]


def to_json(result: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in result.items() if k != "per_example"}, indent=2)
