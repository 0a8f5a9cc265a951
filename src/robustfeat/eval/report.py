"""Reports of an evaluation result (``robustfeat.eval.suite``): eval.md (the paper's layout, with the
published numbers beside ours) and eval.csv; and the percentage formatter every report uses."""

from __future__ import annotations

import csv
import io
from typing import Any

_KIND_ORDER = {"natural": 0, "worst_case": 1, "whitebox": 2, "restarts": 3, "autoattack": 4, "blackbox": 5,
               "transfer": 6, "sanity": 7}
_LOSS_ORDER = {"ce": 0, "cw": 1}


def ordered_rows(result: dict[str, Any]) -> list[dict]:
    """Natural, the worst case, white box (PGD by steps, CW, targeted), restarts, AutoAttack, black box
    (PGD, CW), transfer, sanity: the paper's order, with the rows it does not have in between."""
    return sorted(result["rows"], key=lambda r: (_KIND_ORDER[r["kind"]], _LOSS_ORDER.get(r["loss"], 2), r["steps"]))


def percent(value: float | None, *, scale: float = 100.0, unit: str = "%", missing: str = "-") -> str:
    """``value * scale`` with two decimals and ``unit`` (0.1234 -> '12.34%'); ``missing`` for None.
    ``scale=1`` formats a number that is already in points."""
    return missing if value is None else f"{value * scale:.2f}{unit}"


def render_markdown(result: dict[str, Any]) -> str:
    paper = result.get("paper")
    m = result.get("model", {})
    s = result["settings"]
    lines = [f"# Robustness evaluation: {m.get('preset') or m.get('factory') or 'model'}", ""]
    if m.get("factory"):
        lines.append(f"- model: `{m['factory']}` on {m.get('dataset')}, weights `{m.get('checkpoint')}` "
                     f"(sha256 {m.get('sha256', '')[:16]})")
    elif m.get("checkpoint"):
        lines.append(f"- checkpoint: `{m['checkpoint']}` (step {m.get('step')}, sha256 {m.get('sha256', '')[:16]})")
    if result.get("source"):
        src = result["source"]
        lines.append(f"- black-box source: `{src.get('checkpoint')}` (seed {src.get('seed')})")
    if result.get("transfer_source"):
        src = result["transfer_source"]
        lines.append(f"- transfer source: `{src.get('checkpoint')}` (method {src.get('method')})")
    lines.append(f"- {result['n']:,} test examples ({result.get('subset', 'full test set')}); "
                 f"eps {s['eps']:.6g}, step {s['step_size']:.6g}, restarts {s['restarts']}, random start, "
                 f"seed {s['seed']}")
    lines.append("- an example counts as robust only if its clean image is also classified correctly")
    if result.get("produced_by"):
        by = result["produced_by"]
        lines.append(f"- computed by robustfeat {by['robustfeat']} at `{by['git_revision']}`, torch {by['torch']}")
    lines += _headline(result)
    head = ["Method", "Ours", "95% CI", "n"]
    if paper:
        head.append(f"Paper ({paper['table']}, {paper['column']})")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ordered_rows(result):
        lo, hi = r["ci95"]
        cells = [r["title"], percent(r["accuracy"], missing=""), f"{100 * lo:.2f}-{100 * hi:.2f}", f"{r['n']:,}"]
        if paper:
            cells.append(percent(paper["rows"].get(r["id"]), scale=1, missing=""))
        lines.append("| " + " | ".join(cells) + " |")
    if paper and paper.get("note"):
        lines += ["", f"Note: {paper['note']}"]
    lines += _curves(result)
    lines += ["", "## Checks (before attacking, gradient masking, attack strength)", "",
              "| check | status | detail |", "|---|---|---|"]
    for c in result["checks"]:
        status = "**FLAGGED**" if c["status"] == "flagged" else c["status"]
        lines.append(f"| {c['name']} | {status} | {c['detail']} |")
    verdict = ("gradient masking suspected: the white-box numbers above are not trustworthy"
               if result["masking_suspected"] else "no sign of gradient masking in the checks that ran")
    lines += ["", f"Verdict: {verdict}.", ""]
    return "\n".join(lines)


def _headline(result: dict[str, Any]) -> list[str]:
    """The robust accuracy: the per-example worst case, and the rows it combines."""
    if result.get("robust_acc") is None:
        return []
    lo, hi = result["robust_acc_ci95"]
    return ["", f"**Robust accuracy: {percent(result['robust_acc'])}** (95% CI {100 * lo:.2f}-{100 * hi:.2f}), "
                f"per example the worst case over {len(result['robust_acc_rows'])} white-box rows at eps "
                f"{result['settings']['eps']:.6g}: " + ", ".join(f"`{i}`" for i in result["robust_acc_rows"]) + "."]


def _curves(result: dict[str, Any]) -> list[str]:
    c = result.get("curves")
    if not c:
        return []
    e, s = c["eps"], c["steps"]
    eps_pts = ", ".join(f"{p['eps']:.4g}: {percent(p['accuracy'])}" for p in e["points"])
    steps_pts = ", ".join(f"{p['steps']}: {percent(p['accuracy'])}" for p in s["points"])
    by_eps = (f"- against eps (PGD-{e['steps']}, step {e['step_ratio']:.3g} x eps; chance "
              f"{percent(e['chance'])}): {eps_pts} (`curve_eps.png`, `curve_eps.csv`)")
    by_steps = (f"- against PGD steps (eps {s['eps']:.6g}, step {s['step_size']:.6g}): {steps_pts} "
                "(`curve_steps.png`, `curve_steps.csv`)")
    return ["", "## Robustness curves", "", by_eps, by_steps]


CSV_FIELDS = ("id", "title", "kind", "loss", "steps", "eps", "step_size", "restarts", "n", "correct",
              "accuracy", "ci95_low", "ci95_high", "paper", "seconds")


def render_csv(result: dict[str, Any]) -> str:
    paper = (result.get("paper") or {}).get("rows", {})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in ordered_rows(result):
        p = paper.get(r["id"])
        w.writerow([r["id"], r["title"], r["kind"], r["loss"], r["steps"], f"{r['eps']:.8g}",
                    f"{r['step_size']:.8g}", r["restarts"], r["n"], r["correct"], f"{r['accuracy']:.6f}",
                    f"{r['ci95'][0]:.6f}", f"{r['ci95'][1]:.6f}", "" if p is None else f"{p / 100:.4f}",
                    r["seconds"]])
    return buf.getvalue()
