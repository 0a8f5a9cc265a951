"""The evaluation suite on any model that maps [0, 1] images to logits (``evaluate_model``): every
accuracy of the paper's robustness tables, the per-example worst case over the white-box attacks,
AutoAttack, robustness curves, and the checks of gradient masking and attack strength.

A suite is a list of rows (``Row``). Work is shared wherever that changes no reported number:

* clean predictions are computed once (``eval.precheck.clean_pass``, which also checks the model for
  zero input gradients, randomness and probability outputs before anything is attacked), and only
  correctly classified examples are attacked;
* rows that share an attack (same loss, eps, step size, restarts) and differ only in the number of
  steps are computed by *one* PGD run that records, per example, the first misclassified iterate
  (``pgd_budgets``): PGD-5/20/100/200 cost 200 steps, not 325, and give exactly what four separate
  ``robustfeat.attacks.pgd(keep_best=True)`` calls with the same generator give. The steps curve and
  the eps curve's point at the evaluated eps come from the same runs;
* inside a run an example stops being computed once it is misclassified (``prune``): with keep-best
  its adversary for every budget is then fixed. Restarts rows attack only the examples their
  single-start row left robust, targeted rows each target only the examples earlier targets left
  robust: both are exact, as one success per example is all a row counts.

Rows are *not* cascaded into each other: every per-attack row attacks every correctly classified
example, so each keeps its own meaning ("robust to PGD-20", not "robust to PGD-20 among those CW-30
left"). The worst-case row is their per-example AND, which needs no attack of its own.

Counting: an example counts as robust under a row only if the model classifies the clean image *and*
the adversarial image correctly (the clean image is itself a point of the eps-ball), so no attacked
row can exceed natural accuracy. Every adversarial batch passes ``check_adversary`` before it is counted.

Black-box rows craft adversaries on a source model (an independently trained copy) and transfer rows
on a natural model, using that model's gradients only (last iterate, as Madry et al.), then classify
them with the evaluated model under no_grad.
"""

from __future__ import annotations

import hashlib
import json
import math
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

from ..attacks import TARGETED, check_adversary, eval_mode, pgd_budgets, predicts
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
from .curves import EPS_FACTORS, STEPS_GRID, curve_checks, next_factor, point, reached_chance, steps_check
from .precheck import clean_pass, precheck_results
from .stats import wilson_interval
from .targeted import TARGETED_STEPS, TARGETS, targeted_robust

SUITES = ("quick", "paper", "full")
PGD_STEPS = (5, 20, 100, 200)
CW_STEPS = (30, 100)
LARGE_EPS = 0.5
LARGE_EPS_STEPS = 50
HEADLINE_STEPS = 20
"""PGD steps of the restarts check, the eps curve and the transfer row when the preset names none."""
EXTRA_RESTARTS = 4
"""Random restarts the restarts check adds to the headline PGD row."""
ATTACK_KINDS = ("whitebox", "blackbox", "transfer", "sanity", "restarts")
"""Rows computed by a PGD run per batch (autoattack has its own runner, natural and worst_case none)."""
WORST_CASE_KINDS = ("whitebox", "restarts", "autoattack")
"""White-box rows that enter the per-example worst case (at the evaluated eps)."""
_ATTACK_NAMES = {"ce": ("pgd", "PGD"), "cw": ("cw", "CW"), TARGETED: ("targeted", "targeted PGD")}


