"""The checks of an evaluation: of what it is given, before anything runs or is written (settings,
images, labels), and of its result (signs of gradient masking, whether a black-box source is
independent of the evaluated model). (The checks made before attacking are in ``eval.precheck``,
those of the robustness curves in ``eval.curves``.)


Input checks raise a one-line ConfigError (settings) or DataError (images, labels), so that no number
is ever computed from what cannot be meant: a negative batch size (no batch at all: 0% on every
row), labels the model has no class for (0%), images in [0, 255] (which an attack's validity check
would blame on the attack). Result checks are dicts {"name", "status": "pass" | "flagged" |
"skipped", "detail"}; a result whose checks flag anything is reported with ``masking_suspected`` and
a warning verdict.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from ..attacks import eval_mode
from ..config import MAX_SEED, ConfigError
from ..data import DataError, to_float_images

# ---------------------------------------------------------------------------------------------------------
# inputs


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_settings(*, eps: Any, step_size: Any, restarts: Any = 1, batch_size: Any = None, seed: Any = 0,
                   n: Any = None) -> None:
    """ConfigError for an evaluation setting that cannot be meant, named as the Python argument and the
    command-line flag."""
    for name, v in (("eps", eps), ("step_size", step_size)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise ConfigError(f"{_flag(name, v)} is invalid: expected a number in [0, 1] pixel units "
                              "(e.g. 8/255 = 0.0314)")
    if step_size is not None and step_size <= 0:
        raise ConfigError(f"{_flag('step_size', step_size)} is invalid: expected a positive step, e.g. 2/255")
    for name, v in (("restarts", restarts), ("batch_size", batch_size), ("n", n)):
        if v is not None and (not _is_int(v) or v < 1):
            raise ConfigError(f"{_flag(name, v)} is invalid: expected an integer >= 1")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{_flag('seed', seed)} is invalid: expected an integer in [0, 2**64 - 1]")


def _flag(name: str, v: Any) -> str:
    return f"{name}={v!r} (--{name.replace('_', '-')})"


def _range(x: torch.Tensor) -> tuple[float, float]:
    return float(x.min()), float(x.max())


def check_images(x: Any, y: Any) -> None:
    """DataError unless ``x`` is (N, C, H, W) uint8 or finite float in [0, 1] and ``y`` (N,) integer labels."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise DataError(f"x has shape {tuple(getattr(x, 'shape', ()))}: expected a tensor of images (N, C, H, W)")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"y must be a 1-D tensor of integer labels, got {getattr(y, 'dtype', type(y).__name__)} "
                        f"of shape {tuple(getattr(y, 'shape', ()))}")
    if len(x) != len(y):
        raise DataError(f"x holds {len(x)} images but y {len(y)} labels")
    if len(y) == 0:
        raise DataError("nothing to evaluate: 0 examples")
    if x.dtype == torch.uint8:
        return
    if not x.dtype.is_floating_point:
        raise DataError(f"x has dtype {x.dtype}: expected float images in [0, 1] or uint8 0-255")
    if not torch.isfinite(x).all():
        raise DataError("x holds non-finite values (nan or inf)")
    lo, hi = _range(x)
    if lo < 0 or hi > 1:
        hint = "; divide by 255" if hi > 1.5 else ""
        raise DataError(f"x holds values from {lo:g} to {hi:g}: expected float images in [0, 1] (or uint8 "
                        f"0-255){hint}")


def model_classes(model: nn.Module, x: torch.Tensor, device: torch.device, channels_last: bool,
                  what: str = "the model") -> int:
    """The number of classes ``model`` gives for images like ``x`` (one forward pass of one image),
    with a DataError when it cannot take them."""
    xb = to_float_images(x[:1], device, channels_last)
    try:
        with eval_mode(model), torch.no_grad():
            logits = model(xb)
    except (RuntimeError, ValueError) as e:
        raise DataError(f"{what} cannot take images of shape {tuple(x.shape[1:])} (C, H, W): "
                        f"{' '.join(str(e).split())[:200]}") from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise DataError(f"{what} returns {tuple(getattr(logits, 'shape', ()))} for one image; expected logits "
                        "(1, classes)")
    return int(logits.shape[1])


