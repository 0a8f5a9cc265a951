"""Attack the published cpu-3epoch models with an attack implementation that is not robustfeat's.

The test images are read straight from the NumPy archive, the attack is torchattacks' PGD (l_inf 8/255,
step 2/255, 20 steps, one random start: the paper's PGD-20) and, with --apgd, its APGD-CE (100 steps), and only
``robustfeat.load_model`` is used from this project: the published weights, loaded as a plain
[0, 1] -> logits module. The result is compared, image by image, with robustfeat's own PGD-20 flags in
EVAL_DIR/per_example.safetensors when that is given.

torchattacks is not a robustfeat dependency; install it beside robustfeat to run this:

    python results/table2-cpu-3epoch/crosscheck_torchattacks.py RUN_DIR [EVAL_DIR] [--data NPZ] [--apgd]
"""

import argparse
import time

import numpy as np
import torch
import torchattacks
from safetensors.numpy import load_file

import robustfeat

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("eval_dir", nargs="?", help="robustfeat evaluation with whitebox.pgd-20 per-example flags")
p.add_argument("--data", default="../shared/data/cifar10/cifar10_lossless.npz")
p.add_argument("--batch", type=int, default=250)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--apgd", action="store_true", help="also APGD-CE, 100 steps (about 5x PGD-20's time)")
a = p.parse_args()

d = np.load(a.data)
x = torch.from_numpy(d["x_test"]).permute(0, 3, 1, 2).float().div(255)  # HWC uint8 -> CHW in [0, 1]
y = torch.from_numpy(d["y_test"])
model = robustfeat.load_model(a.run_dir)
torch.manual_seed(a.seed)
attacks = {"pgd-20": torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=20, random_start=True)}
if a.apgd:
    attacks["apgd-ce-100"] = torchattacks.APGD(model, eps=8 / 255, steps=100, loss="ce", seed=a.seed)

flags = {"natural": [], **{k: [] for k in attacks}}
t0 = time.time()
for i in range(0, len(y), a.batch):
    xb, yb = x[i:i + a.batch], y[i:i + a.batch]
    with torch.no_grad():
        flags["natural"].append(model(xb).argmax(1) == yb)
    for name, atk in attacks.items():
        adv = atk(xb, yb)
        assert (adv - xb).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            flags[name].append(model(adv).argmax(1) == yb)
flags = {k: torch.cat(v).numpy() for k, v in flags.items()}
print(f"{a.run_dir}: {len(y)} test images, torchattacks {torchattacks.__version__}, {time.time() - t0:.0f} s")
for k, v in flags.items():
    robust = v & flags["natural"]  # robust only if the clean image is right too, as robustfeat counts
    print(f"  {k}: {100 * robust.mean():.1f}%")
if a.eval_dir:
    ours = load_file(f"{a.eval_dir}/per_example.safetensors")
    assert np.array_equal(ours["indices"], np.arange(len(y))), "the evaluation is not on test images 0..999"
    for k in ("natural", "whitebox.pgd-20"):
        print(f"  robustfeat {k}: {100 * ours[k].mean():.1f}%")
    theirs, mine = flags["pgd-20"] & flags["natural"], ours["whitebox.pgd-20"].astype(bool)
    print(f"  PGD-20 disagreements: {int((theirs & ~mine).sum())} images broken by robustfeat's attack only, "
          f"{int((~theirs & mine).sum())} by torchattacks' only")
    print(f"  natural flags identical: {bool(np.array_equal(flags['natural'], ours['natural'].astype(bool)))}")