# ---------------------------------------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class Row:
    """One line of the results table. kind: natural, whitebox (loss ce, cw or targeted), blackbox (crafted on
    an independent copy), transfer (crafted on a natural model), restarts (a whitebox row with more random
    starts), sanity (large eps), autoattack, or worst_case (per example, every white-box row at once)."""

    kind: str
    loss: str = "ce"
    steps: int = 0
    eps: float = 0.0
    step_size: float = 0.0
    restarts: int = 1
    random_start: bool = True
    bn_mode: str = "eval"
    targets: int = 0
    """Targeted rows: target classes per example (the top wrong classes by clean logit)."""

    @property
    def id(self) -> str:
        if self.kind in ("natural", "autoattack", "worst_case"):
            return self.kind
        name = f"{self.kind}/{_ATTACK_NAMES[self.loss][0]}-{self.steps}"
        if self.kind == "restarts":
            return f"{name}-x{self.restarts}"
        return f"{name}-eps{self.eps:g}" if self.kind == "sanity" else name

    @property
    def title(self) -> str:
        fixed = {"natural": "Natural", "autoattack": "AutoAttack (standard)",
                 "worst_case": "Worst case over the white-box rows (per example)"}
        if self.kind in fixed:
            return fixed[self.kind]
        attack = f"{_ATTACK_NAMES[self.loss][1]} {self.steps} steps"
        if self.targets:
            attack += f" (top {self.targets} target classes)"
        return {"sanity": f"Sanity, {attack}, eps {self.eps:g}", "blackbox": f"Black box, {attack}",
                "transfer": f"Transfer from a natural model, {attack}",
                "restarts": f"White box, {attack}, {self.restarts} restarts"}.get(self.kind, f"White box, {attack}")

    @property
    def group(self) -> tuple:
        """Rows with the same group share one multi-budget PGD run (and its random starts)."""
        g = (self.kind, self.loss, self.eps, self.step_size, self.restarts, self.random_start, self.bn_mode)
        return g + (self.targets,) if self.targets else g  # untargeted rows keep their seeds of before


def headline_steps(pgd_steps: Sequence[int], headline: int | None = None) -> int:
    """The suite's main PGD step count (the restarts row, the transfer row and the eps curve use it):
    ``headline`` when given (the preset's own: PGD-40 on MNIST, PGD-20 on CIFAR), else 20 if the suite
    has PGD-20, else its longest PGD row."""
    if headline:
        return int(headline)
    return HEADLINE_STEPS if HEADLINE_STEPS in pgd_steps or not pgd_steps else max(pgd_steps)


def suite_pgd_steps(suite: str, extra_pgd_steps: Sequence[int] = (), headline: int | None = None) -> list[int]:
    """The white-box PGD step counts of a suite (the headline's among them)."""
    if suite == "quick":
        steps = set(extra_pgd_steps) or {HEADLINE_STEPS}
    else:
        steps = set(PGD_STEPS) | set(extra_pgd_steps)
    return sorted(k for k in steps | ({int(headline)} if headline else set()) if k > 0)


