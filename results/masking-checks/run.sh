#!/bin/bash
# the four masked wrappers of examples/masked_cifar.py through the paper suite, 40 seeded test images
OUT="$(realpath -m "${1:?usage: run.sh OUT_DIR}")"
cd "$(dirname "$0")/../.."  # the repository root: examples/ and ../shared/data are found from there
for f in plain rounded saturated noisy; do
  s=$(date +%s); echo "== $f start $(date -u +%FT%TZ)"
  OMP_NUM_THREADS=1 robustfeat eval --model examples/masked_cifar.py:$f --dataset cifar10 \
    --data-dir "${DATA:-../shared/data}" --suite paper --n 40 --out "$OUT/$f" --quiet 2>&1 | tail -3
  echo "== $f done in $(( $(date +%s) - s )) s"
done
echo "== end $(date -u +%FT%TZ) rev $(git rev-parse HEAD)"
