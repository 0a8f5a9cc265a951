"""The ``robustfeat`` command line: every argparse definition lives in this package, and each
subcommand is a thin call of a library function.

    robustfeat presets
    robustfeat train --preset NAME [--budget cpu] [--out DIR] [--data-dir DIR] [KEY=VALUE ...]
    robustfeat train --resume DIR
    robustfeat eval RUN_DIR [--suite quick|paper|full] [--source OTHER_RUN_DIR] [--n N]
    robustfeat analyze attention-robustness|attention-maps|gradient-maps|gradient-classification ...
    robustfeat reproduce TARGET [--budget cpu|paper|fast|smoke]
    robustfeat bench [--json] [--out results/bench]
    robustfeat demo

Modules: ``train`` (presets, train, demo), ``eval``, ``analyze``, ``reproduce``, ``bench``, ``common``
(user-error types). Under torchrun (``torchrun --nproc_per_node=N -m robustfeat train ...``) only
rank 0 prints. User errors (bad config values, missing data, bad checkpoints) print one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..train import Interrupted
from . import analyze, bench, eval, reproduce, train
from .common import USER_ERRORS, CLIError, one_line

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="robustfeat",
        description="Adversarial training with feature prioritization and L2 feature regularization.",
    )
    p.add_argument("--version", action="version", version=f"robustfeat {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    # the order of ``robustfeat --help``
    for register in (train.register, analyze.register, eval.register, bench.register, reproduce.register,
                     train.register_demo):
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"robustfeat {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up mid-run: one line, the run stays resumable
        print(f"robustfeat {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # training's Interrupted says what was kept; anything else saved nothing
        what = one_line(e) if isinstance(e, Interrupted) else "interrupted"
        print(f"robustfeat {args.command}: {what}", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
