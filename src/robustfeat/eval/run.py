"""The evaluation suite on a run directory (``evaluate_run``, the library side of ``robustfeat eval``),
and the files it writes.

Outputs go to RUN_DIR/eval/ (``out_dir`` changes it): eval.json (every number, the settings, the
model's identity, n and 95% Wilson intervals), eval.md (the paper's layout, with the published
numbers beside ours when the run comes from a paper preset), eval.csv, per_example.safetensors (one
robust/not flag per example and row, plus the evaluated test indices), curve_eps.csv/.png and
curve_steps.csv/.png with ``curves``, autoattack/ (finished AutoAttack chunks) and state/ (finished
PGD batches), so an interrupted evaluation resumes. Every file is written atomically
(``robustfeat.checkpoint.atomic_write_bytes``). ``evaluate_test_set`` and ``finish`` are shared with
``eval.external`` (models defined outside robustfeat).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors

from .. import __version__
from ..build import build_splits, resolve_device
from ..checkpoint import CheckpointError, atomic_write_bytes, atomic_write_text
from ..config import AttackConfig, ConfigError, load_config
from ..data import DataError
from ..seeding import derived_seed
from ..train.rundir import git_revision
from .checks import check_settings, independent_source_check, masking_suspected
from .curves import write_curves
from .load import checkpoint_path, load_run, run_identity
from .paper import paper_results
from .report import render_csv, render_markdown
from .suite import SUITES, Row, evaluate_model, to_json

QUICK_N = 1000
"""Default sample size of the quick suite (a fixed seeded subset); paper and full use the whole test set."""
SUBSET_STREAM = 7


def subset_indices(n_total: int, n: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of the fixed seeded subset of ``n`` test examples (None: all of them)."""
    if n is None or n >= n_total:
        return None
    if n < 1:
        raise ConfigError(f"--n {n}: expected a positive number of test examples")
    g = torch.Generator().manual_seed(derived_seed(seed, SUBSET_STREAM))
    return torch.randperm(n_total, generator=g)[:n].sort().values


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    suite: str | None = None,
    which: str = "best",
    source: str | os.PathLike | None = None,
    source_which: str = "best",
    transfer_from: str | os.PathLike | None = None,
    transfer_which: str = "best",
    n: int | None = None,
    data_dir: str | None = None,
    attack: AttackConfig | None = None,
    eps: float | None = None,
    step_size: float | None = None,
    restarts: int = 1,
    rows=None,
    device: str = "auto",
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
    curves: bool = False,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on the test set and write RUN_DIR/eval/; returns the result.

    ``suite`` None: natural accuracy and one attack (``attack``, default the preset's ``eval_attack``);
    'quick', 'paper' or 'full': the suite of ``robustfeat eval`` (``rows`` instead: custom rows).
    ``n``: a fixed seeded subset (default: 1000 for quick, the whole test set otherwise).
    ``source``: another run directory (same preset, other seed) for the black-box rows.
    ``transfer_from``: a naturally trained run directory (same dataset) for the transfer row.
    ``eps`` / ``step_size``: the suite's radius and step (default ``attack``'s, else the preset's).
    ``curves``: also accuracy against eps and PGD steps (curve_eps/curve_steps .csv and .png).
    The result has ``clean_acc``, ``pgd_acc``, ``robust_acc`` (the worst case) and ``attack`` besides
    the suite's rows and checks.
    """
    check_suite(suite, rows)
    # settings first: nothing is loaded, computed or written for what cannot be meant
    check_settings(eps=eps, step_size=step_size, restarts=restarts, batch_size=batch_size, seed=seed, n=n)
    checkpoint_path(run_dir, which)  # the run (a file given as one, no weights) before its output folder
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"
    _check_writable(out)
    dev = device_of(device)

    model, cfg, meta = load_run(run_dir, which, dev)
    ident = run_identity(run_dir, which, cfg, meta)
    shape = _shape(meta)
    src_model, src_ident = load_other_run(source, source_which, dev, ident, cfg.data.name, shape, "black-box source")
    tr_model, tr_ident = load_other_run(transfer_from, transfer_which, dev, ident, cfg.data.name, shape,
                                        "transfer source")
    if suite is None and rows is None:  # natural + one attack
        attack = attack or cfg.eval_attack
        rows = [Row("natural"), Row("whitebox", attack.loss, attack.steps, attack.eps, attack.step_size,
                                    attack.restarts, attack.random_start, attack.bn_mode)]
    suite = suite or "quick"
    eps = float(eps) if eps is not None else attack.eps if attack is not None else cfg.eval_attack.eps
    step_size = (float(step_size) if step_size is not None else attack.step_size if attack is not None
                 else cfg.eval_attack.step_size)

    splits = build_splits(cfg, data_dir)
    _check_data(splits.dataset, meta, cfg)
    asked = n
    if n is None and suite == "quick" and rows is None:
        n = QUICK_N
    res, idx = evaluate_test_set(
        model, splits.x_test, splits.y_test, n=n, seed=seed, out=out, eps=eps, step_size=step_size, suite=suite,
        rows=rows, source=src_model, transfer=tr_model, extra_pgd_steps=_extra_pgd_steps(cfg, suite),
        headline=cfg.eval_attack.steps if cfg.eval_attack.loss == "ce" else None,
        restarts=restarts, batch_size=batch_size, device=dev, channels_last=cfg.run.channels_last,
        progress=progress, curves=curves, num_classes=shape["num_classes"])
    res["model"] = ident
    res["source"] = src_ident
    res["transfer_source"] = tr_ident
    if idx is None and asked is not None and asked > len(splits.y_test):  # said, since it was not asked for
        res["subset"] += f" (--n {asked:,} is more than its {len(splits.y_test):,} images)"

    res["paper"] = _paper_column(cfg, eps, step_size)
    if src_ident is not None:
        res["checks"].append(independent_source_check(src_ident, ident))
        res["masking_suspected"] = masking_suspected(res["checks"])
    _legacy_keys(res, cfg)
    return finish(res, out, idx)


def check_suite(suite: str | None, rows) -> None:
    if rows is None and suite is not None and suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")


def device_of(device: str) -> torch.device:
    try:
        return resolve_device(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def evaluate_test_set(model, x_test: torch.Tensor, y_test: torch.Tensor, *, n: int | None, seed: int, out: Path,
                      **suite_options) -> tuple[dict[str, Any], torch.Tensor | None]:
    """``evaluate_model`` on the seeded subset of ``n`` test images (all: None), resumable under ``out``;
    (result with its subset described, the subset's indices or None)."""
    idx = subset_indices(len(y_test), n, seed)
    x, y = (x_test, y_test) if idx is None else (x_test[idx], y_test[idx])
    t0 = time.perf_counter()
    res = evaluate_model(model, x, y, seed=seed, autoattack_dir=out / "autoattack", state_dir=out / "state",
                         **suite_options)
    res["settings"]["suite"] = suite_options.get("suite", "paper") if suite_options.get("rows") is None else "custom"
    # ms resolution: a quick suite on a few images takes well under 0.1 s on a fast machine
    res["settings"]["seconds"] = round(time.perf_counter() - t0, 3)
    res["subset"] = "full test set" if idx is None else f"seeded subset (seed {seed}) of {len(y_test):,}"
    res["indices"] = None if idx is None else idx.tolist()
    return res, idx


def finish(res: dict[str, Any], out: Path, idx: torch.Tensor | None) -> dict[str, Any]:
    """Write the result's files under ``out``; the result without its per-example flags."""
    res["produced_by"] = {"robustfeat": __version__, "git_revision": git_revision(), "torch": torch.__version__}
    write_outputs(out, res, idx, res["n"])
    res.pop("per_example")
    res["outputs"] = str(out)
    return res


def _check_writable(out: Path) -> None:
    """ConfigError unless the output folder is (or can be made) a writable directory; a folder this
    check creates is removed again, so a refused evaluation leaves nothing behind."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} exists and is not a directory; pass --out DIR")
    created = None
    for d in (out, *out.absolute().parents):
        if d.exists():
            break
        created = d
    try:
        out.mkdir(parents=True, exist_ok=True)
        ok = os.access(out, os.W_OK)
    except OSError as e:
        raise ConfigError(f"cannot write the evaluation to {str(out)!r}: {e.strerror or e}; pass --out DIR") from None
    finally:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
    if not ok:
        raise ConfigError(f"cannot write the evaluation to {str(out)!r}: permission denied; pass --out DIR")


def _check_data(ds, meta: dict[str, Any], cfg) -> None:
    """The test data must be what the model was trained for (the data of a run can change under it,
    e.g. an .npz file rewritten): as many classes, as many channels."""
    extra = meta["extra"]
    if ds.num_classes != extra["num_classes"] or ds.image_shape[0] != extra["in_channels"]:
        raise DataError(
            f"the test data of data.name={cfg.data.name!r}{f' ({cfg.data.path})' if cfg.data.path else ''} has "
            f"{ds.num_classes} classes of {ds.image_shape[0]}-channel images, but the model was trained on "
            f"{extra['num_classes']} classes of {extra['in_channels']}-channel images; pass the data it was "
            "trained on (--data-dir)")


def _shape(meta: dict) -> dict:
    return {k: meta["extra"].get(k) for k in ("num_classes", "in_channels", "classes")}


def load_other_run(path, which: str, dev, ident: dict, dataset: str, shape: dict, role: str):
    """(model, identity) of a black-box or transfer source run (None, None without one), refused when it
    is the evaluated checkpoint itself or was trained on other data. ``shape``: the evaluated model's
    num_classes, in_channels and classes (only the keys given are compared)."""
    if path is None:

        return None, None
    model, cfg, meta = load_run(path, which, dev)
    other = run_identity(path, which, cfg, meta)
    if other["sha256"] == ident.get("sha256"):
        raise CheckpointError(f"the {role} is the same checkpoint as the evaluated model; "
                              + ("use an independently trained copy (same preset, other seed)"
                                 if role.startswith("black") else "use a naturally trained model"))
    theirs = {k: v for k, v in _shape(meta).items() if k in shape}
    if cfg.data.name.split("-")[0] != dataset.split("-")[0] or theirs != shape:
        raise CheckpointError(f"the {role} was trained on {cfg.data.name!r} {theirs}, the evaluated model on "
                              f"{dataset!r} {shape}")
    return model, other


def _extra_pgd_steps(cfg, suite: str) -> list[int]:
    """PGD step counts beyond the suite's own: the preset's validation attack, and the paper's own PGD
    rows (Table 1: PGD-40) outside the quick suite."""
    extra = {cfg.eval_attack.steps} if cfg.eval_attack.loss == "ce" else set()
    paper = paper_results(cfg.name)
    if paper is not None and suite != "quick":
        extra |= {int(k.split("-")[1]) for k in paper["rows"] if k.startswith("whitebox/pgd-")}
    return sorted(extra)


def _paper_column(cfg, eps: float, step_size: float) -> dict | None:
    paper = paper_results(cfg.name)
    if paper is None:
        return None
    paper = dict(paper)
    notes = []
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


def write_outputs(out: Path, res: dict[str, Any], idx: torch.Tensor | None, n: int) -> None:
    """per_example.safetensors, eval.json, eval.md, eval.csv and the curves' files, each written atomically."""
    flags = {k: v.to(torch.uint8).contiguous() for k, v in res["per_example"].items()}
    flags["indices"] = (idx if idx is not None else torch.arange(n)).to(torch.int64)
    atomic_write_bytes(out / "per_example.safetensors",
                       save_tensors({k.replace("/", "."): v for k, v in flags.items()}))
    atomic_write_text(out / "eval.json", to_json(res))
    atomic_write_text(out / "eval.md", render_markdown(res))
    atomic_write_text(out / "eval.csv", render_csv(res))
    if res.get("curves"):
        write_curves(out, res["curves"])
