#!/usr/bin/env python3
"""Training variants of ``robustfeat bench`` timed round-robin, for relative numbers on a busy machine.

    python benchmarks/interleaved.py --preset cifar10-at-att-reg --variants ours,ours-compile,textbook \\
        --rounds 6 --steps 2 [--json OUT.json]

``robustfeat bench`` times each variant in one block, so on a machine shared with other work a change
of load between blocks shows up as a speedup. Here every variant is built and warmed up first, then
each round times ``--steps`` steps of every variant in turn; the per-round ratios against the first
variant (paired, so a load change hits both sides of a ratio alike) and their median are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar10-at-att-reg")
    p.add_argument("--variants", default="ours,ours-compile,textbook")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[])
    p.add_argument("--json", metavar="OUT")
    a = p.parse_args(argv)

    from robustfeat.bench import ALL_VARIANTS, _sync, _synthetic, _trainer
    from robustfeat.build import resolve_device
    from robustfeat.config import load_config
    from robustfeat.train import git_revision, machine_info

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in variants:
        if v not in ALL_VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; known: {', '.join(ALL_VARIANTS)}")
    device = resolve_device(a.device)
    cfg = load_config(a.preset, overrides=a.set)
    b = cfg.optim.batch_size
    x_u8, y, classes = _synthetic(cfg, max(2048, 2 * b))
    steps, first = {}, {}
    for v in variants:  # build and warm up (compile) every variant before any timing
        t = time.perf_counter()
        _, steps[v] = _trainer(v, cfg, x_u8, y, classes, device, 0)
        for i in range(a.warmup):
            steps[v](i)
        _sync(device)
        first[v] = round(time.perf_counter() - t, 1)
        print(f"[interleaved] {v}: built and warmed up in {first[v]} s", file=sys.stderr, flush=True)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    i = a.warmup
    for _ in range(a.rounds):
        for v in variants:
            t = time.perf_counter()
            for _ in range(a.steps):
                steps[v](i)
                i += 1
            _sync(device)
            rates[v].append(round(a.steps * b / (time.perf_counter() - t), 2))
    base = variants[0]
    ratios = {v: [round(r / q, 3) for r, q in zip(rates[v], rates[base], strict=True)] for v in variants[1:]}
    report = {"preset": a.preset, "overrides": a.set, "batch": b, "device": str(device), "rounds": a.rounds,
              "steps_per_round": a.steps, "revision": git_revision(), "machine": machine_info(device),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "warmup_s": first,
              "examples_per_s": rates, "median_examples_per_s": {v: statistics.median(r) for v, r in rates.items()},
              f"ratio_vs_{base}": ratios,
              f"median_ratio_vs_{base}": {v: statistics.median(r) for v, r in ratios.items()}}
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
