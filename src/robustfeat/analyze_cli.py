"""``robustfeat analyze ...``: the paper's Figures 2, 3, 4 and Table 4 as commands.

    robustfeat analyze attention-robustness RUN_DIR [--n N]                       # Figure 2
    robustfeat analyze attention-maps RUN_DIR [--n 10]                            # Figure 3
    robustfeat analyze gradient-maps RUN_DIR [RUN_DIR ...] [--n 10]               # Figure 4
    robustfeat analyze gradient-classification --classifier NATURAL_RUN RUN_DIR ...  # Table 4

Everything is written to ``RUN_DIR/analysis/`` (the first RUN_DIR for multi-run commands; ``--out``
picks another folder). The computations live in ``robustfeat.analysis``, the plots in
``robustfeat.figures``; heavy imports happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ATTENTION_ROBUSTNESS_SEED = 41
SUBSET_SEED = 42


def _common(s: argparse.ArgumentParser, n_help: str, n_default: int | None) -> None:
    s.add_argument("--n", type=int, default=n_default, help=n_help)
    s.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint path")
    s.add_argument("--data-dir", help="data directory (default: the run's data.dir)")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, default=200)
    s.add_argument("--out", help="output folder (default RUN_DIR/analysis)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def register_cli(sub) -> None:
    p = sub.add_parser("analyze", help="the paper's analyses: Figures 2-4 and Table 4",
                       description="Analyses of trained runs (paper sections 4.3 and 4.4). Each writes "
                       "PNG figures and tables into RUN_DIR/analysis/.")
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    s = asub.add_parser("attention-robustness", help="Figure 2: attention weight vs feature robustness rank")
    s.add_argument("run_dir")
    _common(s, "images per split (a fixed seeded subset; default: the whole training and test sets)", None)
    s.add_argument("--splits", default="train,test", help="comma-separated: train, val, test (default train,test)")
    s.set_defaults(func=cmd_attention_robustness)

    s = asub.add_parser("attention-maps", help="Figure 3: attention maps overlaid on test images")
    s.add_argument("run_dir")
    _common(s, "number of test images (default 10: one per class)", 10)
    s.set_defaults(func=cmd_attention_maps)

    s = asub.add_parser("gradient-maps", help="Figure 4: gradient maps of one or more models")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    _common(s, "number of test images (default 10: one per class)", 10)
    s.add_argument("--no-clip", action="store_true", help="rescale the raw gradients without the +-3 std clip")
    s.set_defaults(func=cmd_gradient_maps)

    s = asub.add_parser("gradient-classification",
                        help="Table 4: a naturally trained classifier labels each model's gradient maps")
    s.add_argument("--classifier", required=True, metavar="NATURAL_RUN_DIR",
                   help="run directory of a naturally trained model (preset cifar10-natural in the paper)")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    _common(s, "images per split (a fixed seeded subset; default: the whole training and test sets)", None)
    s.set_defaults(func=cmd_gradient_classification)


# ---------------------------------------------------------------------------------------------------
# helpers


def _user_error(msg: str):
    from .cli import CLIError

    return CLIError(msg)


def _load_attention_run(args, analysis: str):
    """Check --n, load RUN_DIR, and refuse (one line, exit 2) a model without attention."""
    from .analysis import AnalysisError, require_attention

    _check_n(args)
    model, cfg, meta, dev = _load(args.run_dir, args)
    try:
        require_attention(model, analysis)
    except AnalysisError as e:
        raise _user_error(f"{args.run_dir} ({cfg.name}): {e}") from None
    return model, cfg, meta, dev


def _load(run_dir: str, args):
    from .api import load_run
    from .build import resolve_device

    try:
        dev = resolve_device(args.device)
    except ValueError as e:
        raise _user_error(str(e)) from None
    model, cfg, meta = load_run(run_dir, args.checkpoint, dev)
    return model, cfg, meta, dev


def _splits(cfg, args):
    from .build import build_splits

    return build_splits(cfg, args.data_dir)


def _out_dir(run_dir: str, args) -> Path:
    out = Path(args.out) if args.out else Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_n(args) -> None:
    if args.n is not None and args.n < 1:
        raise _user_error(f"--n must be at least 1, got {args.n}")
    if args.batch_size < 1:
        raise _user_error(f"--batch-size must be at least 1, got {args.batch_size}")


def _split_data(splits, name: str):
    if name == "train":
        return splits.x_train, splits.y_train
    if name == "val":
        return splits.x_val, splits.y_val
    if name == "test":
        return splits.x_test, splits.y_test
    raise _user_error(f"unknown split {name!r}; use train, val or test")


SPLIT_TITLES = {"train": "Training set", "val": "Validation set", "test": "Test set"}


def _write_json(path: Path, obj) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# Figure 2


def cmd_attention_robustness(args) -> int:
    import torch

    from .analysis import analysis_attack, attention_vs_robustness, subset, untrained_control
    from .checkpoint import atomic_write_text
    from .figures import plot_attention_robustness
    from .seeding import derived_seed

    model, cfg, meta, dev = _load_attention_run(args, "attention-robustness")
    names = [s.strip() for s in args.splits.split(",") if s.strip()]
    splits = _splits(cfg, args)
    attack = analysis_attack(cfg.attack)
    untrained = untrained_control(cfg, splits.dataset.num_classes, splits.dataset.image_shape[0], dev,
                                  derived_seed(ATTENTION_ROBUSTNESS_SEED, 99))
    results, controls = {}, {}
    for k, name in enumerate(names):
        x, y = _split_data(splits, name)
        x, y = subset(x, y, args.n, derived_seed(SUBSET_SEED, k))
        for dest, m, what in ((results, model, ""), (controls, untrained, ", untrained control")):
            gen = torch.Generator(device=dev).manual_seed(derived_seed(ATTENTION_ROBUSTNESS_SEED, k))
            dest[name] = attention_vs_robustness(m, x, y, attack, batch_size=args.batch_size, device=dev,
                                                 generator=gen, progress=not args.quiet,
                                                 desc=f"Figure 2, {name} ({len(y):,} images{what})")
    out = _out_dir(args.run_dir, args)
    title = (f"Attention weight vs. feature robustness: {cfg.name} (step {meta['step']:,}); "
             f"adversary PGD-{attack.steps}, eps={attack.eps:.4g}")
    png = plot_attention_robustness({SPLIT_TITLES[n]: r for n, r in results.items()},
                                    out / "attention_robustness.png", title=title,
                                    controls={SPLIT_TITLES[n]: c for n, c in controls.items()})
    lines = ["rank," + ",".join(f"{n}_mean_weight,{n}_std_weight" for n in names)]
    length = len(next(iter(results.values())).mean)
    for r in range(length):
        lines.append(f"{r}," + ",".join(f"{results[n].mean[r]:.8g},{results[n].std[r]:.8g}" for n in names))
    atomic_write_text(out / "attention_robustness.csv", "\n".join(lines) + "\n")
    summary = {
        "run_dir": str(args.run_dir), "preset": cfg.name, "step": meta["step"],
        "attack": {"name": f"PGD-{attack.steps}", **{k: v for k, v in attack.__dict__.items()}},
        "robustness": "L2 distance between clean and adversarial local features of the last residual block",
        "splits": {n: {"n": r.n, "grid": list(r.grid), "spearman_rank_vs_weight": r.spearman,
                       "weight_rank0": float(r.mean[0]), "weight_last_rank": float(r.mean[-1]),
                       "uniform_weight": 1.0 / length, "control_spearman": controls[n].spearman,
                       "control_mean_by_rank": controls[n].mean.tolist()} for n, r in results.items()},
    }
    _write_json(out / "attention_robustness.json", summary)
    for n, r in results.items():
        print(f"{SPLIT_TITLES[n]} ({r.n:,} images): Spearman rank correlation between robustness rank and "
              f"attention weight = {r.spearman:+.3f} (negative: more weight on more robust features); "
              f"mean weight at rank 0 {r.mean[0]:.4f}, at rank {length - 1} {r.mean[-1]:.4f}, "
              f"uniform {1 / length:.4f}; "
              f"an untrained model of the same architecture: Spearman {controls[n].spearman:+.3f}")
    print(f"written: {png}, {out / 'attention_robustness.csv'}, {out / 'attention_robustness.json'}")
    return 0


# ---------------------------------------------------------------------------------------------------
# Figure 3


def cmd_attention_maps(args) -> int:
    from .analysis import attention_maps, pick_examples
    from .evaluate import to_float_images
    from .figures import plot_attention_maps

    model, cfg, meta, dev = _load_attention_run(args, "attention-maps")
    splits = _splits(cfg, args)
    idx = pick_examples(splits.y_test, args.n)
    x = to_float_images(splits.x_test[idx], dev)
    y = splits.y_test[idx]
    w, up, pred = attention_maps(model, x, device=dev, batch_size=args.batch_size)
    classes = splits.dataset.classes
    out = _out_dir(args.run_dir, args)
    # in units of the uniform weight: 1 = 1 / (H' W'), so the scale reads the same for any map size
    rel = up * (up.shape[-2] * up.shape[-1])
    png = plot_attention_maps(
        x.cpu(), rel, [classes[int(c)] for c in y], out / "attention_maps.png",
        predictions=[classes[int(c)] for c in pred],
        title=f"Attention maps at the last residual block ({w.shape[1]}x{w.shape[2]}): {cfg.name}, "
              f"step {meta['step']:,}",
    )
    print(f"written: {png} ({len(idx)} test images {idx.tolist()})")
    return 0


# ---------------------------------------------------------------------------------------------------
# Figure 4


def _model_label(cfg) -> str:
    from .analysis import PAPER_TABLE4

    paper = PAPER_TABLE4.get(cfg.name)
    return f"{cfg.name}\n{paper['label']}" if paper else cfg.name


def _check_same_data(cfgs, dirs) -> None:
    names = {c.data.name for c in cfgs}
    if len(names) > 1:
        raise _user_error("the runs use different datasets ("
                          + ", ".join(f"{d}: {c.data.name}" for d, c in zip(dirs, cfgs, strict=True)) + ")")


def cmd_gradient_maps(args) -> int:
    from .analysis import gradient_maps, pick_examples, prepare_maps
    from .evaluate import to_float_images
    from .figures import plot_gradient_maps

    _check_n(args)
    loaded = [_load(d, args) for d in args.run_dirs]
    _check_same_data([lc[1] for lc in loaded], args.run_dirs)
    _, cfg0, _, dev = loaded[0]
    splits = _splits(cfg0, args)
    idx = pick_examples(splits.y_test, args.n)
    x = to_float_images(splits.x_test[idx], dev)
    y = splits.y_test[idx].to(dev)
    rows = []
    for model, cfg, meta, _ in loaded:
        g = gradient_maps(model, x, y)
        rows.append((f"{_model_label(cfg)}\n(step {meta['step']:,})", prepare_maps(g, clip=not args.no_clip).cpu()))
    classes = splits.dataset.classes
    out = _out_dir(args.run_dirs[0], args)
    name = "gradient_maps_raw.png" if args.no_clip else "gradient_maps.png"
    note = ("raw gradients rescaled to [0, 1] by their min and max per image" if args.no_clip else
            "gradients clipped to mean +- 3 s.d. per image, then rescaled to [0, 1] by min and max")
    png = plot_gradient_maps(x.cpu(), rows, [classes[int(c)] for c in y], out / name,
                             title="Gradient maps: d cross-entropy / d input", note=note)
    print(f"written: {png} ({len(idx)} test images {idx.tolist()})")
    return 0


# ---------------------------------------------------------------------------------------------------
# Table 4


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def cmd_gradient_classification(args) -> int:
    from .analysis import (
        PAPER_CLASSIFIER_TEST_ACC,
        PAPER_TABLE4,
        PAPER_TABLE4_CLASSIFIER,
        gradient_map_accuracy,
        subset,
    )
    from .checkpoint import atomic_write_text
    from .config import ConfigError, load_config
    from .evaluate import accuracy
    from .seeding import derived_seed

    _check_n(args)
    clf, clf_cfg, clf_meta, dev = _load(args.classifier, args)
    loaded = [_load(d, args) for d in args.run_dirs]
    _check_same_data([clf_cfg, *[lc[1] for lc in loaded]], [args.classifier, *args.run_dirs])
    splits = _splits(clf_cfg, args)
    shape = tuple(splits.x_test.shape[1:])
    data = {}
    for k, name in enumerate(("train", "test")):
        data[name] = subset(*_split_data(splits, name), args.n, derived_seed(SUBSET_SEED, 10 + k))
    clf_acc = accuracy(clf, data["test"][0], data["test"][1], None, device=dev, batch_size=args.batch_size,
                       progress=False)["clean_acc"]

    def paper_schedule(cfg) -> bool:
        try:
            return load_config(cfg.name).optim.steps == cfg.optim.steps
        except ConfigError:  # a custom config: no paper schedule to compare with
            return False

    rows = []
    for d, (model, cfg, meta, _) in zip(args.run_dirs, loaded, strict=True):
        row = {"run_dir": str(d), "preset": cfg.name, "method": cfg.method.name, "step": meta["step"],
               "paper_schedule": paper_schedule(cfg)}
        for name, (x, y) in data.items():
            acc = gradient_map_accuracy(model, clf, x, y, batch_size=args.batch_size, device=dev,
                                        progress=not args.quiet, desc=f"Table 4, {cfg.name}, {name} ({len(y):,})")
            for v, a in acc.items():
                row[f"{v}_{name}"] = a
        paper = PAPER_TABLE4.get(cfg.name) if cfg.data.name == "cifar10" else None
        row["paper"] = paper
        rows.append(row)

    res = {
        "classifier": {"run_dir": str(args.classifier), "preset": clf_cfg.name, "step": clf_meta["step"],
                       "clean_test_acc": clf_acc, "paper_clean_test_acc": PAPER_CLASSIFIER_TEST_ACC
                       if clf_cfg.name == PAPER_TABLE4_CLASSIFIER else None},
        "n": {name: len(y) for name, (_, y) in data.items()},
        "image_shape": list(shape),
        "preparation": {"clipped": "per image: clip to mean +- 3 std over all C*H*W values, then min/max "
                        "rescale to [0, 1]", "raw": "per image: min/max rescale of the raw gradient to [0, 1]"},
        "rows": rows,
    }
    out = _out_dir(args.run_dirs[0], args)
    _write_json(out / "gradient_classification.json", res)

    md = ["# Table 4: accuracy of a naturally trained classifier on gradient maps", "",
          f"Classifier: `{clf_cfg.name}` ({args.classifier}, step {clf_meta['step']:,}), clean accuracy "
          f"{_pct(clf_acc)} on the {len(data['test'][1]):,} test images used"
          + (f" (paper: {_pct(PAPER_CLASSIFIER_TEST_ACC)})" if res["classifier"]["paper_clean_test_acc"] else "")
          + ".", "",
          (f"Images: {res['n']['train']:,} training, {res['n']['test']:,} test ({'x'.join(map(str, shape))}); "
           "maps = d CE / d input at the true label, presented to the classifier as [0, 1] images of the same "
           "layout. With clipping: mean +- 3 std per image, then min/max rescale; without: min/max rescale only."),
          "",
          ("| model | source | with clipping, train | with clipping, test | without clipping, train | "
           "without clipping, test |"),
          "|---|---|---|---|---|---|"]
    for r in rows:
        sched = "" if r["paper_schedule"] else ", short budget"
        md.append(f"| `{r['preset']}` (step {r['step']:,}{sched}) | ours | {_pct(r['clipped_train'])} | "
                  f"{_pct(r['clipped_test'])} | {_pct(r['raw_train'])} | {_pct(r['raw_test'])} |")
        p = r["paper"]
        if p:
            md.append(f"| {p['label']} | paper | {_pct(p['clipped']['train'])} | {_pct(p['clipped']['test'])} | "
                      f"{_pct(p['raw']['train'])} | {_pct(p['raw']['test'])} |")
    atomic_write_text(out / "gradient_classification.md", "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwritten: {out / 'gradient_classification.md'}, {out / 'gradient_classification.json'}")
    return 0
