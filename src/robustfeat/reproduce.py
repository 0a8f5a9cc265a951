"""``robustfeat reproduce TARGET``: every model a table or figure of the paper needs, its evaluation and
analyses, and a README with our numbers beside the published ones.

    robustfeat reproduce table1 --budget cpu [--out DIR] [--runs DIR] [--data-dir DIR]

A target is a list of runs (preset, seed). Tables with black-box rows train each method twice (seeds 0
and 1, same preset): seed 0 is evaluated with the paper suite, seed 1 is the independently trained
copy the black-box adversaries are crafted on. Re-running skips what is finished: a run whose last
checkpoint reached ``optim.steps`` is not trained again (its config must match), an interrupted run
is resumed exactly (``train(resume=True)``), and an evaluation whose eval.json names the same
checkpoint, source and sample is not repeated.

Layout of DIR (default ``results/TARGET-BUDGET``):
    README.md          our numbers, the paper's, differences, 95% CIs, budgets, wall times, commands
    reproduce.json     the same as data
    figures/           PNGs of figure targets
    runs/PRESET-seedN/ run directories (``--runs`` puts them elsewhere, e.g. to share them between
                       targets); evaluations in runs/PRESET-seed0/eval/
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file

from .analysis.pipeline import (
    FIGURE_IMAGES,
    attention_maps_of_run,
    attention_robustness,
    gradient_classification,
    gradient_maps_of_runs,
)
from .checkpoint import CheckpointError, atomic_write_text, read_checkpoint
from .config import ConfigError, as_overrides, load_config, preset_budgets, read_config_file
from .eval.load import checkpoint_path, file_sha256, load_model
from .eval.paper import PAPER_CLASSIFIER_TEST_ACC, PAPER_TABLE4, paper_results
from .eval.report import percent
from .eval.run import evaluate_run
from .eval.stats import paired_difference
from .eval.suite import Row, model_fingerprint
from .methods import METHODS
from .registry import suggest
from .train import (
    BEST,
    LAST,
    RUN_FILES,
    TrainingError,
    finished_step,
    git_revision,
    machine_info,
    recorded_step,
    same_experiment,
    train,
)
from .train.rundir import check_layout, experiment_differences, first_checkpoint_step, metrics_records

AUTOATTACK_DIR = "eval-autoattack"
"""Where a run's AutoAttack evaluation goes (beside eval/, the paper suite's)."""

SEEDS = (0, 1)
"""Seed 0 is evaluated; seed 1 is the black-box source (same preset, other seed)."""

EVAL_N: dict[str, dict[str, int | None]] = {
    "paper": {"mnist": None, "cifar": None},  # the whole test set
    "cpu": {"mnist": 1000, "cifar": 1000},  # seeded samples (all 1,000 of the exact CIFAR-10 test images)
    "cpu-3epoch": {"mnist": 1000, "cifar": 1000},
    "cpu-1epoch": {"mnist": 1000, "cifar": 500},  # seeded test samples, reported with 95% Wilson intervals
    "fast": {"mnist": 1000, "cifar": 500},
    "smoke": {"mnist": 20, "cifar": 16},
}
"""Test images per evaluation, by budget and dataset family (budget arithmetic: presets/_*.yaml)."""

ANALYSIS_N: dict[str, int | None] = {"paper": None, "cpu": 1000, "cpu-3epoch": 1000, "cpu-1epoch": 1000, "fast": 1000, "smoke": 16}
"""Images per split for Figure 2 and Table 4 (None: the whole training and test sets)."""

AUTOATTACK_N: dict[str, dict[str, int]] = {"paper": {"mnist": 1000, "cifar": 1000},
                                           "cpu": {"mnist": 300, "cifar": 500},
                                           "cpu-3epoch": {"mnist": 300, "cifar": 500}}
"""Test images (seeded sample) for AutoAttack (standard) on each evaluated seed-0 model, beside natural
accuracy and the preset's PGD on the same images; budgets not listed run no AutoAttack."""



@dataclass(frozen=True)
class Target:
    title: str
    dataset: str
    presets: tuple[str, ...]
    blackbox: bool = True
    """Train seed 1 of each preset as the black-box source and evaluate seed 0 with the paper suite."""
    evaluate: bool = True
    analysis: str | None = None


TARGETS: dict[str, Target] = {
    "table1": Target("Table 1: MNIST", "MNIST", ("mnist-at", "mnist-at-reg")),
    "table2": Target("Table 2: CIFAR-10, ResNet [16, 16, 32, 64]", "CIFAR-10",
                     ("cifar10-at", "cifar10-at-reg", "cifar10-at-att", "cifar10-at-att-reg")),
    "table3": Target("Table 3: CIFAR-10, 3x wide ResNet [16, 48, 96, 192]", "CIFAR-10",
                     ("cifar10-wide3-at", "cifar10-wide3-at-reg", "cifar10-wide3-at-att",
                      "cifar10-wide3-at-att-reg")),
    "table4": Target("Table 4: a natural classifier on gradient maps (CIFAR-10)", "CIFAR-10",
                     ("cifar10-at", "cifar10-at-att-reg", "cifar10-natural"), blackbox=False, evaluate=False,
                     analysis="gradient-classification"),
    "table5": Target("Table 5: CIFAR-100, ResNet [16, 16, 32, 64]", "CIFAR-100",
                     ("cifar100-at", "cifar100-at-reg", "cifar100-at-att", "cifar100-at-att-reg")),
    "figure2": Target("Figure 2: attention weight vs feature robustness (CIFAR-10, AT-att-reg)", "CIFAR-10",
                      ("cifar10-at-att-reg",), blackbox=False, evaluate=False, analysis="attention-robustness"),
    "figure3": Target("Figure 3: attention maps (CIFAR-10, AT-att-reg)", "CIFAR-10",
                      ("cifar10-at-att-reg",), blackbox=False, evaluate=False, analysis="attention-maps"),
    "figure4": Target("Figure 4: gradient maps (CIFAR-10, Madry et al. vs AT-att-reg)", "CIFAR-10",
                      ("cifar10-at", "cifar10-at-att-reg"), blackbox=False, evaluate=False,
                      analysis="gradient-maps"),
}


@dataclass(frozen=True)
class RunSpec:
    preset: str
    seed: int
    role: str  # "evaluated", "black-box source", "analysed", "classifier"

    @property
    def name(self) -> str:
        return f"{self.preset}-seed{self.seed}"


def plan(target: str) -> list[RunSpec]:
    """The runs a target needs, in training order."""
    t = _target(target)
    runs = []
    for p in t.presets:
        if t.blackbox:
            runs += [RunSpec(p, 0, "evaluated"), RunSpec(p, 1, "black-box source")]
        else:
            runs.append(RunSpec(p, 0, "classifier" if p.endswith("natural") else "analysed"))
    return runs


