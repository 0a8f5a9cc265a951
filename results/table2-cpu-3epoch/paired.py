"""Model B minus model A on the same test images, row by row, from two evaluations' per-example flags
(quick or paper suite, eval/per_example.safetensors): the paired difference, its 95% interval and
McNemar's p (robustfeat's own statistics). The models are named by the presets in their eval.json. An
early look at one seed pair; Table 2's verdicts come from `reproduce table2`.

    python results/table2-cpu-3epoch/paired.py A_EVAL_DIR B_EVAL_DIR
"""

import json
import sys

import numpy as np
from safetensors.numpy import load_file

from robustfeat.eval.stats import paired_difference

dirs = sys.argv[1:3]
a_flags, b_flags = (load_file(f"{d}/per_example.safetensors") for d in dirs)
a_name, b_name = (json.load(open(f"{d}/eval.json"))["model"].get("preset", d) for d in dirs)
assert np.array_equal(a_flags["indices"], b_flags["indices"]), "the two evaluations used different test images"
print(f"| row | {a_name} | {b_name} | {b_name} - {a_name} (points) | 95% CI | McNemar p | only {b_name} / only {a_name} |")
print("|---|---|---|---|---|---|---|")
for row in ("natural", "whitebox.pgd-20", "whitebox.cw-30", "worst_case"):
    a, b = a_flags[row].astype(bool), b_flags[row].astype(bool)
    d = paired_difference(a, b)
    lo, hi = d["ci95"]
    print(f"| {row.replace('.', '/')} | {100 * a.mean():.1f}% | {100 * b.mean():.1f}% | {d['diff']:+.1f} | "
          f"{lo:+.1f} to {hi:+.1f} | {d['p_mcnemar']:.2g} | {d['only_b']} / {d['only_a']} |")
