"""Per-seed results of finished runs as a markdown table, and a summary line over them.

    python scripts/seed_table.py RUN_DIR [RUN_DIR ...] [--target 0.89]

Each RUN_DIR is a robustfeat run directory with run.json, config.yaml, metrics.jsonl and
eval/eval.json (the `robustfeat eval RUN_DIR --suite quick --n 10000` of its best checkpoint). One
row per run: seed, torch threads and git revision of the last training session, training wall time,
the first validation at or above the target (its step and the training time to it), the best
validation, and the test clean and PGD accuracy with the 95% interval of the PGD accuracy. The
summary counts the runs whose test PGD accuracy reaches the target.

Two columns look for gradient masking. "GradAlign 1-cos" is the mean of the training log's
`grad_align` term over the last 1,000 steps (absent without method.grad_align). "PGD-40 /
AutoAttack" is read from RUN_DIR/eval-full/eval.json (`robustfeat eval RUN_DIR --suite full --out
RUN_DIR/eval-full`) when it exists and has an AutoAttack row.

Only the files are read: nothing is imported from robustfeat, so the script works on run
directories of any revision.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

GRAD_ALIGN_WINDOW = 1000  # training steps averaged for the GradAlign column


def _records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _seed(run_dir: Path) -> int | str:
    for line in (run_dir / "config.yaml").read_text().splitlines():
        if line.strip().startswith("seed:"):
            return int(line.split(":", 1)[1])
    return "?"


def _full(run_dir: Path) -> tuple[int, float, float] | None:
    """(n, PGD-40, AutoAttack) of the run's `eval --suite full`, if it has one with an AutoAttack row."""
    path = run_dir / "eval-full" / "eval.json"
    if not path.exists():
        return None
    rows = {r["id"]: r for r in json.loads(path.read_text())["rows"]}
    if "autoattack" not in rows:
        return None
    return rows["autoattack"]["n"], rows["whitebox/pgd-40"]["accuracy"], rows["autoattack"]["accuracy"]


def _grad_align(rows: list[dict[str, Any]]) -> float | None:
    train = [r for r in rows if r["kind"] == "train"]
    last_step = max(r["step"] for r in train)
    ga = [r["grad_align"] for r in train if r["step"] > last_step - GRAD_ALIGN_WINDOW and "grad_align" in r]
    return statistics.mean(ga) if ga else None


def one_run(run_dir: Path, target: float) -> dict[str, Any]:
    """The numbers of one row of the table."""
    sessions = json.loads((run_dir / "run.json").read_text())["sessions"]
    rows = _records(run_dir)
    vals = [r for r in rows if r["kind"] == "eval" and r.get("split") == "val"]
    first = next((r for r in vals if r["pgd_acc"] >= target), None)
    best = max(vals, key=lambda r: r["pgd_acc"])
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    return {
        "run": run_dir.name,
        "seed": _seed(run_dir),
        "threads": sessions[-1]["machine"]["threads"],
        "revision": sessions[-1]["git_revision"][:7],
        "resumed": len(sessions) > 1,
        "wall_min": sum(s["wall_seconds"] for s in sessions) / 60,
        # wall_s counts the run's training time so far, so it is the time a user waits for that line
        "first": None if first is None else (first["step"], first["wall_s"] / 60),
        "best": (best["step"], best["pgd_acc"]),
        "clean": ev["clean_acc"],
        "pgd": ev["pgd_acc"],
        "ci": ev["pgd_acc_ci95"],
        "grad_align": _grad_align(rows),
        "full": _full(run_dir),
    }


def _full_cell(full: tuple[int, float, float] | None) -> str:
    if full is None:
        return "-"
    n, pgd, aa = full
    return f"{pgd * 100:.2f} / {aa * 100:.2f}% ({n})"


def _row(r: dict[str, Any]) -> str:
    first = "never" if r["first"] is None else f"{r['first'][0]:,}, {r['first'][1]:.1f} min"
    resumed = " (resumed)" if r["resumed"] else ""
    ga = "-" if r["grad_align"] is None else format(r["grad_align"], ".2f")
    lo, hi = r["ci"]
    return (f"| `{r['run']}` | {r['seed']} | {r['threads']} | {r['revision']} | {r['wall_min']:.1f} min{resumed} "
            f"| {first} | {r['best'][1] * 100:.1f}% ({r['best'][0]:,}) | {r['clean'] * 100:.2f}% "
            f"| **{r['pgd'] * 100:.2f}%** ({lo * 100:.2f}-{hi * 100:.2f}) | {ga} | {_full_cell(r['full'])} |")


def table(runs: list[dict[str, Any]], target: float) -> str:
    """The markdown table and the summary line."""
    pct = f"{target * 100:g}%"
    lines = [
        (f"| run | seed | threads | rev | training | validation first >= {pct} (step, min) "
         "| best validation (step) | test clean | test PGD-40 (95% CI) | GradAlign 1-cos "
         "| PGD-40 / AutoAttack (n) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in runs),
        "",
    ]
    pgds = [r["pgd"] for r in runs]
    passed = sum(p >= target for p in pgds)
    lines.append(f"{len(runs)} runs: test PGD-40 mean {statistics.mean(pgds) * 100:.2f}%, "
                 f"min {min(pgds) * 100:.2f}%, max {max(pgds) * 100:.2f}%; "
                 f"{passed} of {len(runs)} at or above {pct}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--target", type=float, default=0.89, help="test PGD-40 goal (default 0.89)")
    args = ap.parse_args(argv)
    print(table([one_run(d, args.target) for d in args.runs], args.target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