def _check_args(target, budget, overrides, out, runs_dir) -> tuple[Target, list[str], Path, Path]:
    """(target, overrides, out, runs_dir) of a reproduce call, each checked: a known target, a budget
    every preset of it defines, overrides as a list, output paths that are not files."""
    t = _target(target)
    overrides = as_overrides(overrides)
    if not isinstance(budget, str):
        raise ConfigError(f"budget={budget!r} is invalid: expected a budget name such as 'cpu'")
    for p in t.presets:
        if budget not in preset_budgets(p):
            raise ConfigError(f"budget {budget!r} is not defined for preset {p}{suggest(budget, preset_budgets(p))}; "
                              f"known: {', '.join(preset_budgets(p))}")
    out = default_out(target, budget) if out is None else Path(out)
    runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
    for flag, d in (("--out", out), ("--runs", runs_dir)):
        if d.exists() and not d.is_dir():
            raise ConfigError(f"{flag} {str(d)!r} exists and is not a directory")
    return t, overrides, out, runs_dir


def _target(name: str) -> Target:
    if not isinstance(name, str):
        raise ConfigError(f"target={name!r} is invalid: expected one of {', '.join(TARGETS)}")
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}{suggest(name, list(TARGETS))}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def _family(dataset: str) -> str:
    return "mnist" if dataset.startswith("mnist") else "cifar"


def eval_n(budget: str, dataset: str) -> int | None:
    return EVAL_N.get(budget, EVAL_N["cpu"])[_family(dataset)]


# ---------------------------------------------------------------------------------------------------------
# runs


def run_config(spec: RunSpec, budget: str, overrides: list[str], data_dir: str | None):
    cfg = load_config(spec.preset, budget, [*overrides, f"run.seed={spec.seed}"])
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=data_dir))
    return cfg


def run_state(run_dir: Path, cfg) -> tuple[str, int]:
    """('new' | 'partial' | 'done', step reached), decided from the run's own records.

    done: the records say the run trained all its steps (``train.finished_step``), with or without
    ``last``, so a published run that keeps only ``best`` (or no weights) is never trained again.
    partial: ``last`` holds an earlier step, or the directory holds nothing a start from step 0 would
    not write again. Refused with a TrainingError: a run of another config (it would mix budgets in one
    table) and results without ``last`` (continuing would retrain over them).
    """
    check_layout(run_dir)
    if not any((run_dir / f).exists() for f in RUN_FILES):
        return "new", 0
    saved = _saved_config(run_dir)
    if saved is not None and not same_experiment(saved, cfg.to_dict()):
        raise TrainingError(
            f"{str(run_dir)!r} holds a run of another config ({experiment_differences(saved, cfg.to_dict())}: "
            "saved / asked; other budget or overrides?); remove it or pass another --runs/--out")
    steps = cfg.optim.steps
    if (run_dir / LAST).is_file():
        step = int(read_checkpoint(run_dir / LAST)[1]["step"])
        return ("done" if step >= steps else "partial"), step
    if finished_step(run_dir, steps) is not None:
        return "done", steps
    step = recorded_step(run_dir)
    if step > first_checkpoint_step(cfg):
        raise TrainingError(
            f"{str(run_dir)!r} holds results up to step {step:,} but no {LAST} to continue from; continuing "
            "would retrain from step 0 over them: remove the directory yourself or pass another --runs/--out")
    return "partial", 0


def _saved_config(run_dir: Path) -> dict | None:
    """The config a run directory records: config.yaml, else its ``last`` checkpoint's (None: neither)."""
    if (run_dir / "config.yaml").exists():
        try:
            return read_config_file(run_dir / "config.yaml").to_dict()
        except ConfigError as e:
            raise TrainingError(f"{str(run_dir)!r}: its config.yaml is damaged or invalid ({e})") from None
    if (run_dir / LAST).is_file():
        return read_checkpoint(run_dir / LAST)[1]["config"]
    return None


def run_record(run_dir: Path, cfg) -> dict[str, Any]:
    """step, best_val (of the metric best_metric that chose ``best``) and last_val of a trained run: from
    ``last``, else (a run that keeps only ``best``, or no weights) from ``best`` and metrics.jsonl."""
    metric = METHODS.get(cfg.method.name).selection_metric

    def best_of(extra: dict) -> tuple[float | None, str]:  # checkpoints before best_metric hold best_val_pgd
        if "best_val" in extra:
            return extra["best_val"], extra.get("best_metric", "pgd_acc")
        return extra.get("best_val_pgd"), "pgd_acc"

    if (run_dir / LAST).is_file():
        meta = read_checkpoint(run_dir / LAST)[1]
        best, best_metric = best_of(meta["extra"])
        return {"step": meta["step"], "best_val": best, "best_metric": best_metric,
                "last_val": meta["extra"].get("val")}
    evals = [r for r in metrics_records(run_dir) if r.get("kind") == "eval"]
    best, best_metric = None, metric
    if (run_dir / BEST).is_file():
        best, best_metric = best_of(read_checkpoint(run_dir / BEST)[1]["extra"])
    elif evals:
        best = max(float(r.get(metric, -1.0)) for r in evals)
    last_val = {k: evals[-1][k] for k in ("clean_acc", "pgd_acc") if k in evals[-1]} if evals else None
    return {"step": finished_step(run_dir, cfg.optim.steps) or recorded_step(run_dir), "best_val": best,
            "best_metric": best_metric, "last_val": last_val}


_METRIC_SHORT = {"pgd_acc": "PGD", "clean_acc": "clean"}


def _sessions(run_dir: Path) -> list[dict] | None:
    """The training sessions recorded in run.json (None: missing or unreadable)."""
    try:
        sessions = json.loads((run_dir / "run.json").read_text()).get("sessions", [])
    except (OSError, ValueError, AttributeError):
        return None
    return [x for x in sessions if isinstance(x, dict)] if isinstance(sessions, list) else None


def wall_seconds(run_dir: Path) -> float:
    sessions = _sessions(run_dir)
    try:
        return float("nan") if sessions is None else float(sum(s.get("wall_seconds", 0.0) for s in sessions))
    except (TypeError, ValueError):
        return float("nan")


def train_revisions(run_dir: Path) -> list[str]:
    """The git revisions the run's training sessions ran at, in order, without repeats."""
    out: list[str] = []
    for x in _sessions(run_dir) or []:
        r = str(x.get("git_revision", "unknown"))
        if r not in out:
            out.append(r)
    return out


