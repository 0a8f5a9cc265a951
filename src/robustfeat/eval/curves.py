"""Robustness curves (``robustfeat eval --curves``): accuracy against eps and against PGD steps, with
95% Wilson bands, as numbers, CSV and PNG, and the checks they support.

* **eps curve**: PGD-K (K = the suite's headline steps: 20 on CIFAR, 40 on MNIST) at eps = f * eps0
  for f in ``EPS_FACTORS`` (0 to 2x the evaluated eps), with the step size scaled by the same f, so the
  point at eps0 is the suite's own PGD-K row. While the last point is above chance (1 / classes) the
  curve is extended by doubling eps up to ``EPS_CAP`` (0.5: there every image can be moved to uniform
  grey, so a working attack leaves at most one class's share). Each point attacks every correctly
  classified example afresh (no cascade across eps, so a rise with eps stays visible).
* **steps curve**: PGD at the evaluated eps and step after 1 to 200 steps (``STEPS_GRID``, log
  spaced), read off one keep-best trajectory (the suite's PGD group), so it costs one PGD-200 run and
  is non-increasing by construction.

Checks: ``eps_curve_reaches_chance`` (flagged if no point's 95% interval reaches chance),
``eps_curve_non_increasing`` (flagged if a point lies above the 95% interval of a smaller eps),
``steps_curve_converged`` (flagged if the last doubling of steps, 100 -> 200, still lowers accuracy by
more than ``STILL_FALLING``). This module holds the arithmetic and the files; ``eval.suite`` runs the
attacks.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write_bytes, atomic_write_text
from .stats import wilson_interval

EPS_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
"""Multiples of the evaluated eps on the eps curve (0 is the natural row)."""
EPS_CAP = 0.5
STEPS_GRID = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200)
STILL_FALLING = 0.01
"""Accuracy drop over the last doubling of PGD steps above which the attack had not converged."""


def next_factor(eps: float, last: float) -> float | None:
    """The eps factor after ``last`` when the curve has not reached chance: doubled, at most EPS_CAP / eps
    (None once the cap is reached)."""
    if eps <= 0 or eps * last >= EPS_CAP - 1e-12:
        return None
    return min(2 * last, EPS_CAP / eps)


def point(x: float, flags: torch.Tensor, key: str) -> dict[str, Any]:
    """One point of a curve: ``key`` (eps or steps) = x, with its accuracy and 95% interval."""
    n, correct = len(flags), int(flags.sum())
    return {key: x, "n": n, "correct": correct, "accuracy": correct / n, "ci95": list(wilson_interval(correct, n))}


def reached_chance(points: list[dict], chance: float) -> bool:
    return any(p["ci95"][0] <= chance for p in points)


def curve_checks(curves: dict[str, Any] | None) -> list[dict]:
    """The eps curve's two checks; ``skipped`` without curves."""
    if not curves or "eps" not in curves:
        why = "no curves (evaluate with --curves)"
        return [{"name": n, "status": "skipped", "detail": why}
                for n in ("eps_curve_reaches_chance", "eps_curve_non_increasing")]
    c = curves["eps"]
    pts, chance = c["points"], c["chance"]
    last = pts[-1]
    ok = reached_chance(pts, chance)
    checks = [{"name": "eps_curve_reaches_chance", "status": "pass" if ok else "flagged",
               "detail": f"PGD-{c['steps']} at eps {last['eps']:.4g}: {last['accuracy']:.2%} (95% CI from "
                         f"{last['ci95'][0]:.2%}); chance {chance:.2%}" + (
                             "" if ok else ": a larger eps does not break the model, so the attack is failing")}]
    rises = [f"eps {b['eps']:.4g}: {b['accuracy']:.2%} > {a['ci95'][1]:.2%} (CI top at eps {a['eps']:.4g})"
             for i, a in enumerate(pts) for b in pts[i + 1 :] if b["accuracy"] > a["ci95"][1]]
    checks.append({"name": "eps_curve_non_increasing", "status": "flagged" if rises else "pass",
                   "detail": "; ".join(rises[:3]) if rises else
                   f"no point above the 95% interval of a smaller eps ({len(pts)} points)"})
    return checks


