"""``robustfeat eval``: the evaluation suite on a run directory, and the files it writes.

    robustfeat eval RUN_DIR [--suite quick|paper|full] [--source OTHER_RUN_DIR] [--n N]

Outputs go to RUN_DIR/eval/ (``--out`` changes it): eval.json (every number, the settings, the
model's identity, n and 95% Wilson intervals), eval.md (the paper's layout, with the published
numbers beside ours when the run comes from a paper preset), eval.csv, per_example.safetensors (one
robust/not flag per example and row, plus the evaluated test indices) and autoattack/ (finished
AutoAttack chunks, so an interrupted ``--suite full`` resumes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

QUICK_N = 1000
"""Default sample size of the quick suite (a fixed seeded subset); paper and full use the whole test set."""
SUBSET_STREAM = 7


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _identity(run_dir, which: str, cfg, meta) -> dict[str, Any]:
    from .api import checkpoint_path

    path = checkpoint_path(run_dir, which)
    return {
        "run_dir": str(run_dir), "checkpoint": str(path), "sha256": _sha256(path), "step": meta["step"],
        "preset": cfg.name, "dataset": cfg.data.name, "model": cfg.model.name,
        "widths": list(cfg.model.widths) if cfg.model.widths else None, "method": cfg.method.name,
        "lam": cfg.lam, "seed": cfg.run.seed, "optim_steps": cfg.optim.steps,
    }


def subset_indices(n_total: int, n: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of the fixed seeded subset of ``n`` test examples (None: all of them)."""
    from .config import ConfigError
    from .seeding import derived_seed

    if n is None or n >= n_total:
        return None
    if n < 1:
        raise ConfigError(f"--n {n}: expected a positive number of test examples")
    g = torch.Generator().manual_seed(derived_seed(seed, SUBSET_STREAM))
    return torch.randperm(n_total, generator=g)[:n].sort().values


def _paper_column(cfg, eps: float, step_size: float) -> dict | None:
    from .config import load_config
    from .paper_results import paper_results

    paper = paper_results(cfg.name)
    if paper is None:
        return None
    paper = dict(paper)
    notes = []
    from .config import ConfigError

    try:
        ref = load_config(cfg.name)
        if cfg.optim.steps != ref.optim.steps:
            notes.append(f"this run trained {cfg.optim.steps:,} steps, the paper's schedule {ref.optim.steps:,}: "
                         "a short budget is not expected to reach the published numbers")
        if abs(eps - ref.eval_attack.eps) > 1e-9 or abs(step_size - ref.eval_attack.step_size) > 1e-9:
            notes.append(f"eps/step {eps:.4g}/{step_size:.4g} differ from the paper's "
                         f"{ref.eval_attack.eps:.4g}/{ref.eval_attack.step_size:.4g}")
    except ConfigError:
        notes.append(f"preset {cfg.name!r} could not be loaded to compare schedules")
    paper["note"] = "; ".join(notes)
    return paper