def check_labels(y: torch.Tensor, classes: int) -> None:
    """DataError for a label the model has no class for (it would count as wrong, whatever the model does)."""
    lo, hi = _range(y)
    if lo < 0 or hi >= classes:
        bad = int(lo) if lo < 0 else int(hi)
        raise DataError(f"y holds label {bad}, but the model gives {classes} classes (0-{classes - 1}): the "
                        "labels do not belong to this model's data")


# ---------------------------------------------------------------------------------------------------------
# results


LARGE_EPS_MAX_ACC = 0.05
"""The large-eps PGD row must bring accuracy to at most this, else gradient masking is suspected."""
AA_GAP = 0.05
"""AutoAttack more than this below the strongest PGD row is flagged."""
BLACKBOX_TOL = 0.01
"""Black-box accuracy more than this below the white-box accuracy of the same attack is flagged."""


def masking_checks(rows: list[dict]) -> list[dict]:
    """Signs of gradient masking in a result's rows; each check is 'pass', 'flagged' or 'skipped'.

    1. accuracy never rises with more PGD (or CW) steps; 2. black-box accuracy not below white-box
    (more than BLACKBOX_TOL); 3. PGD with a large eps drives accuracy to at most LARGE_EPS_MAX_ACC;
    4. AutoAttack not more than AA_GAP below the strongest white-box PGD row; 5. more random restarts
    stay inside the single start's 95% interval; 6. the targeted row not more than AA_GAP below the
    strongest PGD row; 7. a transfer attack from a natural model not stronger than the white-box one.
    """
    checks = _monotone_and_blackbox(rows) + [_large_eps(rows), _autoattack(rows), _restarts(rows),
                                             _targeted(rows), _transfer(rows)]
    return checks


def _check(name: str, status: str, detail: str) -> dict:
    return {"name": name, "status": status, "detail": detail}


def _strongest_pgd(rows: list[dict]) -> dict | None:
    wb = [r for r in rows if r["kind"] == "whitebox" and r["loss"] == "ce"]
    return max(wb, key=lambda r: r["steps"]) if wb else None


def _monotone_and_blackbox(rows: list[dict]) -> list[dict]:
    by_id = {r["id"]: r for r in rows}
    checks = []

    def add(name: str, status: str, detail: str) -> None:
        checks.append(_check(name, status, detail))

    for loss, label in (("ce", "PGD"), ("cw", "CW")):
        wb = sorted((r for r in rows if r["kind"] == "whitebox" and r["loss"] == loss), key=lambda r: r["steps"])
        if len(wb) < 2:
            add(f"monotone_{label.lower()}", "skipped", f"fewer than two white-box {label} rows")
            continue
        rises = [f"{a['steps']}->{b['steps']} steps: {a['accuracy']:.2%} -> {b['accuracy']:.2%}"
                 for a, b in itertools.pairwise(wb) if b["correct"] > a["correct"]]
        add(f"monotone_{label.lower()}", "flagged" if rises else "pass",
            ("accuracy rises with more steps (" + "; ".join(rises) + ")") if rises
            else f"accuracy non-increasing over {label}-" + "/".join(str(r["steps"]) for r in wb))

    pairs = [(by_id[r["id"].replace("blackbox/", "whitebox/")], r) for r in rows
             if r["kind"] == "blackbox" and r["id"].replace("blackbox/", "whitebox/") in by_id]
    if not pairs:
        add("blackbox_not_below_whitebox", "skipped", "no black-box rows (evaluate with --source)")
    else:
        low = [f"{b['title']}: {b['accuracy']:.2%} < white box {w['accuracy']:.2%}"
               for w, b in pairs if b["accuracy"] < w["accuracy"] - BLACKBOX_TOL]
        add("blackbox_not_below_whitebox", "flagged" if low else "pass",
            "; ".join(low) if low else f"every black-box row >= its white-box row - {BLACKBOX_TOL:.0%}")
    return checks


def _large_eps(rows: list[dict]) -> dict:
    sanity = [r for r in rows if r["kind"] == "sanity"]
    if not sanity:
        return _check("large_eps_near_zero", "skipped", "no large-eps row (suite paper or full)")
    s = sanity[0]
    bad = s["accuracy"] > LARGE_EPS_MAX_ACC
    return _check("large_eps_near_zero", "flagged" if bad else "pass",
                  f"PGD-{s['steps']} with eps {s['eps']:g}: {s['accuracy']:.2%} "
                  f"({'above' if bad else 'at most'} {LARGE_EPS_MAX_ACC:.0%})")