def machine_label(m: dict) -> str:
    """A machine record of run.json in a few words: the CPU (or GPU), the vector instructions torch
    dispatched to, the CPU's family and model where recorded, and the thread count. Records written
    before robustfeat kept the CPU say so rather than guess it."""
    if not isinstance(m, dict):
        return "not recorded"
    if m.get("gpu"):
        parts = [str(m["gpu"])]
    else:
        parts = [str(m.get("cpu") or "CPU not recorded")]
        if m.get("cpu_capability"):
            parts.append(str(m["cpu_capability"]))
        fam = re.search(r"family (\d+) model (\d+)", str(m.get("cpu_id", "")))
        if fam:
            parts.append(f"family {fam[1]} model {fam[2]}")
    if m.get("threads"):
        parts.append(f"{m['threads']} threads")
    return ", ".join(parts)


def train_machines(run_dir: Path) -> list[str]:
    """The machines the run's training sessions ran on (``machine_label``), in order, without repeats."""
    out: list[str] = []
    for x in _sessions(run_dir) or []:
        label = machine_label(x.get("machine"))
        if label not in out:
            out.append(label)
    return out


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[reproduce] {msg}", flush=True)


def train_runs(specs, budget, runs_dir: Path, overrides, data_dir, progress: bool, quiet: bool) -> dict:
    out = {}
    for spec in specs:
        cfg = run_config(spec, budget, overrides, data_dir)
        d = runs_dir / spec.name
        state, step = run_state(d, cfg)
        if state == "done":
            _log(f"{spec.name}: finished ({step:,} steps), skipped", quiet)
        else:
            what = "training" if state == "new" else f"resuming from step {step:,}"
            _log(f"{spec.name}: {what} ({cfg.optim.steps:,} steps) in {d}", quiet)
            train(cfg, d, resume=state == "partial", progress=progress,
                  command=["robustfeat", "train", "--preset", spec.preset, "--budget", budget,
                           f"run.seed={spec.seed}", *overrides, "--out", str(d)])
        out[spec.name] = {"preset": spec.preset, "seed": spec.seed, "role": spec.role, "dir": str(d),
                          "cfg": cfg, "state_before": state}
    return out


# ---------------------------------------------------------------------------------------------------------
# evaluation


def _best_sha(run_dir: Path) -> str | None:
    """sha256 of the checkpoint a run is evaluated with (None: the run keeps no weights)."""
    if not ((run_dir / BEST).is_file() or (run_dir / LAST).is_file()):
        return None
    return file_sha256(checkpoint_path(run_dir, "best"))


def evaluate_once(run_dir: Path, source: Path | None, n: int | None, data_dir, progress: bool, quiet: bool,
             suite: str = "paper") -> dict:
    """``suite`` (the paper's) on ``run_dir``'s best checkpoint (black box from ``source``); skipped
    when eval/eval.json already holds it for the same checkpoints and sample size. A finished run
    published without weights keeps its recorded evaluation (said in the log)."""
    f = run_dir / "eval" / "eval.json"
    sha, src_sha = _best_sha(run_dir), (_best_sha(source) if source else None)
    old = _recorded(f, run_dir, sha, f"the {suite} suite", quiet, lambda old: (
        old["settings"]["suite"] == suite and _same_sample(old, n)
        and (sha is None or (old.get("source") or {}).get("sha256") == src_sha)))
    if old is not None:
        return old
    _log(f"{run_dir.name}: {suite} suite on {'all' if n is None else n} test images"
         + (f", black box from {source.name}" if source else ""), quiet)
    res = evaluate_run(run_dir, suite=suite, source=source, n=n, data_dir=data_dir, progress=progress)
    return json.loads(f.read_text()) if f.exists() else res


def _recorded(f: Path, run_dir: Path, sha: str | None, what: str, quiet: bool, matches) -> dict | None:
    """The result recorded in ``f`` when ``matches`` it and it was computed on the run's current ``best``
    (sha256 ``sha``; None: a finished run published without weights, whose record is used as it is).
    None: compute it again. A run without weights and without a matching record is refused."""
    if f.exists():
        try:
            old = json.loads(f.read_text())
            same = (sha is None or old["model"]["sha256"] == sha) and matches(old)
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if same:
            _log(f"{run_dir.name}: " + (f"{what} up to date, skipped" if sha is not None else
                                        f"weights not kept; its recorded {what} is used"), quiet)
            return old
    if sha is None:
        raise CheckpointError(
            f"{str(run_dir)!r} keeps no weights ({BEST} is missing) and no {f.parent.name}/{f.name} of {what} "
            "on this sample, so it cannot be evaluated; pass another --runs to train it again")
    return None


def autoattack_once(run_dir: Path, cfg, n: int, data_dir, progress: bool, quiet: bool) -> dict:
    """AutoAttack (standard) on ``run_dir``'s best checkpoint, beside natural accuracy and the preset's PGD
    on the same ``n`` seeded test images (so the AutoAttack-vs-PGD check compares like with like); written
    to RUN_DIR/eval-autoattack/ and skipped when that holds it for the same checkpoint and sample."""
    out = run_dir / AUTOATTACK_DIR
    f = out / "eval.json"
    old = _recorded(f, run_dir, _best_sha(run_dir), "AutoAttack", quiet, lambda old: (
        _same_sample(old, n) and any(r["id"] == "autoattack" for r in old["rows"])))
    if old is not None:
        return old
    a = cfg.eval_attack
    rows = [Row("natural"), Row("whitebox", a.loss, a.steps, a.eps, a.step_size, a.restarts),
            Row("autoattack", eps=a.eps)]
    _log(f"{run_dir.name}: AutoAttack (standard) on {n} test images", quiet)
    evaluate_run(run_dir, rows=rows, n=n, data_dir=data_dir, progress=progress, out_dir=out)
    return json.loads(f.read_text())


def _same_sample(old: dict, n: int | None) -> bool:
    """Whether an earlier result used the sample ``n`` asks for (None or n >= the test set: all of it)."""
    if old.get("indices") is None:
        return n is None or n >= old["n"]
    return old["n"] == n


# ---------------------------------------------------------------------------------------------------------
# analyses


def run_analysis(kind: str, runs: dict, budget: str, out: Path, data_dir, progress: bool) -> dict:
    """The target's analysis (``robustfeat.analysis.pipeline``, as ``robustfeat analyze`` computes it) on
    the best checkpoints of ``runs``: its figure under OUT/figures/ and its numbers for the README."""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    n = ANALYSIS_N.get(budget, ANALYSIS_N["cpu"])
    res: dict[str, Any] = {"kind": kind, "n_per_split": n, "figures": []}
    _ANALYSES[kind](res, runs, n, out, data_dir, progress)
    return res


def _figure2(res: dict, runs: dict, n, out: Path, data_dir, progress: bool) -> None:
    name, run = next(iter(runs.items()))
    a = attention_robustness(run["dir"], n=n, data_dir=data_dir, progress=progress)
    res["splits"] = {split: a.split_summary(split) for split in a.trained}
    a.plot(out / "figures/figure2_attention_robustness.png", f"Attention weight vs. feature robustness: {name}")
    res["figures"].append("figures/figure2_attention_robustness.png")


