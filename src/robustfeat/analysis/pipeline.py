"""The paper's analyses on trained runs, one function per analysis, shared by ``robustfeat analyze`` and
``robustfeat reproduce``: the same runs with the same options give the same numbers from either.

    attention_robustness(run_dir)                    # Figure 2
    attention_maps_of_run(run_dir)                   # Figure 3
    gradient_maps_of_runs(run_dirs)                  # Figure 4
    gradient_classification(classifier, run_dirs)    # Table 4

Each loads the runs' checkpoints, draws the images (fixed seeded subsets, or the first image of each
class for figures), computes with ``robustfeat.analysis.measures`` and returns a result object; the
``save_*`` functions write the files of ``robustfeat analyze`` (PNG figures, CSV, JSON, markdown).
Every random draw is seeded by the constants below and the split's position in ``splits``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attacks import accuracy
from ..build import build_splits, resolve_device
from ..checkpoint import atomic_write_text
from ..config import AttackConfig, Config, ConfigError, load_config
from ..data import to_float_images
from ..eval.load import load_run
from ..eval.paper import PAPER_CLASSIFIER_TEST_ACC, PAPER_TABLE4, PAPER_TABLE4_CLASSIFIER
from ..eval.report import percent
from ..seeding import derived_seed
from .figures import plot_attention_maps, plot_attention_robustness, plot_gradient_maps
from .measures import (
    AnalysisError,
    RankAverage,
    analysis_attack,
    attention_maps,
    attention_vs_robustness,
    gradient_map_accuracy,
    gradient_maps,
    pick_examples,
    prepare_maps,
    require_attention,
    subset,
    untrained_control,
)

ATTENTION_ROBUSTNESS_SEED = 41
"""Seeds Figure 2's attack starts (stream = the split's position) and its untrained control (stream 99)."""
SUBSET_SEED = 42
"""Seeds the image subsets: Figure 2's split k with stream k, Table 4's with stream 10 + k."""
FIGURE_IMAGES = 10
"""Figures 3 and 4: one test image per class."""
SPLIT_TITLES = {"train": "Training set", "val": "Validation set", "test": "Test set"}


@dataclass
class LoadedRun:
    run_dir: str
    model: nn.Module
    cfg: Config
    meta: dict[str, Any]


def _check_sizes(n: int | None, batch_size: int) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise AnalysisError(f"--n must be at least 1, got {n}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AnalysisError(f"--batch-size must be at least 1, got {batch_size}")


def _load(run_dirs, which: str, device) -> tuple[list[LoadedRun], torch.device]:
    if isinstance(run_dirs, (str, bytes)) or not run_dirs:  # a string would be read letter by letter
        raise AnalysisError(f"run_dirs={run_dirs!r}: expected a list of run directories")
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return [LoadedRun(str(d), *load_run(d, which, dev)) for d in run_dirs], dev


def _same_data(runs: list[LoadedRun]) -> None:
    if len({r.cfg.data.name for r in runs}) > 1:
        raise AnalysisError("the runs use different datasets ("
                            + ", ".join(f"{r.run_dir}: {r.cfg.data.name}" for r in runs) + ")")


def _split(splits, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if name not in SPLIT_TITLES:
        raise AnalysisError(f"unknown split {name!r}; use train, val or test")
    if splits is None:
        return None
    return getattr(splits, f"x_{name}"), getattr(splits, f"y_{name}")


def _attention_run(run_dir, which: str, device, analysis: str) -> tuple[LoadedRun, torch.device]:
    """Load RUN_DIR and refuse (one line) a model without attention."""
    (run,), dev = _load([run_dir], which, device)
    try:
        require_attention(run.model, analysis)
    except AnalysisError as e:
        raise AnalysisError(f"{run_dir} ({run.cfg.name}): {e}") from None
    return run, dev


# ---------------------------------------------------------------------------------------------------
# Figure 2


@dataclass
class AttentionRobustness:
    """Figure 2 of one run: per split, the trained model's curve and the untrained control's."""

    run: LoadedRun
    attack: AttackConfig
    trained: dict[str, RankAverage] = field(default_factory=dict)
    control: dict[str, RankAverage] = field(default_factory=dict)

    def split_summary(self, split: str) -> dict[str, Any]:
        r, c = self.trained[split], self.control[split]
        return {"n": r.n, "grid": list(r.grid), "spearman_rank_vs_weight": r.spearman,
                "weight_rank0": float(r.mean[0]), "weight_last_rank": float(r.mean[-1]),
                "uniform_weight": 1.0 / len(r.mean), "mean_by_rank": r.mean.tolist(),
                "control_spearman": c.spearman, "control_weight_rank0": float(c.mean[0]),
                "control_mean_by_rank": c.mean.tolist()}

    def plot(self, path: str | Path, title: str) -> Path:
        return plot_attention_robustness({SPLIT_TITLES[s]: r for s, r in self.trained.items()}, path, title=title,
                                         controls={SPLIT_TITLES[s]: c for s, c in self.control.items()})


def attention_robustness(
    run_dir, *, splits=("train", "test"), n: int | None = None, which: str = "best", data_dir: str | None = None,
    device="auto", batch_size: int = 200, progress: bool = False,
) -> AttentionRobustness:
    """Figure 2: mean clean-image attention weight per feature-robustness rank on each split (``n``
    images each, a fixed seeded subset; None: all), for the run and for an untrained model of its
    architecture, with the run's training attack in eval mode (``analysis_attack``)."""
    _check_sizes(n, batch_size)
    if isinstance(splits, str) or not splits:
        raise AnalysisError(f"splits={splits!r}: expected a list of split names (train, val, test)")
    for name in splits:
        _split(None, name)  # the names, before anything is loaded
    run, dev = _attention_run(run_dir, which, device, "attention-robustness")
    data = build_splits(run.cfg, data_dir)
    res = AttentionRobustness(run, analysis_attack(run.cfg.attack))
    untrained = untrained_control(run.cfg, data.dataset.num_classes, data.dataset.image_shape[0], dev,
                                  derived_seed(ATTENTION_ROBUSTNESS_SEED, 99))
    for k, name in enumerate(splits):
        x, y = subset(*_split(data, name), n, derived_seed(SUBSET_SEED, k))
        for dest, m, what in ((res.trained, run.model, ""), (res.control, untrained, ", untrained control")):
            gen = torch.Generator(device=dev).manual_seed(derived_seed(ATTENTION_ROBUSTNESS_SEED, k))
            dest[name] = attention_vs_robustness(m, x, y, res.attack, batch_size=batch_size, device=dev,
                                                 generator=gen, progress=progress,
                                                 desc=f"Figure 2, {name} ({len(y):,} images{what})")
    return res


