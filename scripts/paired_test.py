"""Per-image sign test between two evaluated runs on the same test images.

    python scripts/paired_test.py RUN_A RUN_B [--row whitebox/pgd-40] [--eval-dir eval]

Reads RUN/EVAL_DIR/per_example.safetensors of both runs (written by `robustfeat eval`: one 0/1 flag
per test image and row, and the evaluated test indices). Both must cover the same test images. Prints
both accuracies, the images robust under only one of the two models, and the two-sided exact sign-test
p-value on those discordant images (McNemar's exact test).

Only the files are read: nothing is imported from robustfeat.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def robust_flags(run_dir: Path, row: str, eval_dir: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted test indices, robust flags in that order) of one run's evaluation row."""
    path = run_dir / eval_dir / "per_example.safetensors"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; evaluate the run first (robustfeat eval {run_dir})")
    t = load_file(str(path))
    key = row.replace("/", ".")
    if key not in t:
        rows = sorted(k.replace(".", "/", 1) for k in t if k != "indices")
        raise SystemExit(f"{run_dir}: no row {row!r} in its per_example.safetensors; it has {', '.join(rows)}")
    order = t["indices"].argsort()
    return t["indices"][order], t[key][order].bool()


def sign_test_p(only_a: int, only_b: int) -> float:
    """Two-sided exact sign test of the discordant pairs (exact binomial, p = 1/2)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def compare(run_a: Path, run_b: Path, row: str = "whitebox/pgd-40", eval_dir: str = "eval") -> str:
    idx_a, a = robust_flags(run_a, row, eval_dir)
    idx_b, b = robust_flags(run_b, row, eval_dir)
    if not torch.equal(idx_a, idx_b):
        raise SystemExit(f"{run_a} and {run_b} were evaluated on different test images; "
                         "evaluate both with the same --n and --seed")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return (f"{run_a}: {a.float().mean() * 100:.2f}%  {run_b}: {b.float().mean() * 100:.2f}%  "
            f"robust only under the first {only_a}, only under the second {only_b}, "
            f"sign test p = {sign_test_p(only_a, only_b):.2g}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path, metavar="RUN_A")
    ap.add_argument("run_b", type=Path, metavar="RUN_B")
    ap.add_argument("--row", default="whitebox/pgd-40", help="evaluation row id (default whitebox/pgd-40)")
    ap.add_argument("--eval-dir", default="eval", help="evaluation folder inside each run (default eval)")
    args = ap.parse_args(argv)
    print(compare(args.run_a, args.run_b, args.row, args.eval_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
