"""Two-thread cost of the MNIST fast budget's first 1,000 steps, with or without carried starts.

Run from the repository root: python results/fast-mnist-fgsm/timing.py true|false
(trains into /tmp/timing-CARRY, which must not exist; one validation is included).
"""

import sys
import time

import robustfeat
from robustfeat.train import train

carry = sys.argv[1]
cfg = robustfeat.load_config("mnist-at-reg", "fast", [f"attack.carry={carry}"])
t = time.time()
train(cfg, f"/tmp/timing-{carry}", data_dir="../shared/data", progress=False, stop_after=1000)
s = time.time() - t
print(f"carry={carry}: 1000 steps (one validation included) in {s:.1f} s; 11,000 steps about {s * 11 / 60:.1f} min")