def save_attention_robustness(res: AttentionRobustness, out: Path) -> list[Path]:
    """attention_robustness.png, .csv (mean and std weight per rank and split) and .json; returns them."""
    cfg, meta, attack = res.run.cfg, res.run.meta, res.attack
    title = (f"Attention weight vs. feature robustness: {cfg.name} (step {meta['step']:,}); "
             f"adversary PGD-{attack.steps}, eps={attack.eps:.4g}")
    png = res.plot(out / "attention_robustness.png", title)
    names = list(res.trained)
    lines = ["rank," + ",".join(f"{n}_mean_weight,{n}_std_weight" for n in names)]
    for r in range(len(res.trained[names[0]].mean)):
        lines.append(f"{r}," + ",".join(f"{res.trained[n].mean[r]:.8g},{res.trained[n].std[r]:.8g}" for n in names))
    atomic_write_text(out / "attention_robustness.csv", "\n".join(lines) + "\n")
    summary = {
        "run_dir": res.run.run_dir, "preset": cfg.name, "step": meta["step"],
        "attack": {"name": f"PGD-{attack.steps}", **dict(attack.__dict__)},
        "robustness": "L2 distance between clean and adversarial local features of the last residual block",
        "splits": {n: res.split_summary(n) for n in names},
    }
    _write_json(out / "attention_robustness.json", summary)
    return [png, out / "attention_robustness.csv", out / "attention_robustness.json"]


def describe_attention_robustness(res: AttentionRobustness) -> list[str]:
    """One line per split: the Spearman correlation, the end points and the control's correlation."""
    lines = []
    for n, r in res.trained.items():
        length = len(r.mean)
        lines.append(f"{SPLIT_TITLES[n]} ({r.n:,} images): Spearman rank correlation between robustness rank and "
                     f"attention weight = {r.spearman:+.3f} (negative: more weight on more robust features); "
                     f"mean weight at rank 0 {r.mean[0]:.4f}, at rank {length - 1} {r.mean[-1]:.4f}, "
                     f"uniform {1 / length:.4f}; "
                     f"an untrained model of the same architecture: Spearman {res.control[n].spearman:+.3f}")
    return lines


# ---------------------------------------------------------------------------------------------------
# Figure 3


