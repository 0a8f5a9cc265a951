"""AT-reg minus AT (seed 0, cpu-3epoch) on the same 1,000 test images, row by row, from the two quick
suites' per-example flags: the paired difference, its 95% interval and McNemar's p (robustfeat's own
statistics). An early look only: Table 2's verdicts need the seed-1 replicates (reproduce table2).

    python results/table2-cpu-3epoch/paired_seed0.py AT_EVAL_DIR AT_REG_EVAL_DIR
"""

import sys

import numpy as np
from safetensors.numpy import load_file

from robustfeat.eval.stats import paired_difference

at, reg = (load_file(f"{d}/per_example.safetensors") for d in sys.argv[1:3])
assert np.array_equal(at["indices"], reg["indices"]), "the two evaluations used different test images"
print("| row | AT | AT-reg | AT-reg - AT (points) | 95% CI | McNemar p | only AT-reg / only AT |")
print("|---|---|---|---|---|---|---|")
for row in ("natural", "whitebox.pgd-20", "whitebox.cw-30", "worst_case"):
    a, b = at[row].astype(bool), reg[row].astype(bool)
    d = paired_difference(a, b)
    lo, hi = d["ci95"]
    print(f"| {row.replace('.', '/')} | {100 * a.mean():.1f}% | {100 * b.mean():.1f}% | {d['diff']:+.1f} | "
          f"{lo:+.1f} to {hi:+.1f} | {d['p_mcnemar']:.2g} | {d['only_b']} / {d['only_a']} |")