def _figure3(res: dict, runs: dict, n, out: Path, data_dir, progress: bool) -> None:
    name, run = next(iter(runs.items()))
    m = attention_maps_of_run(run["dir"], n=FIGURE_IMAGES, data_dir=data_dir)
    m.plot(out / "figures/figure3_attention_maps.png", f"Attention maps at the last residual block: {name}")
    res["figures"].append("figures/figure3_attention_maps.png")
    res["images"] = m.indices.tolist()


def _figure4(res: dict, runs: dict, n, out: Path, data_dir, progress: bool) -> None:
    g = gradient_maps_of_runs([r["dir"] for r in runs.values()], n=FIGURE_IMAGES, data_dir=data_dir)
    labels = [f"{r.cfg.name}\n{PAPER_TABLE4.get(r.cfg.name, {}).get('label', '')}" for r in g.runs]
    g.plot(out / "figures/figure4_gradient_maps.png", labels,
           note="clipped to mean +- 3 s.d. per image, then rescaled to [0, 1]")
    res["figures"].append("figures/figure4_gradient_maps.png")
    res["images"] = g.indices.tolist()


def _table4(res: dict, runs: dict, n, out: Path, data_dir, progress: bool) -> None:
    clf_name = next(k for k, r in runs.items() if r["role"] == "classifier")
    names = [k for k in runs if k != clf_name]
    t = gradient_classification(runs[clf_name]["dir"], [runs[k]["dir"] for k in names], n=n, data_dir=data_dir,
                                progress=progress)
    res["classifier"] = {"run": clf_name, "clean_test_acc": t.classifier_acc,
                         "paper_clean_test_acc": PAPER_CLASSIFIER_TEST_ACC}
    res["rows"] = {k: {"preset": run.cfg.name, "ours": acc, "paper": PAPER_TABLE4.get(run.cfg.name)}
                   for k, run, acc in zip(names, t.runs, t.accuracy, strict=True)}
    res["n"] = t.n


_ANALYSES = {"attention-robustness": _figure2, "attention-maps": _figure3, "gradient-maps": _figure4,
             "gradient-classification": _table4}


# ---------------------------------------------------------------------------------------------------------
# the whole target