def steps_check(points: list[dict] | None) -> dict:
    """``steps_curve_converged`` from points {steps, accuracy, correct, n} of one nested trajectory: the
    drop from the largest step count at most half the last one to the last one."""
    if not points or len(points) < 2:
        return {"name": "steps_curve_converged", "status": "skipped",
                "detail": "fewer than two PGD step counts a factor 2 apart"}
    last = points[-1]
    half = [p for p in points if p["steps"] <= last["steps"] / 2]
    if not half:
        return {"name": "steps_curve_converged", "status": "skipped",
                "detail": "no PGD step count at most half the largest"}
    h = half[-1]
    drop = h["accuracy"] - last["accuracy"]
    bad = drop > STILL_FALLING
    return {"name": "steps_curve_converged", "status": "flagged" if bad else "pass",
            "detail": f"PGD-{h['steps']} {h['accuracy']:.2%} -> PGD-{last['steps']} {last['accuracy']:.2%} "
                      f"(drop {100 * drop:.2f} points, limit {100 * STILL_FALLING:g})"
                      + ("; more steps would lower it further" if bad else "")}


# ---------------------------------------------------------------------------------------------------------
# files


def render_csv(points: list[dict], key: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([key, "n", "correct", "accuracy", "ci95_low", "ci95_high"])
    for p in points:
        w.writerow([f"{p[key]:.8g}", p["n"], p["correct"], f"{p['accuracy']:.6f}", f"{p['ci95'][0]:.6f}",
                    f"{p['ci95'][1]:.6f}"])
    return buf.getvalue()


def _plot(points: list[dict], key: str, *, xlabel: str, title: str, chance: float | None, mark: float | None,
          log: bool = False) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 255.0 if key == "eps" and mark and mark < 0.1 and abs(mark * 255 - round(mark * 255)) < 1e-6 else 1.0
    if scale != 1.0:  # CIFAR-style radii read best in 1/255 units
        xlabel, mark = f"{xlabel}, in units of 1/255", mark * scale
    xs = [scale * p[key] for p in points]
    acc = [100 * p["accuracy"] for p in points]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.fill_between(xs, [100 * p["ci95"][0] for p in points], [100 * p["ci95"][1] for p in points], color="C0",
                    alpha=0.25, linewidth=0, label="95% Wilson interval")
    ax.plot(xs, acc, "o-", color="C0", markersize=3.5, linewidth=1.3, label="accuracy")
    if chance is not None:
        ax.axhline(100 * chance, color="0.4", linestyle=":", linewidth=1, label=f"chance ({100 * chance:.3g}%)")
    if mark is not None:
        ax.axvline(mark, color="C3", linestyle="--", linewidth=1, label=f"evaluated {key} ({mark:.4g})")
    if log:
        ax.set_xscale("log")
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if min(xs) <= t <= max(xs)]
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_ylim(-2, 102)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _eps_text(v: float) -> str:
    """8/255 for a radius on the 8-bit grid below 0.1 (CIFAR's), else the number."""
    k = v * 255
    return f"{round(k)}/255" if v < 0.1 and abs(k - round(k)) < 1e-6 else f"{v:.4g}"


def write_curves(out: str | os.PathLike, curves: dict[str, Any]) -> list[Path]:
    """curve_eps.csv/.png and curve_steps.csv/.png under ``out``, each written atomically."""
    out = Path(out)
    written = []
    for name, c in curves.items():
        key = "eps" if name == "eps" else "steps"
        if name == "eps":
            title = f"PGD-{c['steps']} (step {c['step_ratio']:.3g} x eps) against eps"
            png = _plot(c["points"], key, xlabel="eps (l_inf)", title=title, chance=c["chance"], mark=c["eps0"])
        else:
            title = f"PGD at eps {_eps_text(c['eps'])} (step {_eps_text(c['step_size'])}) against its steps"
            png = _plot(c["points"], key, xlabel="PGD steps", title=title, chance=c.get("chance"), mark=None,
                        log=True)
        atomic_write_text(out / f"curve_{name}.csv", render_csv(c["points"], key))
        atomic_write_bytes(out / f"curve_{name}.png", png)
        written += [out / f"curve_{name}.csv", out / f"curve_{name}.png"]
    return written