@dataclass
class AttentionMaps:
    run: LoadedRun
    indices: torch.Tensor  # the test images shown
    images: torch.Tensor  # (B, C, H, W) float in [0, 1], on the CPU
    maps: torch.Tensor  # (B, H, W) upsampled weights in units of the uniform weight (1 = 1 / (H' W'))
    grid: tuple[int, int]
    labels: list[str]
    predictions: list[str]

    def plot(self, path: str | Path, title: str) -> Path:
        return plot_attention_maps(self.images, self.maps, self.labels, path, predictions=self.predictions,
                                   title=title)


def attention_maps_of_run(
    run_dir, *, n: int = FIGURE_IMAGES, which: str = "best", data_dir: str | None = None, device="auto",
    batch_size: int = 200,
) -> AttentionMaps:
    """Figure 3: the attention maps of the first ``n`` test images in class order (``pick_examples``)."""
    _check_sizes(n, batch_size)
    run, dev = _attention_run(run_dir, which, device, "attention-maps")
    data = build_splits(run.cfg, data_dir)
    idx = pick_examples(data.y_test, n)
    x = to_float_images(data.x_test[idx], dev)
    w, up, pred = attention_maps(run.model, x, device=dev, batch_size=batch_size)
    classes = data.dataset.classes
    # in units of the uniform weight: 1 = 1 / (H' W'), so the scale reads the same for any map size
    rel = up * (up.shape[-2] * up.shape[-1])
    return AttentionMaps(run, idx, x.cpu(), rel, tuple(w.shape[1:]), [classes[int(c)] for c in data.y_test[idx]],
                         [classes[int(c)] for c in pred])


# ---------------------------------------------------------------------------------------------------
# Figure 4


@dataclass
class GradientMaps:
    runs: list[LoadedRun]
    indices: torch.Tensor
    images: torch.Tensor  # (B, C, H, W) float in [0, 1], on the CPU
    labels: list[str]
    maps: list[torch.Tensor]  # per run: prepared maps (B, C, H, W) in [0, 1], on the CPU
    clip: bool

    @property
    def note(self) -> str:
        return ("gradients clipped to mean +- 3 s.d. per image, then rescaled to [0, 1] by min and max" if self.clip
                else "raw gradients rescaled to [0, 1] by their min and max per image")

    def plot(self, path: str | Path, row_labels: list[str], note: str | None = None) -> Path:
        return plot_gradient_maps(self.images, list(zip(row_labels, self.maps, strict=True)), self.labels, path,
                                  title="Gradient maps: d cross-entropy / d input",
                                  note=self.note if note is None else note)


def gradient_maps_of_runs(
    run_dirs, *, n: int = FIGURE_IMAGES, clip: bool = True, which: str = "best", data_dir: str | None = None,
    device="auto", batch_size: int = 200,
) -> GradientMaps:
    """Figure 4: each run's gradient maps of the first ``n`` test images in class order, prepared as
    images (clipped to +-3 std first when ``clip``)."""
    _check_sizes(n, batch_size)
    runs, dev = _load(run_dirs, which, device)
    _same_data(runs)
    data = build_splits(runs[0].cfg, data_dir)
    idx = pick_examples(data.y_test, n)
    x = to_float_images(data.x_test[idx], dev)
    y = data.y_test[idx].to(dev)
    maps = [prepare_maps(gradient_maps(r.model, x, y), clip=clip).cpu() for r in runs]
    return GradientMaps(runs, idx, x.cpu(), [data.dataset.classes[int(c)] for c in y], maps, clip)


def model_label(cfg: Config) -> str:
    """The preset, and the paper's name of its method where Table 4 has one."""
    paper = PAPER_TABLE4.get(cfg.name)
    return f"{cfg.name}\n{paper['label']}" if paper else cfg.name


# ---------------------------------------------------------------------------------------------------
# Table 4


@dataclass
class GradientClassification:
    classifier: LoadedRun
    classifier_acc: float  # clean accuracy on the test images used
    n: dict[str, int]  # images per split
    image_shape: tuple[int, ...]
    runs: list[LoadedRun]
    accuracy: list[dict[str, float]]  # per run: {"clipped_train", "clipped_test", "raw_train", "raw_test"}

    @property
    def paper_classifier_acc(self) -> float | None:
        return PAPER_CLASSIFIER_TEST_ACC if self.classifier.cfg.name == PAPER_TABLE4_CLASSIFIER else None


