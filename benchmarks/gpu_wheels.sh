#!/usr/bin/env bash
# Download, here (with internet), the wheels the GPU machine lacks into the ignored .whl/ folder, for
# Python 3.12 on manylinux x86_64; benchmarks/gpu_check.sh installs them there without downloads.
# The GPU machine has torch (CUDA), numpy, pyyaml, safetensors, tqdm, matplotlib and pytest; of
# robustfeat's dependencies (pyproject.toml) it lacks pyautoattack (AutoAttack rows and tests), a
# pure-Python wheel. Extra NAME==VERSION arguments are downloaded too.
#
#   benchmarks/gpu_wheels.sh [NAME==VERSION ...]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$ROOT/.whl"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$ROOT/.whl" pyautoattack==0.2.0 "$@"
ls -l "$ROOT/.whl"
