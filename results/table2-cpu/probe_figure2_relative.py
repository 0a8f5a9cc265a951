"""Probe: Figure 2 with absolute vs relative (||l - l'|| / ||l||) feature distances on the AT-att-reg
seed-0 model, 300 test images; and the per-image Spearman between attention weight and feature norm.
Run from the repository root: python results/table2-cpu/probe_figure2_relative.py"""
import numpy as np
import torch

from robustfeat.analysis.measures import RankAccumulator, analysis_attack, spearman, subset, weights_by_rank
from robustfeat.analysis.pipeline import _load
from robustfeat.attacks import attack_from_config, eval_mode
from robustfeat.build import build_splits
from robustfeat.data import to_float_images

(run,), dev = _load(["results/table2-cpu/runs/cifar10-at-att-reg-seed0"], "best", "cpu")
data = build_splits(run.cfg, "../shared/data")
x, y = subset(data.x_test, data.y_test, 300, 1)
attack = analysis_attack(run.cfg.attack)
m = run.model
acc = {k: RankAccumulator() for k in ("abs", "rel", "norm")}
rho_norm = []
gen = torch.Generator().manual_seed(0)
with eval_mode(m):
    for i in range(0, len(y), 100):
        xb, yb = to_float_images(x[i:i + 100], "cpu"), y[i:i + 100]
        xa = attack_from_config(m, xb, yb, attack, generator=gen, keep_best=False)
        with torch.no_grad():
            c = m.attention(xb)
            la = m.attention(xa).local
        d = (c.local - la).flatten(2).norm(dim=1)
        nrm = c.local.flatten(2).norm(dim=1)
        w = c.weights.flatten(1)
        acc["abs"].add(weights_by_rank(w, d))
        acc["rel"].add(weights_by_rank(w, d / nrm.clamp_min(1e-12)))
        acc["norm"].add(weights_by_rank(w, nrm))  # rank 0 = smallest feature norm
        for b in range(len(yb)):
            rho_norm.append(spearman(w[b].numpy(), nrm[b].numpy()))
for k, a in acc.items():
    r = a.result((0, 0))
    print(f"{k:5s} Spearman(rank, weight) {r.spearman:+.3f}  weight rank0 {r.mean[0]:.4f} last {r.mean[-1]:.4f}")
print(f"median per-image Spearman(weight, feature norm): {np.median(rho_norm):.3f}")