def _below_pgd(name: str, row: dict | None, label: str, missing: str, rows: list[dict]) -> dict:
    """A stronger attack (``row``) may not beat the strongest white-box PGD by more than AA_GAP: if it
    does, PGD overstates robustness (the usual sign of gradient masking)."""
    strongest = _strongest_pgd(rows)
    if row is None or strongest is None:
        return _check(name, "skipped", missing if row is None else "no PGD row")
    gap = strongest["accuracy"] - row["accuracy"]
    return _check(name, "flagged" if gap > AA_GAP else "pass",
                  f"{label} {row['accuracy']:.2%} vs PGD-{strongest['steps']} {strongest['accuracy']:.2%} "
                  f"(gap {gap * 100:.2f} points, limit {AA_GAP * 100:g})")


def _autoattack(rows: list[dict]) -> dict:
    aa = next((r for r in rows if r["id"] == "autoattack"), None)
    return _below_pgd("autoattack_vs_pgd", aa, "AutoAttack", "no AutoAttack row (suite full)", rows)


def _restarts(rows: list[dict]) -> dict:
    """More random starts must not lower accuracy below the single start's 95% interval: if they do,
    where PGD ends depends on where it starts, so one start understates what the attack can do."""
    by_key = {(r["loss"], r["steps"], r["eps"]): r for r in rows if r["kind"] == "whitebox"}
    pairs = [(by_key[k], r) for r in rows if r["kind"] == "restarts"
             and (k := (r["loss"], r["steps"], r["eps"])) in by_key]
    if not pairs:
        return _check("restarts_stable", "skipped", "no restarts row (suite paper or full)")
    low = [(b, r) for b, r in pairs if r["accuracy"] < b["ci95"][0]]
    detail = "; ".join(f"{r['restarts']} restarts {r['accuracy']:.2%} vs {b['restarts']} "
                       f"{b['accuracy']:.2%} (95% CI {b['ci95'][0]:.2%}-{b['ci95'][1]:.2%}) of "
                       f"{_name(r)}-{r['steps']}" for b, r in (low or pairs))
    return _check("restarts_stable", "flagged" if low else "pass", detail)


def _targeted(rows: list[dict]) -> dict:
    t = next((r for r in rows if r["kind"] == "whitebox" and r["loss"] == "targeted"), None)
    label = f"targeted PGD-{t['steps']} (top {t['targets']} classes)" if t else ""
    return _below_pgd("targeted_vs_pgd", t, label, "no targeted row (suite full)", rows)


def _transfer(rows: list[dict]) -> dict:
    """Adversaries of an undefended model must fool the evaluated model less than its own gradients do."""
    by_key = {(r["loss"], r["steps"], r["eps"]): r for r in rows if r["kind"] == "whitebox"}
    pairs = [(by_key[k], r) for r in rows if r["kind"] == "transfer"
             and (k := (r["loss"], r["steps"], r["eps"])) in by_key]
    if not pairs:
        return _check("transfer_weaker_than_whitebox", "skipped", "no transfer row (evaluate with --transfer-from)")
    w, t = pairs[0]
    bad = t["accuracy"] < w["accuracy"] - BLACKBOX_TOL
    return _check("transfer_weaker_than_whitebox", "flagged" if bad else "pass",
                  f"transfer {t['accuracy']:.2%} vs white box {w['accuracy']:.2%} ({_name(t)}-{t['steps']}; "
                  f"limit {BLACKBOX_TOL:.0%} below)")


def _name(r: dict) -> str:
    return {"ce": "PGD", "cw": "CW"}.get(r["loss"], r["loss"])


def independent_source_check(source: dict, target: dict) -> dict:
    """The black-box source should be an independently trained copy: same preset, another seed
    (``source`` / ``target``: the two checkpoints' identities)."""
    same_seed = source["seed"] == target["seed"]
    return {"name": "independent_source", "status": "flagged" if same_seed else "pass",
            "detail": f"source seed {source['seed']}, target seed {target['seed']}; source preset "
                      f"{source['preset']!r}, target {target['preset']!r}"}


def masking_suspected(checks: list[dict]) -> bool:
    return any(c["status"] == "flagged" for c in checks)
