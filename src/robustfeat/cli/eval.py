"""``robustfeat eval RUN_DIR [--suite quick|paper|full] [--source OTHER_RUN_DIR] [--n N]``."""

from __future__ import annotations

import argparse
import json

from ..config import parse_fraction
from ..eval.report import render_markdown
from ..eval.run import QUICK_N, evaluate_run


def _fraction(text: str) -> float:
    """A number such as 0.3, 1e-3 or 8/255 (``robustfeat.config``'s parser of config values)."""
    try:
        return float(parse_fraction(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.3 or 8/255)") from None


def register(sub) -> None:
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
    res = evaluate_run(
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
