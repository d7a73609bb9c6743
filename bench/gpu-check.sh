#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one command for a GPU machine held for minutes.
#
#   bench/gpu-check.sh [OUT_DIR]          # default OUT_DIR: bench/results
#
# Needs a python3 (or $PYTHON) with CUDA PyTorch and Triton, numpy, pyarrow, typer,
# safetensors, tqdm, pytest and hypothesis -- not the service's stack (BentoML, Feast, GX,
# Evidently, kfp): nothing here imports it, and nothing is downloaded.
#
# 1. installs this checkout's package, without dependencies, into a scratch folder;
# 2. the CUDA tests with compiled kernels (TRITON_INTERPRET=0): Triton NN search and SKUT
#    against their PyTorch references, and the serving path on the GPU (pinned staging
#    arena, CUDA-graph replay, the Ranker against the CPU one), and the training path on
#    the GPU against the stock encoder (outputs and gradients)
#    -> OUT_DIR/gpu-tests.xml (JUnit) and OUT_DIR/gpu-check.log;
# 3. the kernel benchmarks at the paper's shapes: `transact bench nn-search` and
#    `transact bench skut` (Tables 5 and 8) -> OUT_DIR/nn-search-<gpu>.json, skut-<gpu>.json;
# 4. training throughput, old path vs new, fp32 and bf16: `transact bench train --bf16`
#    -> OUT_DIR/train-<gpu>.json.
#
# Each step has its own time limit (9.5 minutes in all, inside a 10-minute command), and
# a failed step does not stop the next; the exit status is non-zero when any step failed.
# GPU_CHECK_STEP_LIMIT_S replaces every step's limit in a CPU dry run only (0 = none):
# there the steps time CPU references on whatever machine runs them, so the GPU budget
# means nothing; with a GPU the limits above always hold.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT_DIR=${1:-bench/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu-check.log"
: >"$LOG"
SITE=$(mktemp -d)  # the installed package
WORK=$(mktemp -d)  # where the checks run: the checkout's own transact/ folder would shadow it
trap 'rm -rf "$SITE" "$WORK"' EXIT
failed=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=${STEP_LIMIT:-$2}
  shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  (cd "$WORK" && timeout "$limit" "$@") 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
# GPU_CHECK_ON_CPU=1 runs the steps without a GPU: a check of this script's plumbing only
# (the CUDA tests skip, the benchmarks time the CPU references).
HAVE_GPU=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && HAVE_GPU=1
if [ "$HAVE_GPU" != 1 ] && [ "${GPU_CHECK_ON_CPU:-0}" != 1 ]; then
  echo "no CUDA GPU visible to $PY: nothing to check" | tee -a "$LOG"
  exit 1
fi
STEP_LIMIT=
if [ -n "${GPU_CHECK_STEP_LIMIT_S:-}" ]; then
  if [ "$HAVE_GPU" = 1 ]; then
    echo "GPU_CHECK_STEP_LIMIT_S ignored: a GPU is present, the GPU budget's limits hold" | tee -a "$LOG"
  elif ! [[ "$GPU_CHECK_STEP_LIMIT_S" =~ ^[0-9]+$ ]]; then
    echo "GPU_CHECK_STEP_LIMIT_S must be a whole number of seconds (0 = no limit), got '$GPU_CHECK_STEP_LIMIT_S'" | tee -a "$LOG"
    exit 2
  else
    STEP_LIMIT=$GPU_CHECK_STEP_LIMIT_S  # timeout 0: no limit
  fi
fi

step install 60 "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index --target "$SITE" "$ROOT"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0
step cuda-tests 260 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT_DIR/gpu-tests.xml" \
  "$ROOT"/tests/kernels/test_kernels_nn_search.py "$ROOT"/tests/kernels/test_kernels_skut.py "$ROOT"/tests/serving/test_serving_cuda.py \
  "$ROOT"/tests/model/test_model_train_path.py
# result files named after the device, as `transact bench` names them by default
slug=$(cd "$WORK" && "$PY" -c "from transact.bench.report import device_slug; print(device_slug())" \
  2>/dev/null || echo gpu)
step bench-nn-search 80 "$PY" -m transact.cli bench nn-search --out "$OUT_DIR/nn-search-$slug.json"
step bench-skut 110 "$PY" -m transact.cli bench skut --out "$OUT_DIR/skut-$slug.json"
step bench-train 60 "$PY" -m transact.cli bench train --bf16 --rounds 3 --out "$OUT_DIR/train-$slug.json"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (see $LOG)" | tee -a "$LOG"
  exit 1
fi
if [ "$HAVE_GPU" != 1 ]; then
  echo "plumbing check passed (no GPU: nothing ran on a GPU); results in $OUT_DIR" | tee -a "$LOG"
else
  echo "all GPU checks passed; results in $OUT_DIR" | tee -a "$LOG"
fi
