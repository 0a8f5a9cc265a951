"""``robustfeat reproduce TARGET [--budget cpu|paper|fast|smoke]``: see ``robustfeat.reproduce``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..reproduce import TARGETS, default_out, dry_run, reproduce


def register(sub) -> None:
    s = sub.add_parser(
        "reproduce", help="train, evaluate and analyse everything a paper table or figure needs",
        description="Reproduce a table or figure of the paper: trains every model it needs (seeds 0 and 1 "
        "for black-box rows), evaluates with the paper's suite, runs the analyses and writes DIR/README.md "
        "with our numbers beside the paper's. Re-running skips finished work and resumes interrupted runs.")
    s.add_argument("target", choices=list(TARGETS), metavar="TARGET", help=", ".join(TARGETS))
    s.add_argument("--budget", default="cpu",
                   help="paper (published schedules), cpu (short CPU schedules, default), cpu-3epoch (CIFAR: "
                   "fp32, for CPUs without bf16 hardware), cpu-1epoch (CIFAR: one epoch), fast (FGSM-RS, beyond "
                   "the paper) or smoke (seconds, for checks)")
    s.add_argument("--out", help="output directory (default results/TARGET-BUDGET)")
    s.add_argument("--runs", help="where the run directories live (default OUT/runs); share it between targets")
    s.add_argument("--data-dir", help="data directory (default $ROBUSTFEAT_DATA, else the user cache)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of every run (recorded in the README; not a paper setting)")
    s.add_argument("--dry-run", action="store_true", help="print the runs the target needs and their state")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.dry_run:
        for line in dry_run(args.target, args.budget, args.out, runs_dir=args.runs, overrides=args.set,
                            data_dir=args.data_dir):
            print(line)
        return 0
    s = reproduce(args.target, args.budget, args.out, runs_dir=args.runs, overrides=args.set,
                  data_dir=args.data_dir, progress=not args.quiet, quiet=args.quiet)
    out = Path(args.out) if args.out else default_out(args.target, args.budget)
    print(f"done: {s['title']} ({s['budget']} budget); report in {out}/README.md")
    return 0
