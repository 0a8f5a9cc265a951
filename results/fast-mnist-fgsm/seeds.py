"""One line per run of the MNIST fast budget, and a summary over them, as a markdown table.

    python results/fast-mnist-fgsm/seeds.py RUN_DIR [RUN_DIR ...] [--target 0.89]

Each RUN_DIR holds run.json, metrics.jsonl and eval/eval.json (the `eval --suite quick --n 10000`
of its best checkpoint). Per run: training wall time and threads, the first validation at or above
the target (its step and the wall time to it; validation uses 1,000 held-out training images, so
this is where a user watching the log would see the goal met), the best validation, and the test
clean and PGD-40 accuracy with its 95% interval. The summary counts the runs whose test PGD-40
reaches the target.

Two columns look for gradient masking. "GradAlign 1-cos" is the training log's GradAlign term,
mean(1 - cos(grad at x, grad at x + uniform noise)), averaged over the last 1,000 steps: near 1 the
input gradient turns inside the eps-ball (a strongly non-linear loss there). "AutoAttack"
is read from RUN_DIR/eval-full/eval.json (`eval --suite full`, on its own image sample) when it
exists, with that sample's PGD-40 beside it.
"""

import argparse
import json
import statistics
from pathlib import Path


def one_run(run_dir: Path, target: float) -> dict:
    info = json.loads((run_dir / "run.json").read_text())
    sessions = info["sessions"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r for r in rows if r["kind"] == "eval" and r.get("split") == "val"]
    first = next((r for r in vals if r["pgd_acc"] >= target), None)
    best = max(vals, key=lambda r: r["pgd_acc"])
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    last_step = max(r["step"] for r in rows if r["kind"] == "train")
    ga = [r["grad_align"] for r in rows if r["kind"] == "train" and r["step"] > last_step - 1000 and "grad_align" in r]
    return {
        "run": run_dir.name,
        "seed": _seed(run_dir),
        "threads": sessions[-1]["machine"]["threads"],
        "revision": sessions[-1]["git_revision"][:7],
        "resumed": len(sessions) > 1,
        "wall_min": sum(s["wall_seconds"] for s in sessions) / 60,
        # metrics' wall_s counts from the start of the run's session, so it is exact for one session
        "first": None if first is None else (first["step"], first["wall_s"] / 60),
        "best": (best["step"], best["pgd_acc"]),
        "clean": ev["clean_acc"],
        "pgd": ev["pgd_acc"],
        "ci": ev["pgd_acc_ci95"],
        "grad_align": statistics.mean(ga) if ga else None,
        "full": _full(run_dir),
    }


def _full(run_dir: Path) -> tuple[int, float, float] | None:
    """(n, PGD-40, AutoAttack) of the run's `eval --suite full`, if it has one with an AutoAttack row."""
    path = run_dir / "eval-full" / "eval.json"
    if not path.exists():
        return None
    rows = {r["id"]: r for r in json.loads(path.read_text())["rows"]}
    if "autoattack" not in rows:
        return None
    return rows["autoattack"]["n"], rows["whitebox/pgd-40"]["accuracy"], rows["autoattack"]["accuracy"]


def _seed(run_dir: Path) -> int | str:
    for line in (run_dir / "config.yaml").read_text().splitlines():
        if line.strip().startswith("seed:"):
            return int(line.split(":", 1)[1])
    return "?"


def _full_cell(full: tuple[int, float, float] | None) -> str:
    if full is None:
        return "-"
    n, pgd, aa = full
    return f"{pgd * 100:.2f} / {aa * 100:.2f}% ({n})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--target", type=float, default=0.89, help="test PGD-40 goal (default 0.89)")
    args = ap.parse_args()
    runs = [one_run(d, args.target) for d in args.runs]
    pct = f"{args.target * 100:g}%"
    print(f"| run | seed | threads | rev | training | validation first >= {pct} (step, min) "
          "| best validation (step) | test clean | test PGD-40 (95% CI) | GradAlign 1-cos "
          "| PGD-40 / AutoAttack (n) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        first = "never" if r["first"] is None else f"{r['first'][0]:,}, {r['first'][1]:.1f} min"
        print(f"| `{r['run']}` | {r['seed']} | {r['threads']} | {r['revision']} | {r['wall_min']:.1f} min"
              f"{' (resumed)' if r['resumed'] else ''} | {first} | {r['best'][1] * 100:.1f}% ({r['best'][0]:,}) "
              f"| {r['clean'] * 100:.2f}% | **{r['pgd'] * 100:.2f}%** ({r['ci'][0] * 100:.2f}-{r['ci'][1] * 100:.2f}) "
              f"| {'-' if r['grad_align'] is None else format(r['grad_align'], '.2f')} "
              f"| {_full_cell(r['full'])} |")
    pgds = [r["pgd"] for r in runs]
    passed = sum(p >= args.target for p in pgds)
    print()
    print(f"{len(runs)} runs: test PGD-40 mean {statistics.mean(pgds) * 100:.2f}%, min {min(pgds) * 100:.2f}%, "
          f"max {max(pgds) * 100:.2f}%; {passed} of {len(runs)} at or above {pct}.")


if __name__ == "__main__":
    main()
