#!/usr/bin/env bash
# Go on with Table 2 at cpu-3epoch in the background: copy the committed runs to a run directory
# outside the work tree, then `reproduce` trains the next missing model (it skips finished runs).
# Usage, from the repository root, in an environment where robustfeat is installed:
#   bash results/table2-cpu-3epoch/resume.sh [RUNS_DIR]     (default ../runs/table2-cpu-3epoch)
set -euo pipefail
here=results/table2-cpu-3epoch
runs=${1:-../runs/table2-cpu-3epoch}
data=${ROBUSTFEAT_DATA:-../shared/data}
mkdir -p "$runs/runs"
for d in "$here"/runs/*/; do
  name=$(basename "$d")
  [ -e "$runs/runs/$name" ] || cp -r "$d" "$runs/runs/$name"
done
nohup robustfeat reproduce table2 --budget cpu-3epoch --runs "$runs/runs" --out "$runs/out" \
  --data-dir "$data" >> "$runs/reproduce.log" 2>&1 &
echo "started (pid $!); progress: tail -f $runs/reproduce.log"
