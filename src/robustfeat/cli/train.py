"""``robustfeat presets``, ``robustfeat train`` and ``robustfeat demo``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .. import __version__
from ..api import describe_config
from ..config import ConfigError, list_presets, load_config, preset_budgets, read_config_file
from ..eval import evaluate_run
from ..train import train
from ..train.state import METRIC_NAMES
from .common import CLIError


def register(sub) -> None:
    s = sub.add_parser("presets", help="list the experiment presets")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("train", help="train a model from a preset",
                       description="Train from a preset; KEY=VALUE arguments override any config value, "
                       "e.g. optim.steps=100 attack.eps=8/255.")
    s.add_argument("--preset", help="preset name (robustfeat presets)")
    s.add_argument("--config", help="a YAML config file instead of a preset")
    s.add_argument("--budget", default="paper", help="paper (the published schedule) or a short budget: cpu, cpu-3epoch or cpu-1epoch (CIFAR), fast (FGSM-RS) or smoke")
    s.add_argument("--out", help="run directory (default runs/PRESET[-BUDGET]-seedN)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped")
    s.add_argument("--data-dir", help="data directory (default $ROBUSTFEAT_DATA, else the user cache)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=0.01")
    s.set_defaults(func=cmd_train)


def register_demo(sub) -> None:
    s = sub.add_parser("demo", help="train AT-reg on the embedded MNIST sample and report PGD-40 accuracy")
    s.add_argument("--out", help="run directory (default runs/demo-TIMESTAMP)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    s.set_defaults(func=cmd_demo)


def cmd_presets(args: argparse.Namespace) -> int:
    rows = []
    for name in list_presets():
        cfg = load_config(name)
        rows.append((name, cfg.data.name, cfg.model.name, cfg.method.name, ",".join(preset_budgets(name)),
                     cfg.description))
    if args.json:
        keys = ("name", "dataset", "model", "method", "budgets", "description")
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2))
        return 0
    head = ("preset", "dataset", "model", "method", "budgets", "description")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    return 0


def _default_out(cfg_name: str, budget: str, seed: int) -> Path:
    suffix = "" if budget == "paper" else f"-{budget}"
    return Path("runs") / f"{cfg_name}{suffix}-seed{seed}"


def _resume_config(args: argparse.Namespace, overrides: list[str]):
    """(config saved in the run directory, the run directory) for --resume; refuses anything else given."""
    out = Path(args.resume)
    cfg_file = out / "config.yaml"
    if not out.exists():
        raise CLIError(f"--resume {str(out)!r}: no such run directory")
    if not out.is_dir():
        raise CLIError(f"--resume {str(out)!r} is a file; expected a run directory (with config.yaml and "
                       "checkpoints/last.safetensors)")
    if not cfg_file.exists():
        raise CLIError(f"--resume {str(out)!r}: no config.yaml there; is it a robustfeat run directory?")
    if args.preset or args.config or overrides or args.budget != "paper":
        raise CLIError("--resume takes the config saved in the run directory; drop "
                       "--preset/--config/--budget/overrides")
    if args.out and Path(args.out) != out:
        raise CLIError(f"--resume continues the run in {str(out)!r}; drop --out {args.out}")
    try:
        return read_config_file(cfg_file), out
    except ConfigError as e:
        raise CLIError(f"--resume {str(out)!r}: the run's config.yaml is damaged or invalid ({e})") from None


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or []) + list(args.set or [])
    if args.resume:
        cfg, out = _resume_config(args, overrides)
    else:
        if not args.preset and not args.config:
            raise CLIError("train needs --preset NAME (see 'robustfeat presets'), --config FILE or --resume DIR")
        if args.preset and args.config:
            raise CLIError(f"--preset {args.preset} and --config {args.config} both given: a run has one config; "
                           "pass one of them (a config file may say 'inherit: PRESET')")
        cfg = load_config(args.preset, args.budget, overrides, path=args.config)
        out = Path(args.out) if args.out else _default_out(cfg.name, args.budget, cfg.run.seed)
    if args.data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=args.data_dir))
    main_rank = os.environ.get("RANK", "0") == "0"  # torchrun's rank (the group is joined in train())
    if not args.quiet and main_rank:
        print(f"robustfeat {__version__}: {describe_config(cfg)}")
        print(f"run directory: {out}")
    res = train(cfg, out, resume=bool(args.resume), progress=not args.quiet, command=sys.argv)
    val = res.last_val
    if not main_rank:
        return 0
    if res.note:
        print(f"{out}: {res.note}")
        return 0
    print(
        f"done: step {res.step:,} in {res.seconds:.0f}s; validation clean {val.get('clean_acc', float('nan')):.2%}, "
        f"PGD {val.get('pgd_acc', float('nan')):.2%}; best validation {METRIC_NAMES[res.best_metric]} "
        f"{res.best_val:.2%}; "
        f"checkpoints in {out / 'checkpoints'}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = load_config("demo", "paper", list(args.overrides or []))
    out = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    print("robustfeat demo: adversarial training with L2 feature regularization (AT-reg) on the MNIST")
    print("sample shipped with the package (offline).")
    print(f"schedule: {describe_config(cfg)}")
    print(f"run directory: {out}")
    t0 = time.time()
    train(cfg, out, progress=not args.quiet, command=sys.argv)
    t_train = time.time() - t0
    print(f"trained in {t_train:.0f}s; evaluating the checkpoint chosen on validation data "
          f"on the {1000:,} embedded test images ...")
    res = evaluate_run(out, which="best", progress=not args.quiet)
    a = res["attack"]
    print(f"test accuracy: clean {res['clean_acc']:.2%}, PGD-{a['steps']} (eps={a['eps']:g}, step {a['step_size']:g}, "
          f"random start) {res['pgd_acc']:.2%}  [{time.time() - t0:.0f}s in all]")
    return 0
