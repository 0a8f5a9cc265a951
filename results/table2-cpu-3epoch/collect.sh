#!/usr/bin/env bash
# Copy every finished run from RUNS_DIR into results/table2-cpu-3epoch/runs without its `last`
# checkpoint (the `best` checkpoint is weights only, about 2 MB); unfinished runs are left alone.
# Usage, from the repository root: bash results/table2-cpu-3epoch/collect.sh [RUNS_DIR]
set -euo pipefail
here=results/table2-cpu-3epoch
runs=${1:-../runs/table2-cpu-3epoch}
for d in "$runs"/runs/*/; do
  name=$(basename "$d")
  grep -q '"ended": "finished"' "$d/run.json" 2>/dev/null || { echo "$name: not finished, left"; continue; }
  [ -e "$here/runs/$name" ] && { echo "$name: already in $here/runs"; continue; }
  mkdir -p "$here/runs/$name/checkpoints"
  cp "$d"/config.yaml "$d"/metrics.jsonl "$d"/run.json "$here/runs/$name/"
  cp "$d"/checkpoints/best.safetensors "$here/runs/$name/checkpoints/"
  echo "$name: copied"
done