def evaluate_run_suite(
    run_dir: str | os.PathLike,
    *,
    suite: str = "quick",
    source: str | os.PathLike | None = None,
    n: int | None = None,
    which: str = "best",
    source_which: str = "best",
    data_dir: str | None = None,
    eps: float | None = None,
    step_size: float | None = None,
    restarts: int = 1,
    rows=None,
    device: str = "auto",
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run a suite on a run's checkpoint and write eval.json / eval.md / eval.csv; returns the result.

    ``n``: evaluate a fixed seeded subset (default: 1000 for quick, the whole test set otherwise).
    ``source``: another run directory (same preset, other seed) for the black-box rows.
    """
    from safetensors.torch import save_file

    from .api import load_run
    from .build import build_splits, resolve_device
    from .checkpoint import CheckpointError, atomic_write_text
    from .config import ConfigError
    from .paper_results import paper_results
    from .suite import SUITES, evaluate_model, to_json
    from .suite_report import render_csv, render_markdown

    if rows is None and suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model, cfg, meta = load_run(run_dir, which, dev)
    ident = _identity(run_dir, which, cfg, meta)
    src_model = src_ident = None
    if source is not None:
        src_model, src_cfg, src_meta = load_run(source, source_which, dev)
        src_ident = _identity(source, source_which, src_cfg, src_meta)
        if src_ident["sha256"] == ident["sha256"]:
            raise CheckpointError("the black-box source is the same checkpoint as the evaluated model; "
                                  "use an independently trained copy (same preset, other seed)")
        shape = lambda m: {k: m["extra"].get(k) for k in ("num_classes", "in_channels", "classes")}
        if src_cfg.data.name != cfg.data.name or shape(src_meta) != shape(meta):
            raise CheckpointError(f"the black-box source was trained on {src_cfg.data.name!r} {shape(src_meta)}, "
                                  f"the evaluated model on {cfg.data.name!r} {shape(meta)}")
    eps = cfg.eval_attack.eps if eps is None else float(eps)
    step_size = cfg.eval_attack.step_size if step_size is None else float(step_size)

    splits = build_splits(cfg, data_dir)
    x, y = splits.x_test, splits.y_test
    if n is None and suite == "quick" and rows is None:
        n = QUICK_N
    idx = subset_indices(len(y), n, seed)
    if idx is not None:
        x, y = x[idx], y[idx]
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"
    extra = {cfg.eval_attack.steps} if cfg.eval_attack.loss == "ce" else set()
    paper = paper_results(cfg.name)
    if paper is not None and suite != "quick":  # the paper's own PGD rows (Table 1: PGD-40)
        extra |= {int(k.split("-")[1]) for k in paper["rows"] if k.startswith("whitebox/pgd-")}
    t0 = time.time()
    res = evaluate_model(
        model, x, y, eps=eps, step_size=step_size, suite=suite, rows=rows, source=src_model,
        extra_pgd_steps=sorted(extra), restarts=restarts, seed=seed, batch_size=batch_size, device=dev,
        channels_last=cfg.run.channels_last, progress=progress, autoattack_dir=out / "autoattack",
        state_dir=out / "state")
    res["settings"]["suite"] = suite if rows is None else "custom"
    res["settings"]["seconds"] = round(time.time() - t0, 1)
    res["model"] = ident
    res["source"] = src_ident
    res["subset"] = "full test set" if idx is None else f"seeded subset (seed {seed}) of {len(splits.y_test):,}"
    res["indices"] = None if idx is None else idx.tolist()
    res["paper"] = _paper_column(cfg, eps, step_size)
    if src_ident is not None:
        same_seed = src_ident["seed"] == ident["seed"]
        res["checks"].append({
            "name": "independent_source", "status": "flagged" if same_seed else "pass",
            "detail": f"source seed {src_ident['seed']}, target seed {ident['seed']}; source preset "
                      f"{src_ident['preset']!r}, target {ident['preset']!r}"})
        res["masking_suspected"] = any(c["status"] == "flagged" for c in res["checks"])
    _legacy_keys(res, cfg)

    out.mkdir(parents=True, exist_ok=True)
    flags = {k: v.to(torch.uint8).contiguous() for k, v in res["per_example"].items()}
    flags["indices"] = (idx if idx is not None else torch.arange(len(y))).to(torch.int64)
    save_file({k.replace("/", "."): v for k, v in flags.items()}, str(out / "per_example.safetensors"))
    atomic_write_text(out / "eval.json", to_json(res))
    atomic_write_text(out / "eval.md", render_markdown(res))
    atomic_write_text(out / "eval.csv", render_csv(res))
    res.pop("per_example")
    res["outputs"] = str(out)
    return res


def _legacy_keys(res: dict[str, Any], cfg) -> None:
    """clean_acc, pgd_acc (the first white-box row; the preset's PGD if present) and attack, as before."""
    rows = {r["id"]: r for r in res["rows"]}
    res["clean_acc"] = rows["natural"]["accuracy"]
    res["clean_acc_ci95"] = rows["natural"]["ci95"]
    wb = [r for r in res["rows"] if r["kind"] == "whitebox"]
    main = rows.get(f"whitebox/pgd-{cfg.eval_attack.steps}") or (wb[0] if wb else None)
    if main is not None:
        res["pgd_acc"] = main["accuracy"]
        res["pgd_acc_ci95"] = main["ci95"]
        res["attack"] = {"name": f"{'PGD' if main['loss'] == 'ce' else 'CW'}-{main['steps']}",
                         **{k: main[k] for k in ("eps", "step_size", "steps", "restarts", "random_start",
                                                 "loss", "bn_mode")}}


# ---------------------------------------------------------------------------------------------------------
# command line


def _fraction(text: str) -> float:
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.3 or 8/255)") from None


def register_cli(sub) -> None:
    s = sub.add_parser(
        "eval", help="robustness evaluation suite of a run (paper tables, AutoAttack, masking checks)",
        description="Evaluate a run's checkpoint. quick: natural, PGD (the preset's steps), CW-30 on a "
        f"seeded subset of {QUICK_N} test images. paper: every row of the paper's tables (natural, PGD "
        "5/20/100/200, CW 30/100, black box with --source) and a large-eps sanity row on the whole test "
        "set. full: paper + AutoAttack (standard). Writes RUN_DIR/eval/eval.json, eval.md, eval.csv and "
        "per_example.safetensors; gradient-masking checks are reported with the results.")
    s.add_argument("run_dir")
    s.add_argument("--suite", choices=("quick", "paper", "full"), default="quick")
    s.add_argument("--source", metavar="OTHER_RUN_DIR",
                   help="independently trained copy (same preset, other seed): adds the black-box rows")
    s.add_argument("--n", type=int, help=f"fixed seeded subset of N test images (quick: {QUICK_N}; else all)")
    s.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint path")
    s.add_argument("--source-checkpoint", default="best", help="checkpoint of --source")
    s.add_argument("--eps", type=_fraction, help="l_inf radius (default: the preset's, e.g. 8/255)")
    s.add_argument("--step-size", type=_fraction, help="PGD/CW step (default: the preset's)")
    s.add_argument("--restarts", type=int, default=1, help="random restarts per attack")
    s.add_argument("--seed", type=int, default=0, help="seeds the subset, random starts and AutoAttack")
    s.add_argument("--data-dir", help="data directory")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, help="examples per attack batch (default: sized for the device)")
    s.add_argument("--out", help="output directory (default RUN_DIR/eval)")
    s.add_argument("--json", action="store_true", help="print eval.json instead of the table")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .suite_report import render_markdown

    res = evaluate_run_suite(
        args.run_dir, suite=args.suite, source=args.source, n=args.n, which=args.checkpoint,
        source_which=args.source_checkpoint, data_dir=args.data_dir, eps=args.eps, step_size=args.step_size,
        restarts=args.restarts, device=args.device, batch_size=args.batch_size, seed=args.seed,
        progress=not args.quiet, out_dir=args.out)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "indices"}, indent=2))
        return 0
    print(render_markdown(res))
    print(f"written to {res['outputs']}/ (eval.json, eval.md, eval.csv)")
    return 0
