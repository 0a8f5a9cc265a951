"""``robustfeat bench [--json] [--out results/bench]``: see ``robustfeat.bench``."""

from __future__ import annotations

import argparse
import json
import sys

from ..bench import ALL_VARIANTS, DEFAULT_PRESETS, DEFAULT_VARIANTS, format_table, run_bench, write_results

_OPTIONS = ("presets", "variants", "warmup", "repeats", "steps", "batch", "attack_steps", "eval_steps",
            "no_eval", "data_size", "workers", "matmul_size", "device", "threads", "set", "profile", "json", "out",
            "suite_run", "suites", "suite_n")


def command_line(args: argparse.Namespace) -> str:
    """The ``robustfeat bench`` command that reproduces ``args`` (every option spelled out)."""
    parts = ["robustfeat", "bench"]
    for name in _OPTIONS:
        v = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if v is None or v is False:
            continue
        if v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts += [x for item in v for x in (flag, item)]
        else:
            parts += [flag, str(v)]
    return " ".join(parts)


def cmd_bench(args: argparse.Namespace) -> int:
    args.command_line = command_line(args)
    report = run_bench(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        if "profile" in report:
            print(report["profile"]["table"])
    if args.out:
        js, md = write_results(report, args.out)
        print(f"written to {js} and {md}", file=sys.stderr if args.json else sys.stdout)
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "bench", help="training / PGD evaluation throughput and FLOP/s, against a textbook loop",
        description="Measure, on this device, training throughput (attack included) of our step and of a "
        "textbook adversarial-training loop, PGD evaluation throughput, FLOPs per example and the achieved "
        "fraction of the device's fp32 matmul rate. For results/bench/: run on a quiet machine with the "
        "defaults and --out results/bench (see benchmarks/README.md).",
    )
    s.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help=f"comma-separated presets to measure (default {','.join(DEFAULT_PRESETS)})")
    s.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"training steps to time: {', '.join(ALL_VARIANTS)} (default ours,textbook)")
    s.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    s.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5); median and spread")
    s.add_argument("--steps", type=int, default=2, help="training steps per timed repeat (default 2)")
    s.add_argument("--batch", type=int, help="batch size (default: the preset's)")
    s.add_argument("--attack-steps", type=int, help="training attack steps (default: the preset's)")
    s.add_argument("--eval-steps", type=int, help="evaluation PGD steps (default: the preset's, PGD-20 on CIFAR)")
    s.add_argument("--no-eval", action="store_true", help="skip the PGD evaluation throughput")
    s.add_argument("--data-size", type=int, default=2048, help="synthetic training images (default 2048)")
    s.add_argument("--workers", type=int, default=0, help="DataLoader workers of the textbook loop (default 0)")
    s.add_argument("--matmul-size", type=int, default=2048, help="N of the N x N fp32 matmul peak; 0 = skip")
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every case")
    s.add_argument("--profile", action="store_true", help="add the operator profile of the first case's step")
    s.add_argument("--suite-run", metavar="RUN_DIR",
                   help="also time whole evaluation suites on this trained run's checkpoint and test images")
    s.add_argument("--suites", help="suites timed with --suite-run (default paper,full)")
    s.add_argument("--suite-n", type=int, help="test images per suite with --suite-run (default 200)")
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.add_argument("--out", metavar="DIR", help="also write DIR/<device>-<date>.json and .md")
    s.set_defaults(func=cmd_bench)
