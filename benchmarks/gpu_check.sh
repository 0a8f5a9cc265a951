#!/usr/bin/env bash
# The one-call GPU acceptance run (docs/gpu.md):
#
#   benchmarks/gpu_check.sh OUTDIR [--data-dir DIR] [--budget-s 480] [--device cuda:N]
#   benchmarks/gpu_check.sh OUTDIR --tiny        # (or ROBUSTFEAT_GPU_CHECK_TINY=1) toy sizes on the CPU, for CI
#
# On a GPU machine without internet it first installs the project without downloads: a virtual
# environment that sees the machine's packages (torch with CUDA), `pip install --no-index --no-deps
# --no-build-isolation -e .` and the wheels benchmarks/gpu_wheels.sh saved in .whl/ (pyautoattack);
# where no environment can be made, the wheels go to .gpu-site/ and the package runs from src/. Then
# benchmarks/gpu_check.py runs every stage within the budget and writes OUTDIR/README.md and
# OUTDIR/summary.json. The tiny mode installs nothing: it runs from src/ with $PYTHON (default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: benchmarks/gpu_check.sh OUTDIR [--tiny] [--data-dir DIR] [--budget-s S] [--device D]" >&2
    exit 2
fi
OUT="$1"
shift
tiny=0
for a in "$@"; do [ "$a" = --tiny ] && tiny=1; done
if [ "${ROBUSTFEAT_GPU_CHECK_TINY:-0}" = 1 ] && [ $tiny = 0 ]; then
    tiny=1
    set -- "$@" --tiny
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"

install_project() {
    # pip's output goes to OUTDIR/install.log; the way it was installed to env.json
    local log="$OUT/install.log" venv="$ROOT/.gpu-venv" wheels=()
    shopt -s nullglob
    wheels=("$ROOT"/.whl/*.whl)
    shopt -u nullglob
    : >"$log"
    if { [ -x "$venv/bin/python" ] || "$PY" -m venv --system-site-packages "$venv"; } >>"$log" 2>&1 &&
        "$venv/bin/python" -m pip install --no-index --no-deps --no-build-isolation -e "$ROOT" >>"$log" 2>&1; then
        PY="$venv/bin/python"
        if [ ${#wheels[@]} -gt 0 ]; then
            "$PY" -m pip install --no-index --no-deps "${wheels[@]}" >>"$log" 2>&1 || echo "wheels failed: see $log" >&2
        fi
        export ROBUSTFEAT_GPU_CHECK_INSTALL="editable in $venv, ${#wheels[@]} wheel(s) from .whl/"
    else
        echo "no virtual environment or editable install (see $log): running from src/" >&2
        if [ ${#wheels[@]} -gt 0 ]; then
            "$PY" -m pip install --no-index --no-deps --target "$ROOT/.gpu-site" "${wheels[@]}" >>"$log" 2>&1 ||
                echo "wheels failed: see $log" >&2
        fi
        export PYTHONPATH="$ROOT/src:$ROOT/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
        export ROBUSTFEAT_GPU_CHECK_INSTALL="PYTHONPATH=src and .gpu-site, ${#wheels[@]} wheel(s) from .whl/"
    fi
}

if [ $tiny = 1 ]; then
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # toy sizes run faster on one thread
else
    install_project
fi
exec "$PY" "$ROOT/benchmarks/gpu_check.py" run "$OUT" "$@"
