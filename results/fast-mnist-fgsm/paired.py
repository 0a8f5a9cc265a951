"""Per-image sign test between two evaluated runs: python paired.py RUN_A RUN_B.

Reads RUN/eval/per_example.safetensors (1 = robust to PGD-40) of both runs, which must cover the same
test images, and prints both accuracies, the images robust under only one of them, and the two-sided
exact sign-test p-value on those discordant images.
"""

import math
import sys

from safetensors.torch import load_file


def robust(run_dir: str):
    t = load_file(f"{run_dir}/eval/per_example.safetensors")
    return t["whitebox.pgd-40"][t["indices"].argsort()].bool()


a, b = robust(sys.argv[1]), robust(sys.argv[2])
only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
n, k = only_a + only_b, min(only_a, only_b)
p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
print(f"{sys.argv[1]}: {a.float().mean() * 100:.2f}%  {sys.argv[2]}: {b.float().mean() * 100:.2f}%  "
      f"robust only under the first {only_a}, only under the second {only_b}, sign test p = {p:.2g}")
