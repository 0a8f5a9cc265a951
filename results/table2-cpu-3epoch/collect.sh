#!/usr/bin/env bash
# Copy every finished run from RUNS_DIR into results/table2-cpu-3epoch/runs without its `last`
# checkpoint (the `best` checkpoint is weights only, about 2 MB), and each finished evaluation of it
# (eval/, eval-autoattack/: results and per-example flags, not their resumable state); unfinished runs
# and evaluations are left alone.
# Usage, from the repository root: bash results/table2-cpu-3epoch/collect.sh [RUNS_DIR]
set -euo pipefail
here=results/table2-cpu-3epoch
runs=${1:-../runs/table2-cpu-3epoch}
for d in "$runs"/runs/*/; do
  name=$(basename "$d")
  grep -q '"ended": "finished"' "$d/run.json" 2>/dev/null || { echo "$name: not finished, left"; continue; }
  if [ -e "$here/runs/$name" ]; then
    echo "$name: already in $here/runs"
  else
    mkdir -p "$here/runs/$name/checkpoints"
    cp "$d"/config.yaml "$d"/metrics.jsonl "$d"/run.json "$here/runs/$name/"
    cp "$d"/checkpoints/best.safetensors "$here/runs/$name/checkpoints/"
    echo "$name: copied"
  fi
  for e in eval eval-autoattack; do
    [ -f "$d/$e/eval.csv" ] || continue  # eval.csv is written last: the evaluation finished
    cmp -s "$d/$e/eval.json" "$here/runs/$name/$e/eval.json" && continue
    mkdir -p "$here/runs/$name/$e"
    cp "$d/$e"/eval.json "$d/$e"/eval.md "$d/$e"/eval.csv "$d/$e"/per_example.safetensors "$here/runs/$name/$e/"
    echo "$name: $e copied"
  done
done