def suite_rows(
    suite: str,
    *,
    eps: float,
    step_size: float,
    black_box: bool = False,
    transfer: bool = False,
    extra_pgd_steps: Sequence[int] = (),
    restarts: int = 1,
    large_eps: float = LARGE_EPS,
    headline: int | None = None,
) -> list[Row]:
    """The rows of a named suite.

    quick: natural, PGD at ``extra_pgd_steps`` (the preset's validation attack) or PGD-20, CW-30.
    paper: natural, PGD-5/20/100/200 (+ ``extra_pgd_steps``, e.g. MNIST's PGD-40), CW-30/100, the
    headline PGD (``headline_steps``) with EXTRA_RESTARTS more random starts (the restarts check), and a
    large-eps PGD sanity row. full: paper + targeted PGD (top TARGETS classes) + AutoAttack. Black-box
    rows repeat the white-box PGD and CW attacks on a source model when ``black_box``; ``transfer`` adds
    the headline PGD crafted on a natural model. Every suite gets the worst-case row from ``evaluate_model``.
    """
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    AttackConfig(eps=eps, step_size=step_size, restarts=restarts)  # validates the values
    pgd_steps = suite_pgd_steps(suite, extra_pgd_steps, headline)
    cw_steps = [30] if suite == "quick" else list(CW_STEPS)
    attacks = [("ce", k) for k in pgd_steps] + [("cw", k) for k in cw_steps]
    head = headline_steps(pgd_steps, headline)
    rows = [Row("natural")]
    for kind in ("whitebox", "blackbox") if black_box else ("whitebox",):
        rows += [Row(kind, loss, k, eps, step_size, restarts) for loss, k in attacks]
    if suite == "full":
        rows.append(Row("whitebox", TARGETED, TARGETED_STEPS, eps, step_size, restarts, targets=TARGETS))
    if suite != "quick":
        rows.append(Row("restarts", "ce", head, eps, step_size, restarts + EXTRA_RESTARTS))
    if transfer:
        rows.append(Row("transfer", "ce", head, eps, step_size, restarts))
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
    transfer: nn.Module | None = None,
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
    curves: bool = False,
    num_classes: int | None = None,
    headline: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` ([0, 1] images -> logits) on (x, y) with a suite's rows.

    ``x``: uint8 (N, C, H, W) or float in [0, 1]; ``y``: (N,) labels. ``source``: the model black-box
    adversaries are crafted on (adds black-box rows); ``transfer``: a natural model to craft the transfer
    row on. ``rows`` overrides ``suite``. ``curves``: also accuracy against eps and against PGD steps
    (``robustfeat.eval.curves``). ``num_classes``: the logits' expected width (checked). ``headline``: the
    main PGD step count (``headline_steps``; evaluate_run passes the preset's). ``autoattack_dir``:
    where AutoAttack keeps finished chunks so an interrupted evaluation resumes. ``state_dir``: where
    the PGD / CW rows keep each finished batch's results, so an interrupted PGD-200 over a whole test
    set resumes at the first unfinished batch (results are identical: each batch's attack noise is a
    function of (seed, row group, batch start)).
    Returns {"settings", "n", "rows": [...], "robust_acc", "checks": [...], "masking_suspected",
    "per_example", "curves" (with ``curves``)}.
    Settings, images and labels are checked before anything runs (``robustfeat.eval.checks``: a
    ConfigError or DataError naming the value). Raises ``InvalidAdversary`` if any adversarial batch
    leaves the threat model, ``ModelOutputError`` if the model does not return (B, C) logits.

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
                          transfer=transfer is not None, extra_pgd_steps=extra_pgd_steps, restarts=restarts,
                          large_eps=large_eps, headline=headline)
    rows = list(rows)
    _check_models_for_rows(rows, source, transfer)
    n = len(y)
    batch_size = batch_size or default_batch_size(device)
    ctx = _Context(model, source, transfer, x, y.to(torch.long), batch_size, device, channels_last, seed,
                   progress, rows)
    if state_dir is not None:
        ctx.cache = _BatchCache(state_dir, model, source, transfer, seed)
    curve_result = None
    with eval_mode(model, source, transfer):  # BN running statistics are used and never updated; modes restored
        t0 = time.time()
        cp = clean_pass(model, ctx.batch, n, batch_size, progress=progress, num_classes=num_classes)
        ctx.clean = cp.correct
        ctx.seconds[Row("natural")] = time.time() - t0
        rows = ctx.rows = [replace(r, targets=min(r.targets, cp.num_classes - 1)) if r.targets else r for r in rows]
        pgd_steps = [r.steps for r in rows if r.kind == "whitebox" and r.loss == "ce"]
        plan = _CurvePlan(eps, step_size, headline_steps(pgd_steps, headline), restarts) if curves else None
        _run_rows(ctx, [r for r in rows if r.kind in ATTACK_KINDS] + (plan.rows() if plan else []))
        for aa in (r for r in rows if r.kind == "autoattack"):
            t0 = time.time()
            ctx.flags[aa] = run_autoattack(
                model, x, y, ctx.clean, eps=aa.eps, seed=seed, batch_size=batch_size, device=device,
                channels_last=channels_last, state_dir=autoattack_dir, progress=progress,
                fingerprint=model_fingerprint(model), num_classes=cp.num_classes)
            ctx.seconds[aa] = time.time() - t0
        if plan is not None:
            curve_result = plan.finish(ctx, cp.num_classes)
    ctx.flags[Row("natural")] = ctx.clean
    return _result(ctx, rows, cp, curve_result, suite="custom" if custom else suite, eps=eps, step_size=step_size,
                   restarts=restarts, large_eps=large_eps)


def _check_models_for_rows(rows: list[Row], source, transfer) -> None:
    ids = [r.id for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:  # the id keys every output (per-example flags, the worst case's list): it must say which row
        raise ConfigError(f"rows share the id {', '.join(dup)}; give each row its own (e.g. one eps per row id)")
    if any(r.kind == "blackbox" for r in rows) and source is None:
        raise ConfigError("black-box rows need a source model (--source RUN_DIR)")
    if any(r.kind == "transfer" for r in rows) and transfer is None:
        raise ConfigError("transfer rows need a natural source model (--transfer-from RUN_DIR)")


def _result(ctx, rows, cp, curve_result, *, suite, eps, step_size, restarts, large_eps) -> dict[str, Any]:
    """The result dict: rows with intervals, the worst case, every check, per-example flags."""
    out_rows = [_summary(r, ctx.flags[r], ctx.seconds.get(r, 0.0)) for r in rows]
    worst = worst_case(out_rows, {r.id: ctx.flags[r] for r in rows}, eps)
    flags = {r.id: ctx.flags[r] for r in rows}
    if worst is not None:
        out_rows.insert(1, worst[0])
        flags["worst_case"] = worst[1]
    checks = precheck_results(cp) + masking_checks(out_rows)
    checks.append(steps_check(curve_result["steps"]["points"] if curve_result else _steps_points(out_rows)))
    checks += curve_checks(curve_result)
    res = {
        "settings": {
            "suite": suite, "eps": eps, "step_size": step_size,
            "restarts": restarts, "random_start": True, "bn_mode": "eval", "seed": ctx.seed,
            "batch_size": ctx.batch_size, "device": str(ctx.device), "large_eps": large_eps,
            "counting": "robust = clean prediction correct and adversarial prediction correct",
        },
        "n": ctx.n,
        "num_classes": cp.num_classes,
        "model_fingerprint": model_fingerprint(ctx.model),
        "source_fingerprint": model_fingerprint(ctx.source) if ctx.source is not None else None,
        "transfer_fingerprint": model_fingerprint(ctx.transfer) if ctx.transfer is not None else None,
        "rows": out_rows,
        "checks": checks,
        "masking_suspected": masking_suspected(checks),
        "per_example": flags,
    }
    if worst is not None:
        res.update(robust_acc=worst[0]["accuracy"], robust_acc_ci95=worst[0]["ci95"],
                   robust_acc_rows=worst[0]["combines"])
    if curve_result is not None:
        res["curves"] = curve_result
    return res


def _summary(r: Row, f: torch.Tensor, seconds: float) -> dict[str, Any]:
    correct, n = int(f.sum()), len(f)
    return {"id": r.id, "title": r.title, **asdict(r), "n": n, "correct": correct, "accuracy": correct / n,
            "ci95": list(wilson_interval(correct, n)), "seconds": round(seconds, 2)}


def worst_case(rows: list[dict], flags: dict[str, torch.Tensor], eps: float) -> tuple[dict, torch.Tensor] | None:
    """The worst-case row: per example robust only if robust under every white-box row at ``eps`` (PGD,
    CW, targeted, restarts, AutoAttack); None without such rows. Black-box, transfer and sanity rows
    are left out (other threat models or eps). ``flags``: row id -> per-example robust flags."""
    ids = [r["id"] for r in rows if r["kind"] in WORST_CASE_KINDS and math.isclose(r["eps"], eps, rel_tol=1e-9)]
    if not ids:
        return None
    f = torch.stack([flags[i] for i in ids]).all(0)
    row = _summary(Row("worst_case", eps=eps), f, 0.0)
    row["combines"] = ids
    return row, f


def _steps_points(rows: list[dict]) -> list[dict]:
    """The white-box PGD rows at the evaluated eps as points of a steps curve (nested by construction)."""
    wb = [r for r in rows if r["kind"] == "whitebox" and r["loss"] == "ce"]
    return [{"steps": r["steps"], "accuracy": r["accuracy"]} for r in sorted(wb, key=lambda r: r["steps"])]


class _Context:
    """What every attack row of one evaluation shares: models, data, batches, clean flags, results."""

    def __init__(self, model, source, transfer, x, y, batch_size, device, channels_last, seed, progress, rows):
        self.model, self.source, self.transfer = model, source, transfer
        self.x, self.y, self.n = x, y, len(y)
        self.batch_size, self.device, self.channels_last = batch_size, device, channels_last
        self.seed, self.progress, self.rows = seed, progress, rows
        self.cache: _BatchCache | None = None
        self.clean = torch.zeros(self.n, dtype=torch.bool)
        self.flags: dict[Row, torch.Tensor] = {}
        self.seconds: dict[Row, float] = {}

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        xb = self.x[i : i + self.batch_size]
        return to_float_images(xb, self.device, self.channels_last), self.y[i : i + self.batch_size].to(self.device)

    def attacker(self, row: Row) -> nn.Module:
        return {"blackbox": self.source, "transfer": self.transfer}.get(row.kind, self.model)


_ORDER = {"whitebox": 0, "sanity": 1, "blackbox": 2, "transfer": 3, "restarts": 4}
"""Restarts rows run last: they attack only the examples their single-start row left robust."""


def _run_rows(ctx: _Context, rows: list[Row]) -> None:
    """Compute every row not computed yet, one multi-budget run per group of rows."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r not in ctx.flags:
            groups.setdefault(r.group, []).append(r)
    for members in sorted(groups.values(), key=lambda m: _ORDER[m[0].kind]):
        _run_group(ctx, list(dict.fromkeys(members)))


class _BatchCache:
    """Finished batches of the PGD / CW rows on disk, keyed by everything their result depends on."""

    VERSION = "v2"  # v2: pruned PGD, targeted and restarts rows

    def __init__(self, state_dir: str | Path, model: nn.Module, source: nn.Module | None,
                 transfer: nn.Module | None, seed: int):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        fp = [model_fingerprint(m) if m is not None else "" for m in (model, source, transfer)]
        self.base = f"{self.VERSION}|{'|'.join(fp)}|{seed}"

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


def _restart_base(ctx: _Context, row: Row) -> Row:
    """The single-start white-box row a restarts row adds random starts to."""
    base = [r for r in ctx.flags if r.kind == "whitebox" and (r.loss, r.steps, r.eps, r.step_size) ==
            (row.loss, row.steps, row.eps, row.step_size) and r.restarts < row.restarts]
    if not base:
        raise ConfigError(f"row {row.id} needs the white-box row it adds restarts to "
                          f"(whitebox/{_ATTACK_NAMES[row.loss][0]}-{row.steps} at eps {row.eps:g})")
    return max(base, key=lambda r: r.restarts)


def _run_group(ctx: _Context, members: list[Row]) -> None:
    """One multi-budget PGD run per batch for rows that differ only in their step count.

    A restarts row runs its extra starts only on the examples its single-start row left robust and is
    that row's flags AND the extra starts' (exactly the worst case over all the starts)."""
    r0 = members[0]
    budgets = sorted({r.steps for r in members})
    robust = {k: torch.zeros(ctx.n, dtype=torch.bool) for k in budgets}
    base = _restart_base(ctx, r0) if r0.kind == "restarts" else None
    select = ctx.clean if base is None else ctx.clean & ctx.flags[base]
    desc = f"{r0.kind} {_ATTACK_NAMES[r0.loss][1]}-{'/'.join(map(str, budgets))}"
    tag = _seed_tag(repr(r0.group))
    t0 = time.time()
    for i in batch_starts(ctx.n, ctx.batch_size, desc=desc, progress=ctx.progress):
        idx = select[i : i + ctx.batch_size].nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        xb, yb = ctx.batch(i)
        dev_idx = idx.to(xb.device)
        xs, ys = xb[dev_idx], yb[dev_idx]
        path = ctx.cache.path(r0.group, budgets, i, xs, ys) if ctx.cache is not None else None
        batch_ok = ctx.cache.load(path, budgets, len(idx)) if path is not None else None
        if batch_ok is None:
            gen = torch.Generator(device=xs.device).manual_seed(derived_seed(ctx.seed, tag, i))
            batch_ok = _attack_batch(ctx, r0, budgets, xs, ys, gen, base)
            if path is not None:
                ctx.cache.save(path, batch_ok)
        for k, ok in batch_ok.items():
            robust[k][i + idx] = ok
    reported = [r for r in members if r in ctx.rows]  # the curves' extra budgets cost (almost) nothing more
    per_row = (time.time() - t0) / max(len(reported), 1)
    for r in members:
        ctx.flags[r], ctx.seconds[r] = robust[r.steps], per_row


def _attack_batch(ctx: _Context, r0: Row, budgets: list[int], xs, ys, gen, base: Row | None
                  ) -> dict[int, torch.Tensor]:
    """{budget: per-example robust flags (CPU)} of one batch of correctly classified examples."""
    if r0.loss == TARGETED:
        return {r0.steps: targeted_robust(ctx.model, xs, ys, r0, gen, check_adversary)}
    last_iterate = r0.kind in ("blackbox", "transfer")  # crafted on another model: its last iterate (Madry et al.)
    advs = pgd_budgets(ctx.attacker(r0), xs, ys, eps=r0.eps, step_size=r0.step_size, budgets=budgets,
                       restarts=r0.restarts - (base.restarts if base is not None else 0),
                       random_start=r0.random_start, loss=r0.loss, bn_mode=r0.bn_mode, generator=gen,
                       keep_best=not last_iterate, prune=True)
    out = {}
    for k, xa in advs.items():
        check_adversary(xs, xa, r0.eps)
        with torch.no_grad():
            out[k] = predicts(ctx.model(xa), ys).cpu()
    return out


class _CurvePlan:
    """The rows behind the robustness curves (``eval.curves``) and, once computed, their points."""

    def __init__(self, eps: float, step_size: float, steps: int, restarts: int):
        self.eps, self.step_size, self.steps, self.restarts = eps, step_size, steps, restarts
        self.factors = list(EPS_FACTORS)

    def eps_row(self, f: float) -> Row:
        # f = 1 gives exactly the suite's own PGD row at the evaluated eps (same seeds: computed once)
        return Row("whitebox", "ce", self.steps, self.eps * f, self.step_size * f, self.restarts)

    def steps_rows(self) -> list[Row]:
        return [Row("whitebox", "ce", k, self.eps, self.step_size, self.restarts) for k in STEPS_GRID]

    def rows(self) -> list[Row]:
        return self.steps_rows() + [self.eps_row(f) for f in self.factors]

    def finish(self, ctx: _Context, num_classes: int) -> dict[str, Any]:
        """Extend the eps curve until it reaches chance (or EPS_CAP), then the points of both curves."""
        chance = 1.0 / num_classes
        pts = self._eps_points(ctx)
        while not reached_chance(pts, chance) and (f := next_factor(self.eps, self.factors[-1])) is not None:
            self.factors.append(f)
            _run_rows(ctx, [self.eps_row(f)])
            pts = self._eps_points(ctx)
        return {
            "eps": {"steps": self.steps, "step_ratio": self.step_size / self.eps, "eps0": self.eps,
                    "chance": chance, "restarts": self.restarts, "points": pts},
            "steps": {"eps": self.eps, "step_size": self.step_size, "restarts": self.restarts, "chance": chance,
                      "points": [point(r.steps, ctx.flags[r], "steps") for r in self.steps_rows()]},
        }

    def _eps_points(self, ctx: _Context) -> list[dict]:
        return [point(0.0, ctx.clean, "eps")] + [point(self.eps * f, ctx.flags[self.eps_row(f)], "eps")
                                                 for f in self.factors]


def replace_eps(rows: Sequence[Row], eps: float, step_size: float) -> list[Row]:
    """The same rows with another eps / step size (the sanity row keeps its own)."""
    return [r if r.kind in ("natural", "sanity") else replace(r, eps=eps, step_size=step_size) for r in rows]


def to_json(result: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in result.items() if k != "per_example"}, indent=2)
