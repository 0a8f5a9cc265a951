"""Where a single-step model's robustness gap comes from (README, session 4).

For one run, on the first N training images and the first N validation images: clean accuracy,
accuracy under FGSM-RS (the training adversary: random start in the eps-ball, one step of eps) and
under PGD-40 (the evaluation attack), the model in eval mode, fixed seeds.

    PYTHONPATH=src python results/fast-mnist-fgsm/attack_gap.py RUN_DIR [best|last] [N]
"""

import sys

import torch

from robustfeat.api import load_run
from robustfeat.build import build_splits
from robustfeat.config import AttackConfig
from robustfeat.evaluate import accuracy

run_dir = sys.argv[1]
which = sys.argv[2] if len(sys.argv) > 2 else "best"
n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
torch.set_num_threads(1)
model, cfg, meta = load_run(run_dir, which, "cpu")
splits = build_splits(cfg, "../shared/data")
eps = cfg.eval_attack.eps
fgsm_rs = AttackConfig(eps=eps, step_size=eps, steps=1, restarts=1, random_start=True, bn_mode="eval")
print(f"{run_dir} ({which}, step {meta['step']}), {n} images per split, eps {eps}")
for name, x, y in (("train", splits.x_train, splits.y_train), ("val", splits.x_val, splits.y_val)):
    row = {"clean": None}
    for label, attack in (("FGSM-RS", fgsm_rs), ("PGD-40", cfg.eval_attack)):
        r = accuracy(model, x[:n], y[:n], attack, generator=torch.Generator().manual_seed(0), progress=False)
        row["clean"], row[label] = r["clean_acc"], r["pgd_acc"]
    print(f"{name:5s} " + "  ".join(f"{k} {v:.1%}" for k, v in row.items()), flush=True)
