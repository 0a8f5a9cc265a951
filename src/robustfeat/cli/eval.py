"""``robustfeat eval RUN_DIR [--suite quick|paper|full] [--source OTHER_RUN_DIR] [--n N] [--curves]``, or
``robustfeat eval --model MODULE:FUNCTION [--weights FILE] --dataset NAME ...`` for a model defined
outside robustfeat."""

from __future__ import annotations

import argparse
import json

from ..config import parse_fraction
from ..data import DATASETS
from ..eval.external import evaluate_external
from ..eval.report import render_markdown
from ..eval.run import QUICK_N, evaluate_run
from .common import CLIError


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
        "set, plus PGD with 4 more random restarts. full: paper + targeted PGD + AutoAttack (standard). Every "
        "suite reports the per-example worst case over its white-box rows as the robust accuracy. Writes "
        "RUN_DIR/eval/eval.json, eval.md, eval.csv and per_example.safetensors; the checks (zero gradients, "
        "randomness, gradient masking, restarts, transfer) are reported with the results. A model defined "
        "outside robustfeat: --model MODULE:FUNCTION --weights FILE --dataset NAME instead of RUN_DIR.")
    s.add_argument("run_dir", nargs="?", help="run directory (or give --model)")
    s.add_argument("--model", metavar="MODULE:FUNCTION",
                   help="factory of a model defined elsewhere (package.module:function or file.py:function), "
                   "called with no arguments; the model maps [0, 1] images to logits")
    s.add_argument("--weights", metavar="FILE", help="--model's state dict (.safetensors or a weights-only torch file)")
    s.add_argument("--dataset", choices=DATASETS, help="--model's dataset (its test set is evaluated)")
    s.add_argument("--curves", action="store_true",
                   help="also accuracy against eps (0 to 2x, on to chance) and against PGD steps (1-200), as "
                   "curve_eps/curve_steps .csv and .png")
    s.add_argument("--transfer-from", metavar="NATURAL_RUN_DIR",
                   help="naturally trained run (same data): adds the transfer row and its check")
    s.add_argument("--transfer-checkpoint", default="best", help="checkpoint of --transfer-from")
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


def _check_model_args(args: argparse.Namespace) -> None:
    if args.model is None:
        if args.run_dir is None:
            raise CLIError("give a RUN_DIR, or --model MODULE:FUNCTION with --dataset NAME")
        given = [f for f, v in (("--weights", args.weights), ("--dataset", args.dataset)) if v is not None]
        if given:
            raise CLIError(f"{' and '.join(given)} go with --model MODULE:FUNCTION, not with a run directory")
        return
    if args.run_dir is not None:
        raise CLIError(f"give either RUN_DIR ({args.run_dir!r}) or --model, not both")
    if args.dataset is None:
        raise CLIError(f"--model needs --dataset (one of {', '.join(DATASETS)})")
    if args.checkpoint != "best":
        raise CLIError("--checkpoint is for run directories; a --model takes its state dict from --weights")


def cmd_eval(args: argparse.Namespace) -> int:
    _check_model_args(args)
    common = {"suite": args.suite, "source": args.source, "source_which": args.source_checkpoint,
              "transfer_from": args.transfer_from, "transfer_which": args.transfer_checkpoint, "n": args.n,
              "data_dir": args.data_dir, "eps": args.eps, "step_size": args.step_size, "restarts": args.restarts,
              "device": args.device, "batch_size": args.batch_size, "seed": args.seed, "progress": not args.quiet,
              "out_dir": args.out, "curves": args.curves}
    if args.model is not None:
        res = evaluate_external(args.model, weights=args.weights, dataset=args.dataset, **common)
    else:
        res = evaluate_run(args.run_dir, which=args.checkpoint, **common)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "indices"}, indent=2))
        return 0
    print(render_markdown(res))
    extra = ", curve_eps.png, curve_steps.png" if res.get("curves") else ""
    print(f"written to {res['outputs']}/ (eval.json, eval.md, eval.csv{extra})")
    return 0
