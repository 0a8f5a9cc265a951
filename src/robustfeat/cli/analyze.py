"""``robustfeat analyze ...``: the paper's Figures 2, 3, 4 and Table 4 as commands.

    robustfeat analyze attention-robustness RUN_DIR [--n N]                       # Figure 2
    robustfeat analyze attention-maps RUN_DIR [--n 10]                            # Figure 3
    robustfeat analyze gradient-maps RUN_DIR [RUN_DIR ...] [--n 10]               # Figure 4
    robustfeat analyze gradient-classification --classifier NATURAL_RUN RUN_DIR ...  # Table 4

Everything is written to ``RUN_DIR/analysis/`` (the first RUN_DIR for multi-run commands; ``--out``
picks another folder). Each command is one call of ``robustfeat.analysis.pipeline``, the functions
``robustfeat reproduce`` calls too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis import pipeline
from .common import CLIError


def _common(s: argparse.ArgumentParser, n_help: str, n_default: int | None) -> None:
    s.add_argument("--n", type=int, default=n_default, help=n_help)
    s.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint path")
    s.add_argument("--data-dir", help="data directory (default: the run's data.dir)")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, default=200)
    s.add_argument("--out", help="output folder (default RUN_DIR/analysis)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
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


def _options(args) -> dict:
    return {"which": args.checkpoint, "data_dir": args.data_dir, "device": args.device,
            "batch_size": args.batch_size}


def _out_dir(run_dir: str, args, create: bool = True) -> Path:
    """RUN_DIR/analysis or --out; refused (before any work, ``create=False``) when it is a file."""
    out = Path(args.out) if args.out else Path(run_dir) / "analysis"
    if out.exists() and not out.is_dir():
        raise CLIError(f"output {str(out)!r} exists and is not a directory; pass --out DIR")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_attention_robustness(args) -> int:
    _out_dir(args.run_dir, args, create=False)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    res = pipeline.attention_robustness(args.run_dir, splits=splits, n=args.n, progress=not args.quiet,
                                        **_options(args))
    files = pipeline.save_attention_robustness(res, _out_dir(args.run_dir, args))
    print("\n".join(pipeline.describe_attention_robustness(res)))
    print("written: " + ", ".join(map(str, files)))
    return 0


def cmd_attention_maps(args) -> int:
    _out_dir(args.run_dir, args, create=False)
    m = pipeline.attention_maps_of_run(args.run_dir, n=args.n, **_options(args))
    cfg, meta = m.run.cfg, m.run.meta
    png = m.plot(_out_dir(args.run_dir, args) / "attention_maps.png",
                 title=f"Attention maps at the last residual block ({m.grid[0]}x{m.grid[1]}): {cfg.name}, "
                       f"step {meta['step']:,}")
    print(f"written: {png} ({len(m.indices)} test images {m.indices.tolist()})")
    return 0


def cmd_gradient_maps(args) -> int:
    _out_dir(args.run_dirs[0], args, create=False)
    g = pipeline.gradient_maps_of_runs(args.run_dirs, n=args.n, clip=not args.no_clip, **_options(args))
    labels = [f"{pipeline.model_label(r.cfg)}\n(step {r.meta['step']:,})" for r in g.runs]
    name = "gradient_maps_raw.png" if args.no_clip else "gradient_maps.png"
    png = g.plot(_out_dir(args.run_dirs[0], args) / name, labels)
    print(f"written: {png} ({len(g.indices)} test images {g.indices.tolist()})")
    return 0


def cmd_gradient_classification(args) -> int:
    _out_dir(args.run_dirs[0], args, create=False)
    res = pipeline.gradient_classification(args.classifier, args.run_dirs, n=args.n, progress=not args.quiet,
                                           **_options(args))
    out = _out_dir(args.run_dirs[0], args)
    print(pipeline.save_gradient_classification(res, out))
    print(f"\nwritten: {out / 'gradient_classification.md'}, {out / 'gradient_classification.json'}")
    return 0
