"""One-off (issue 23): cifar10-natural-seed0 was trained by code that chose `best` by validation PGD
accuracy (~0 for a natural model), so its best stayed at step 1,000 (56.4% val clean). Fixed code chooses
by clean accuracy; this writes what it would have written. The best clean validation is at the last step
(7,000), which `last` holds, so: best := last's evaluated weights (model.*), weights only; both files'
extra get best_val/best_metric/best_step by clean accuracy. Usage: python fix_natural_best.py RUN_DIR"""
import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from robustfeat.checkpoint import atomic_write_bytes, read_checkpoint

ckpt = Path(sys.argv[1]) / "checkpoints"
tensors, meta = read_checkpoint(ckpt / "last.safetensors")
evals = [r for r in map(json.loads, (ckpt.parent / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
top = max(evals, key=lambda r: (r["clean_acc"], r["step"]))
assert top["step"] == meta["step"], (top, meta["step"])
extra = {"best_val": top["clean_acc"], "best_metric": "clean_acc", "best_step": top["step"],
         **{k: v for k, v in meta["extra"].items() if k not in ("best_val_pgd", "best_step")}}
with safe_open(str(ckpt / "last.safetensors"), framework="pt") as f:
    raw = f.metadata()
raw["extra"] = json.dumps(extra)
best_meta = {k: v for k, v in raw.items() if k != "optimizer"}
atomic_write_bytes(ckpt / "best.safetensors",
                   save({k: v for k, v in tensors.items() if k.startswith("model.")}, metadata=best_meta))
atomic_write_bytes(ckpt / "last.safetensors", save(tensors, metadata=raw))
print(f"best <- step {meta['step']:,} (val clean {top['clean_acc']:.3f})")