def reproduce(
    target: str,
    budget: str = "cpu",
    out: str | os.PathLike | None = None,
    *,
    runs_dir: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    data_dir: str | None = None,
    progress: bool = False,
    quiet: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and analyse everything ``target`` needs under ``budget``; write DIR/README.md
    and DIR/reproduce.json; returns the summary. Finished work is skipped, interrupted runs resumed."""
    t0 = time.time()
    t, overrides, out, runs_dir = _check_args(target, budget, overrides, out, runs_dir)
    specs = plan(target)
    for s in specs:  # every config and every run directory before any training (and before any write)
        run_state(runs_dir / s.name, run_config(s, budget, overrides, data_dir))
    out.mkdir(parents=True, exist_ok=True)
    _log(f"{target} ({t.title}), budget {budget}: {len(specs)} runs in {runs_dir}", quiet)
    runs = train_runs(specs, budget, runs_dir, overrides, data_dir, progress, quiet)

    evals: dict[str, dict] = {}
    controls: dict[str, dict] = {}
    if t.evaluate:
        for s in specs:
            if s.role != "evaluated":
                continue
            d = Path(runs[s.name]["dir"])
            src = runs_dir / RunSpec(s.preset, 1, "").name if t.blackbox else None
            n = eval_n(budget, runs[s.name]["cfg"].data.name)
            evals[s.preset] = evaluate_once(d, src, n, data_dir, progress, quiet)
            if t.blackbox:
                # training-seed control: the seed-1 copy on the same test images (quick suite: natural, the
                # preset's PGD, CW-30), so two seeds of one method can be compared like two methods. The
                # size is the seed-0 evaluation's (quick alone would default to a 1,000-image subset).
                controls[s.preset] = evaluate_once(src, None, evals[s.preset]["n"], data_dir, progress, quiet,
                                              suite="quick")
    autoattack: dict[str, dict] = {}
    aa_n = AUTOATTACK_N.get(budget, {}).get(_family(t.dataset.lower()))
    if t.evaluate and aa_n:
        for s in specs:
            if s.role == "evaluated":
                autoattack[s.preset] = autoattack_once(Path(runs[s.name]["dir"]), runs[s.name]["cfg"], aa_n,
                                                       data_dir, progress, quiet)
    analysis = None
    if t.analysis:
        _log(f"analysis {t.analysis}", quiet)
        analysis = run_analysis(t.analysis, runs, budget, out, data_dir, progress)

    summary = _summary(target, t, budget, out, runs_dir, runs, evals, analysis, overrides, data_dir, t0, controls,
                       autoattack)
    atomic_write_text(out / "reproduce.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write_text(out / "README.md", render_readme(summary))
    _log(f"written {out / 'README.md'}", quiet)
    return summary


def _config_changes(preset: str, budget: str, overrides: list[str]) -> list[str]:
    """'key: paper value -> this budget's value' for every setting the budget (and overrides) change."""
    a = load_config(preset).to_dict()
    b = load_config(preset, budget, overrides).to_dict()
    out = []
    for sec, vals in b.items():
        if not isinstance(vals, dict):
            continue
        for k, v in vals.items():
            if k == "seed" or (sec == "data" and k == "dir"):
                continue
            if a[sec].get(k) != v:
                out.append(f"{sec}.{k}: {_fmt(a[sec].get(k))} -> {_fmt(v)}")
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _summary(target, t, budget, out, runs_dir, runs, evals, analysis, overrides, data_dir, t0,
             controls=None, autoattack=None) -> dict:
    run_rows = []
    for name, r in runs.items():
        d = Path(r["dir"])
        cfg = r["cfg"]
        rec = run_record(d, cfg)
        run_rows.append({
            "name": name, "preset": r["preset"], "seed": r["seed"], "role": r["role"],
            "dir": os.path.relpath(d, out), "path": str(d), "step": rec["step"], "steps": cfg.optim.steps,
            "examples": cfg.optim.steps * cfg.optim.batch_size,
            "best_val": rec["best_val"], "best_metric": rec["best_metric"], "last_val": rec["last_val"],
            "select": cfg.run.select,
            "wall_seconds": wall_seconds(d), "state_before": r["state_before"],
            "revisions": train_revisions(d), "machines": train_machines(d),
            "weights_fingerprint": model_fingerprint(load_model(d)) if _best_sha(d) else None,
        })
    results = {}
    for preset, ev in evals.items():
        paper = paper_results(preset)
        rows = []
        for row in ev["rows"]:
            p = (paper or {}).get("rows", {}).get(row["id"])
            ours = 100 * row["accuracy"]
            rows.append({"id": row["id"], "title": row["title"], "ours": ours,
                         "ci95": [100 * row["ci95"][0], 100 * row["ci95"][1]], "n": row["n"], "paper": p,
                         "diff": None if p is None else ours - p})
        results[preset] = {"column": (paper or {}).get("column", preset), "table": (paper or {}).get("table"),
                           "rows": rows, "checks": ev.get("checks", []), "masking_suspected": ev.get(
                               "masking_suspected"), "seconds": ev["settings"].get("seconds"),
                           "n": ev["n"], "subset": ev.get("subset"),
                           "eval_dir": os.path.relpath(Path(runs[f"{preset}-seed0"]["dir"]) / "eval", out)}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cmd = ["robustfeat", "reproduce", target, "--budget", budget, "--out", str(out)]
    if Path(runs_dir) != Path(out) / "runs":
        cmd += ["--runs", str(runs_dir)]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    for o in overrides:
        cmd += ["--set", o]
    return {
        "target": target, "title": t.title, "budget": budget, "overrides": overrides, "data_dir": data_dir,
        "out": str(out),
        "command": " ".join(cmd),
        "git_revision": git_revision(), "machine": machine_info(dev), "python": platform.python_version(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "this_session_seconds": round(time.time() - t0, 1),
        "budget_changes": {p: _config_changes(p, budget, overrides) for p in t.presets},
        "eval_n": {p: ev["n"] for p, ev in evals.items()},
        "runs": run_rows, "results": results, "analysis": analysis,
        "comparisons": (comps := _comparisons(results, controls or {}, runs)),
        "verdicts": verdicts(comps),
        "autoattack": _autoattack_summary(autoattack or {}, runs, out),
    }


def _autoattack_summary(aa: dict, runs: dict, out: Path) -> dict:
    """Per evaluated preset: its AutoAttack evaluation's rows; per method: the paired difference from the
    baseline (the first preset) under AutoAttack, on the same images."""
    if not aa:
        return {}
    rows = {}
    for p, ev in aa.items():
        d = Path(runs[f"{p}-seed0"]["dir"])
        rows[p] = {"n": ev["n"], "column": (paper_results(p) or {}).get("column", p),
                   "dir": os.path.relpath(d / AUTOATTACK_DIR, out), "seconds": ev["settings"].get("seconds"),
                   "rows": {r["id"]: {"title": r["title"], "ours": 100 * r["accuracy"],
                                      "ci95": [100 * r["ci95"][0], 100 * r["ci95"][1]]} for r in ev["rows"]},
                   "checks": ev.get("checks", [])}
    base = next(iter(aa))
    flags = {p: _per_example(Path(runs[f"{p}-seed0"]["dir"]), AUTOATTACK_DIR) for p in aa}
    diffs = []
    for p in list(aa)[1:]:
        a, b = flags[base], flags[p]
        if a is None or b is None or len(a["indices"]) != len(b["indices"]) or not (
                a["indices"] == b["indices"]).all():
            continue
        diffs.append({"label": f"{rows[p]['column']} - {rows[base]['column']}",
                      **paired_difference(a["autoattack"], b["autoattack"])})
    return {"presets": rows, "differences": diffs}


# ---------------------------------------------------------------------------------------------------------
# README


def _pct(v: float | None) -> str:
    """Accuracy in points (already multiplied by 100), two decimals, no unit."""
    return percent(v, scale=1, unit="")


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _short(fingerprint: str | None) -> str:
    return "not kept" if fingerprint is None else f"`{fingerprint[:16]}`"


def _hms(s: float) -> str:
    if math.isnan(s):
        return "?"
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render_readme(s: dict) -> str:
    L = [f"# Reproduction of {s['title']}", "",
         f"Budget **{s['budget']}**" + (" (the paper's published schedule)" if s["budget"] == "paper" else
                                        " (the paper's architectures and attacks, a shorter schedule: see "
                                        "Budget below; short budgets are not expected to reach the published "
                                        "numbers)") + ".", "",
         f"- command: `{s['command']}`",
         f"- git revision: `{s['git_revision']}`",
         f"- machine: {s['machine'].get('platform')}, {s['machine'].get('cpu_count')} CPUs "
         f"({machine_label(s['machine'])}), device {s['machine'].get('device')}"
         + f", torch {s['machine'].get('torch')}; this is where this command ran, and each run's training "
         "machine is in *trained on* under Runs",
         (f"- finished {s['finished']}; total training wall time "
         f"{_hms(sum(r['wall_seconds'] for r in s['runs']))}; evaluation "
         f"{_hms(sum((v['seconds'] or 0) for v in s['results'].values()))}"), ""]
    if s["overrides"]:
        L += [f"- overrides on top of the budget: `{' '.join(s['overrides'])}` (not a paper setting)", ""]
    if s["results"]:
        L += _results_section(s)
        L += _comparison_section(s)
        L += _verdict_section(s)
    L += _autoattack_section(s.get("autoattack") or {})
    if s.get("out") and (Path(s["out"]) / "NOTES.md").exists():
        L += ["## Reading", "", "What these numbers mean, beside the paper's claims: [NOTES.md](NOTES.md).", ""]
    if s["analysis"]:
        L += _analysis_section(s["analysis"])
    L += ["## Runs", "",
          "| run | role | steps | examples | best val | wall time | trained at | trained on | weights | directory |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["runs"]:
        bv = r.get("best_val", r.get("best_val_pgd"))
        bv_text = "-" if bv is None or bv < 0 else f"{100 * bv:.1f}% {_METRIC_SHORT[r.get('best_metric', 'pgd_acc')]}"
        revs = ", ".join(f"`{x[:10]}{'-dirty' if x.endswith('-dirty') else ''}`" for x in r.get("revisions", []))
        L.append(f"| `{r['name']}` | {r['role']} | {r['step']:,} / {r['steps']:,} | {r['examples']:,} | "
                 f"{bv_text} | {_hms(r['wall_seconds'])} | "
                 f"{revs or '?'} | {'; '.join(r.get('machines', [])) or '?'} | "
                 f"{_short(r['weights_fingerprint'])} | `{r['dir']}` |")
    selects = {r.get("select", "best-val") for r in s["runs"]}
    chosen = ("the `best` checkpoint is chosen by it (PGD accuracy; clean accuracy for a naturally trained model) "
              "and evaluated" if selects == {"best-val"} else
              "the budget's `run.select=final` makes the `best` checkpoint the last step's weights (its learning rate "
              "anneals to 0 there), which are evaluated; validation is watched, not used to choose"
              if selects == {"final"} else
              f"`run.select` differs between the runs ({', '.join(sorted(selects))}): see each run's config")
    L += ["", ("Validation accuracy is measured on a split held out of the training set (never the test set); "
          f"{chosen}. *weights*: the start of the sha256 of the "
          "`best` weights' tensors (names, shapes, values; `model_fingerprint` in eval.json), which a rerun of "
          "the same command reproduces on the same CPU model with the same thread count; on another CPU the "
          "kernels round differently and a rerun is another sample (docs/run-directory.md). *trained on*: each "
          "training session's machine from run.json (the CPU, the vector instructions torch dispatched to, its "
          "family and model, the thread count). Sessions from before these fields were recorded say \"CPU not recorded\" "
          "or lack the family and model; a results folder's notes may say more."),
          "", "## Budget", ""]
    if s["budget"] == "paper":
        L.append("The published schedules, unchanged.")
    else:
        L.append(f"Settings of budget `{s['budget']}` that differ from the paper's (`paper` -> `{s['budget']}`); "
                 "everything else, including the model and the attacks, is the paper's:")
        L.append("")
        for p, ch in s["budget_changes"].items():
            L.append(f"- `{p}`: " + ("; ".join(f"`{c}`" for c in ch) if ch else "no change"))
    if s["eval_n"]:
        L += ["", "Test images per evaluation: " + ", ".join(
            f"`{p}` {n:,}" for p, n in s["eval_n"].items())
            + " (a fixed seeded sample when smaller than the test set; 95% Wilson intervals are given)."]
    L += ["", "## Commands", "", "```bash", s["command"]]
    dd = f" --data-dir {s['data_dir']}" if s.get("data_dir") else ""
    for r in s["runs"]:
        pre, seed = r["preset"], r["seed"]
        sets = "".join(f" --set {o}" for o in s["overrides"])
        L.append(f"robustfeat train --preset {pre} --budget {s['budget']} --set run.seed={seed}{sets}{dd} "
                 f"--out {r['path']}")
    for p, v in s["results"].items():
        run = next(r for r in s["runs"] if r["preset"] == p and r["seed"] == 0)
        src = next((r for r in s["runs"] if r["preset"] == p and r["seed"] == 1), None)
        n = s["eval_n"].get(p)
        L.append(f"robustfeat eval {run['path']} --suite paper" + (f" --source {src['path']}" if src else "")
                 + (f" --n {n}" if v["subset"] != "full test set" else "") + dd)
    L += ["```", "", ("Re-running the reproduce command skips finished runs and evaluations and resumes "
          "interrupted runs."), ""]
    return "\n".join(L)


def _results_section(s: dict) -> list[str]:
    L = ["## Results", "",
         ("Accuracy in % on the test set (ours with its 95% CI), the paper's, and ours - paper. An example "
         "counts as robust only if its clean image is classified correctly too. Black box: adversaries "
         "crafted on an independently trained copy (same preset, seed 1)."), ""]
    res = s["results"]
    presets = list(res)
    ids = [r["id"] for r in res[presets[0]]["rows"] if r["paper"] is not None]
    L += ["### Summary (ours / paper)", "",
          "| row | " + " | ".join(res[p]["column"] for p in presets) + " |", "|---|" + "---|" * len(presets)]
    for rid in ids:
        cells = []
        for p in presets:
            row = next((r for r in res[p]["rows"] if r["id"] == rid), None)
            cells.append("-" if row is None else f"{_pct(row['ours'])} / {_pct(row['paper'])}")
        title = next(r["title"] for r in res[presets[0]]["rows"] if r["id"] == rid)
        L.append(f"| {title} | " + " | ".join(cells) + " |")
    L.append("")
    for p in presets:
        v = res[p]
        L += [f"### `{p}` ({v['column']})", "",
              (f"{v['n']:,} test images ({v['subset']}); evaluation {_hms(v['seconds'] or 0)}; "
              f"files in `{v['eval_dir']}/`."), "",
              "| row | ours | 95% CI | paper | ours - paper |", "|---|---|---|---|---|"]
        for r in v["rows"]:
            L.append(f"| {r['title']} | {_pct(r['ours'])} | {_pct(r['ci95'][0])}-{_pct(r['ci95'][1])} | "
                     f"{_pct(r['paper'])} | {_signed(r['diff'])} |")
        flagged = [c for c in v["checks"] if c["status"] == "flagged"]
        L += ["", "Gradient-masking checks: " + (
            "; ".join(f"**{c['name']} flagged** ({c['detail']})" for c in flagged) if flagged else
            "none flagged (" + ", ".join(f"{c['name']} {c['status']}" for c in v["checks"]) + ")."), ""]
    return L


def _per_example(run_dir: Path, sub: str = "eval") -> dict[str, Any] | None:
    """SUB/per_example.safetensors of a run: row id -> robust flags (bool array), plus 'indices'."""
    f = run_dir / sub / "per_example.safetensors"
    try:
        d = load_file(str(f))
    except (OSError, ValueError, SafetensorError):  # missing or damaged: no paired statistics
        return None
    return {k.replace(".", "/", 1) if k != "indices" else k: (v if k == "indices" else v.astype(bool))
            for k, v in d.items()}


def _comparisons(results: dict, controls: dict, runs: dict) -> list[dict]:
    """The paper's claims are differences between methods. For each row with published numbers: every
    method minus the table's first column (ours paired on the same test images, the paper's), and the
    seed-1 copy minus seed 0 of each method (the training-seed noise the method differences must beat)."""
    presets = list(results)
    if len(presets) < 2:
        return []
    flags = {p: _per_example(Path(runs[f"{p}-seed0"]["dir"])) for p in presets}
    ctrl = {p: _per_example(Path(runs[f"{p}-seed1"]["dir"])) for p in controls if f"{p}-seed1" in runs}
    base = presets[0]
    rows = []

    def same_images(x, y) -> bool:
        return x is not None and y is not None and len(x["indices"]) == len(y["indices"]) and bool(
            (x["indices"] == y["indices"]).all())

    for rb in results[base]["rows"]:
        if rb["paper"] is None:
            continue
        rid = rb["id"]
        for p in presets[1:]:
            r = next((x for x in results[p]["rows"] if x["id"] == rid), None)
            if r is None or r["paper"] is None:
                continue
            entry = {"row": rid, "title": rb["title"], "kind": "method", "a": base, "b": p,
                     "label": f"{results[p]['column']} - {results[base]['column']}",
                     "paper": r["paper"] - rb["paper"], "ours": r["ours"] - rb["ours"]}
            if same_images(flags[base], flags[p]) and rid in flags[base] and rid in flags[p]:
                entry.update(paired_difference(flags[base][rid], flags[p][rid]))
            rows.append(entry)
            cb, cp = ctrl.get(base), ctrl.get(p)  # the same comparison between the seed-1 copies: a replicate
            if same_images(cb, cp) and rid in cb and rid in cp:
                rows.append({"row": rid, "title": rb["title"], "kind": "method-seed1", "a": f"{base}-seed1",
                             "b": f"{p}-seed1", "label": f"{results[p]['column']} - {results[base]['column']} "
                             "(seed-1 copies)", "paper": r["paper"] - rb["paper"],
                             **paired_difference(cb[rid], cp[rid]),
                             "ours": 100 * float(cp[rid].mean() - cb[rid].mean())})
        for p in presets:
            c = ctrl.get(p)
            if c is None or not same_images(flags[p], c) or rid not in c or rid not in flags[p]:
                continue
            rows.append({"row": rid, "title": rb["title"], "kind": "seed", "a": f"{p}-seed0", "b": f"{p}-seed1",
                         "label": f"{results[p]['column']}: seed 1 - seed 0", "paper": None,
                         **paired_difference(flags[p][rid], c[rid]),
                         "ours": 100 * float(c[rid].mean() - flags[p][rid].mean())})
    return rows


# A paper difference smaller than this (in points) is read as the claim "no difference".
NO_CLAIM_POINTS = 0.5
# "No difference" is shown only by intervals that exclude any difference larger than this (in points):
# an interval that merely includes zero is absence of evidence, and a wide one includes the paper's
# claimed gains too. One point is below every non-zero difference the paper's Table 2 reports on the
# rows that get verdicts (the smallest is 1.27).
EQUIVALENCE_POINTS = 1.0


def _direction(entry: dict) -> int:
    """+1 / -1 when the paired 95% interval excludes zero on that side, else 0."""
    lo, hi = entry["ci95"]
    return 1 if lo > 0 else -1 if hi < 0 else 0


def _within_equivalence(*entries: dict) -> bool:
    """True when every paired interval lies inside +-EQUIVALENCE_POINTS."""
    return all(-EQUIVALENCE_POINTS <= e["ci95"][0] and e["ci95"][1] <= EQUIVALENCE_POINTS for e in entries)


def verdicts(comparisons: list[dict]) -> list[dict]:
    """One verdict per claim of the paper (a method minus the baseline at a row with published numbers)
    that has a seed-1 replicate: reproduced, contradicted or not resolved, with the reason.

    The rule the README states: a method difference counts only where its paired interval excludes zero
    in both independently trained pairs (seed 0 and seed 1), with the same sign, and where it is larger
    than the seed-to-seed change of either method on the same row (training randomness alone)."""
    by = {(c["row"], c["kind"], c["b"]): c for c in comparisons}
    out = []
    for c in comparisons:
        if c["kind"] != "method":
            continue
        rep = by.get((c["row"], "method-seed1", f"{c['b']}-seed1"))
        if rep is None or "ci95" not in c:
            continue
        seeds = [by.get((c["row"], "seed", f"{m}-seed1")) for m in (c["a"], c["b"])]
        noise = max((abs(x["ours"]) for x in seeds if x is not None), default=None)
        claim = 0 if abs(c["paper"]) < NO_CLAIM_POINTS else (1 if c["paper"] > 0 else -1)
        d0, d1 = _direction(c), _direction(rep)
        beats_noise = noise is not None and min(abs(c["ours"]), abs(rep["ours"])) > noise
        agree = d0 == d1 != 0 and beats_noise
        if claim == 0:
            verdict = ("contradicted" if agree else "reproduced" if _within_equivalence(c, rep)
                       else "not resolved")
        elif agree:
            verdict = "reproduced" if d0 == claim else "contradicted"
        else:
            verdict = "not resolved"
        out.append({"row": c["row"], "title": c["title"], "label": c["label"], "paper": c["paper"],
                    "seed0": c["ours"], "seed1": rep["ours"], "seed_noise": noise, "verdict": verdict,
                    "reason": _reason(verdict, claim, d0, d1, c, rep, noise, beats_noise)})
    return out


def _reason(verdict, claim, d0, d1, c, rep, noise, beats_noise) -> str:
    def side(d):
        return "above zero" if d > 0 else "below zero" if d < 0 else "includes zero"
    pairs = (f"seed-0 pair {c['ours']:+.2f} (interval {side(d0)}), seed-1 pair {rep['ours']:+.2f} "
             f"(interval {side(d1)})")
    noise_txt = "no seed-to-seed rows" if noise is None else f"seed-to-seed change up to {noise:.2f}"
    if claim == 0:
        span = f"{min(c['ci95'][0], rep['ci95'][0]):+.2f} to {max(c['ci95'][1], rep['ci95'][1]):+.2f}"
        if verdict == "contradicted":
            return f"paper: no difference ({c['paper']:+.2f}); {pairs}; both larger than the {noise_txt}"
        shown = "within" if verdict == "reproduced" else "not within"
        return (f"paper: no difference ({c['paper']:+.2f}); {pairs}; together they span {span}, {shown} "
                f"+-{EQUIVALENCE_POINTS:.1f}")
    # a claim can be unresolved in sign and still be ruled out in size: say so when both pairs exclude it
    where = ("above" if c["paper"] > max(c["ci95"][1], rep["ci95"][1])
             else "below" if c["paper"] < min(c["ci95"][0], rep["ci95"][0]) else None)
    size = f"; the paper's {c['paper']:+.2f} lies {where} both intervals" if where else ""
    if d0 == d1 != 0 and not beats_noise:
        return f"{pairs}, but not larger than the {noise_txt}{size}"
    return f"{pairs}; {noise_txt}{size}"


def _verdict_section(s: dict) -> list[str]:
    rows = s.get("verdicts") or []
    if not rows:
        return []
    L = ["### Verdicts on the paper's claims", "",
         ("Each claim is a method's difference from the baseline on a row the paper publishes and that both "
          "seed pairs measure. *Reproduced*: both independently trained pairs show it, each interval excludes "
          "zero on the paper's side, and both are larger than the seed-to-seed change of either method. "
          "*Contradicted*: the same, on the other side. *Not resolved at this budget*: anything else; the "
          "reason says which condition fails, and whether the paper's difference lies outside both intervals "
          "(then the claimed size, though not its sign, is ruled out at this budget). A paper difference under "
          f"{NO_CLAIM_POINTS} points is read as \"no difference\", which is *reproduced* only when both intervals "
          f"lie within +-{EQUIVALENCE_POINTS:.1f} points (below every difference the paper reports on these rows): "
          "an interval that merely includes zero does not show that two methods are alike."), "",
         "| row | difference | paper | seed 0 | seed 1 | verdict | why |", "|---|---|---|---|---|---|---|"]
    for v in rows:
        L.append(f"| {v['title']} | {v['label']} | {_signed(v['paper'])} | {_signed(v['seed0'])} | "
                 f"{_signed(v['seed1'])} | **{v['verdict']}** | {v['reason']} |")
    return [*L, ""]


def _autoattack_section(a: dict) -> list[str]:
    if not a:
        return []
    pres = a["presets"]
    L = ["### AutoAttack (standard) on the seed-0 models", "",
         ("AutoAttack (APGD-CE, APGD-T, FAB-T, Square; the `pyautoattack` package) on a seeded sample of test "
          "images, beside natural accuracy and the preset's PGD on the same images. An AutoAttack accuracy "
          "far below PGD's would mean PGD overstates robustness (the check flags a gap over its limit)."), "",
         "| model | images | Natural | PGD | AutoAttack | 95% CI | AutoAttack - PGD | check |",
         "|---|---|---|---|---|---|---|---|"]
    for p, v in pres.items():
        r = v["rows"]
        pgd = next(x for k, x in r.items() if k.startswith("whitebox/"))
        aa = r["autoattack"]
        chk = next((c for c in v["checks"] if c["name"] == "autoattack_vs_pgd"), None)
        L.append(f"| `{p}` ({v['column']}) | {v['n']:,} | {_pct(r['natural']['ours'])} | {pgd['title']}: "
                 f"{_pct(pgd['ours'])} | {_pct(aa['ours'])} | {_pct(aa['ci95'][0])}-{_pct(aa['ci95'][1])} | "
                 f"{_signed(aa['ours'] - pgd['ours'])} | {chk['status'] if chk else '-'} |")
    if a["differences"]:
        L += ["", "Methods against the baseline under AutoAttack (paired, same images; one seed pair):", "",
              "| difference | ours | 95% CI | McNemar p | images won / lost |", "|---|---|---|---|---|"]
        for d in a["differences"]:
            L.append(f"| {d['label']} | {_signed(d['diff'])} | {d['ci95'][0]:+.2f} to {d['ci95'][1]:+.2f} | "
                     f"{d['p_mcnemar']:.2g} | {d['only_b']} / {d['only_a']} |")
    L.append("")
    L.append("Files: " + ", ".join(f"`{v['dir']}/`" for v in pres.values()) + ".")
    return [*L, ""]


def _comparison_section(s: dict) -> list[str]:
    rows = s.get("comparisons") or []
    if not rows:
        return []
    L = ["### Differences: methods against the baseline, and two seeds of one method", "",
         ("The paper's claims are differences between methods. Ours are paired (the same test images): "
          "95% interval of the difference and the exact McNemar p-value of the images only one model gets "
          "right. These intervals cover the test sample only, not training randomness. For that, the "
          "black-box copies (seed 1) are evaluated on the same images too: *seed 1 - seed 0* rows show how far "
          "training randomness alone moves a number, and *(seed-1 copies)* rows repeat the method comparison "
          "on an independently trained pair. A method difference is a finding only where it exceeds the seed "
          "differences and holds in both pairs."), "",
         "| row | difference | paper | ours | 95% CI | McNemar p | images won / lost |",
         "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"{r['ci95'][0]:+.2f} to {r['ci95'][1]:+.2f}" if "ci95" in r else "-"
        p = f"{r['p_mcnemar']:.2g}" if "p_mcnemar" in r else "-"
        wl = f"{r['only_b']} / {r['only_a']}" if "only_b" in r else "-"
        L.append(f"| {r['title']} | {r['label']} | {_signed(r['paper'])} | {_signed(r['ours'])} | {ci} | {p} | "
                 f"{wl} |")
    return [*L, ""]


def _analysis_section(a: dict) -> list[str]:
    L = ["## Analysis", ""]
    n = a.get("n_per_split")
    if a["kind"] == "attention-robustness":
        L.append(f"Mean clean-image attention weight at each robustness rank (rank 0 = the local feature whose "
                 f"clean and adversarial values are closest), {'all' if n is None else f'{n:,}'} images per split. "
                 "The paper's claim: weights fall with the rank (negative Spearman correlation). The control "
                 "is an untrained model of the same architecture measured the same way: a slope it shares "
                 "comes from the architecture, not from training.")
        L += ["", ("| split | images | Spearman(rank, weight) | weight at rank 0 | at the last rank | uniform | "
                   "untrained control: Spearman | control weight at rank 0 |"),
              "|---|---|---|---|---|---|---|---|"]
        for sp, r in a["splits"].items():
            ctrl = (f"{r['control_spearman']:+.3f} | {r['control_weight_rank0']:.4f}" if "control_spearman" in r
                    else "- | -")
            L.append(f"| {sp} | {r['n']:,} | {r['spearman_rank_vs_weight']:+.3f} | {r['weight_rank0']:.4f} | "
                     f"{r['weight_last_rank']:.4f} | {r['uniform_weight']:.4f} | {ctrl} |")
    elif a["kind"] == "gradient-classification":
        c = a["classifier"]
        L.append(f"Classifier `{c['run']}`: clean accuracy {100 * c['clean_test_acc']:.2f}% on the test images used "
                 f"(paper: {100 * c['paper_clean_test_acc']:.2f}%). Images: {a['n']['train']:,} training, "
                 f"{a['n']['test']:,} test. Accuracy in % on the gradient maps (ours / paper / ours - paper):")
        L += ["", "| model | clipped, train | clipped, test | raw, train | raw, test |", "|---|---|---|---|---|"]
        for k, r in a["rows"].items():
            cells = []
            for col in ("clipped_train", "clipped_test", "raw_train", "raw_test"):
                ours = 100 * r["ours"][col]
                v, sp = col.split("_")
                p = 100 * r["paper"][v][sp] if r["paper"] else None
                cells.append(f"{ours:.2f} / {_pct(p)} / {_signed(None if p is None else ours - p)}")
            L.append(f"| `{k}` | " + " | ".join(cells) + " |")
    for f in a.get("figures", []):
        L += ["", f"![{Path(f).stem}]({f})"]
    if a.get("images"):
        L += ["", f"Test images shown: {a['images']} (the first image of each class)."]
    return [*L, ""]


def default_out(target: str, budget: str) -> Path:
    return Path("results") / f"{target}-{budget}"


def dry_run(target: str, budget: str, out: str | os.PathLike | None = None, *,
            runs_dir: str | os.PathLike | None = None, overrides: list[str] | None = None,
            data_dir: str | None = None) -> list[str]:
    """One line per run the target needs: name, role, state (new / partial / done) and steps; a run
    directory that ``reproduce`` would refuse is refused here too (one line)."""
    _, overrides, out, runs_dir = _check_args(target, budget, overrides, out, runs_dir)
    lines = []
    for spec in plan(target):
        cfg = run_config(spec, budget, overrides, data_dir)
        state, step = run_state(runs_dir / spec.name, cfg)  # a run reproduce would refuse: refused here
        lines.append(f"{spec.name:<34} {spec.role:<17} {state:<8} step {step:,}/{cfg.optim.steps:,} "
                     f"({cfg.optim.steps * cfg.optim.batch_size:,} examples)")
    return lines