def gradient_classification(
    classifier_dir, run_dirs, *, n: int | None = None, which: str = "best", data_dir: str | None = None,
    device="auto", batch_size: int = 200, progress: bool = False,
) -> GradientClassification:
    """Table 4: accuracy of a naturally trained classifier on each run's gradient maps (clipped and
    raw), on ``n`` training and ``n`` test images (fixed seeded subsets; None: all)."""
    _check_sizes(n, batch_size)
    loaded, dev = _load([classifier_dir, *run_dirs], which, device)
    _same_data(loaded)
    clf, runs = loaded[0], loaded[1:]
    splits = build_splits(clf.cfg, data_dir)
    data = {name: subset(*_split(splits, name), n, derived_seed(SUBSET_SEED, 10 + k))
            for k, name in enumerate(("train", "test"))}
    clf_acc = accuracy(clf.model, *data["test"], None, device=dev, batch_size=batch_size,
                       progress=False)["clean_acc"]
    accs = []
    for run in runs:
        row = {}
        for name, (x, y) in data.items():
            acc = gradient_map_accuracy(run.model, clf.model, x, y, batch_size=batch_size, device=dev,
                                        progress=progress, desc=f"Table 4, {run.cfg.name}, {name} ({len(y):,})")
            row.update({f"{v}_{name}": a for v, a in acc.items()})
        accs.append(row)
    return GradientClassification(clf, clf_acc, {k: len(y) for k, (_, y) in data.items()},
                                  tuple(splits.x_test.shape[1:]), runs, accs)


def _paper_schedule(cfg: Config) -> bool:
    try:
        return load_config(cfg.name).optim.steps == cfg.optim.steps
    except ConfigError:  # a custom config: no paper schedule to compare with
        return False


def save_gradient_classification(res: GradientClassification, out: Path) -> str:
    """gradient_classification.json and .md (our rows, the paper's beside them); returns the markdown."""
    clf = res.classifier
    rows = []
    for run, acc in zip(res.runs, res.accuracy, strict=True):
        rows.append({"run_dir": run.run_dir, "preset": run.cfg.name, "method": run.cfg.method.name,
                     "step": run.meta["step"], "paper_schedule": _paper_schedule(run.cfg), **acc,
                     "paper": PAPER_TABLE4.get(run.cfg.name) if run.cfg.data.name == "cifar10" else None})
    summary = {
        "classifier": {"run_dir": clf.run_dir, "preset": clf.cfg.name, "step": clf.meta["step"],
                       "clean_test_acc": res.classifier_acc, "paper_clean_test_acc": res.paper_classifier_acc},
        "n": res.n,
        "image_shape": list(res.image_shape),
        "preparation": {"clipped": "per image: clip to mean +- 3 std over all C*H*W values, then min/max "
                        "rescale to [0, 1]", "raw": "per image: min/max rescale of the raw gradient to [0, 1]"},
        "rows": rows,
    }
    _write_json(out / "gradient_classification.json", summary)
    md = _table4_markdown(res, rows)
    atomic_write_text(out / "gradient_classification.md", md + "\n")
    return md


def _table4_markdown(res: GradientClassification, rows: list[dict]) -> str:
    clf, shape = res.classifier, res.image_shape
    md = ["# Table 4: accuracy of a naturally trained classifier on gradient maps", "",
          f"Classifier: `{clf.cfg.name}` ({clf.run_dir}, step {clf.meta['step']:,}), clean accuracy "
          f"{percent(res.classifier_acc)} on the {res.n['test']:,} test images used"
          + (f" (paper: {percent(PAPER_CLASSIFIER_TEST_ACC)})" if res.paper_classifier_acc else "")
          + ".", "",
          (f"Images: {res.n['train']:,} training, {res.n['test']:,} test ({'x'.join(map(str, shape))}); "
           "maps = d CE / d input at the true label, presented to the classifier as [0, 1] images of the same "
           "layout. With clipping: mean +- 3 std per image, then min/max rescale; without: min/max rescale only."),
          "",
          ("| model | source | with clipping, train | with clipping, test | without clipping, train | "
           "without clipping, test |"),
          "|---|---|---|---|---|---|"]
    for r in rows:
        sched = "" if r["paper_schedule"] else ", short budget"
        md.append(f"| `{r['preset']}` (step {r['step']:,}{sched}) | ours | {percent(r['clipped_train'])} | "
                  f"{percent(r['clipped_test'])} | {percent(r['raw_train'])} | {percent(r['raw_test'])} |")
        p = r["paper"]
        if p:
            md.append(f"| {p['label']} | paper | {percent(p['clipped']['train'])} | "
                      f"{percent(p['clipped']['test'])} | {percent(p['raw']['train'])} | {percent(p['raw']['test'])} |")
    return "\n".join(md)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
