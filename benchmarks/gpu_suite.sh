#!/usr/bin/env bash
# The GPU checks in one command, on a machine with an NVIDIA GPU, a CUDA build of torch and nvcc:
#   1. builds lgd_fast with its CUDA extension (setup.py builds lgd_fast._C_cuda where CUDA torch and nvcc exist)
#   2. runs every CUDA test (pytest -m cuda) and `lgd-fast doctor`
#   3. runs the op benchmarks (diffusion epilogue + global path; P3D units vs eager cuDNN, fp32 and bf16)
#   4. runs the end-to-end benchmark (lgd-fast bench): fp32, bf16 autocast, bf16 autocast channels-last (eager AMP
#      channels-last is the baseline a GPU user writes), each against torch.compile
# Results land in benchmarks/results/, named by the GPU (e.g. *_nvidia-h100-80gb-hbm3.json), with the logs.
# Without network access, put wheels of the missing packages (PyAV, DALI, ...) in .whl/ first: they are installed
# from there. Usage: bash benchmarks/gpu_suite.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=""
[[ "${1:-}" == "--quick" ]] && QUICK="--quick"
PY=${PYTHON:-python3}
DEVICE=$($PY -c "
import sys, torch
if not torch.cuda.is_available():
    sys.exit('gpu_suite.sh: torch sees no CUDA device')
name = torch.cuda.get_device_name()
print('-'.join(''.join(c if c.isalnum() else ' ' for c in name.lower()).split()))
") || exit 1
RESULTS=benchmarks/results
LOG=$RESULTS/gpu_suite_$DEVICE.log
mkdir -p "$RESULTS"
: >"$LOG"
FAILED=()
step() {  # step NAME COMMAND...: run, log, remember failures, go on
  local name=$1
  shift
  echo "=== $name: $*" | tee -a "$LOG"
  if ! "$@" 2>&1 | tee -a "$LOG"; then
    FAILED+=("$name")
  fi
}
if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels $PY -m pip install -q --no-index --no-deps .whl/*.whl
fi
step build $PY -m pip install -q --no-build-isolation --no-deps -e .
step doctor lgd-fast doctor
step cuda-extension $PY -c "from lgd_fast.ops import _backend; assert _backend.cuda_extension_available(), _backend.cuda_extension_error()"
step cuda-tests $PY -m pytest -m cuda -q -p no:cacheprovider tests
step diffusion-benchmark $PY benchmarks/run_diffusion_epilogue.py --device cuda --no-wait $QUICK
step p3d-unit-benchmark $PY benchmarks/run_p3d_gpu.py $QUICK
REPEATS=$([[ -n "$QUICK" ]] && echo 3 || echo 10)
step bench-fp32 lgd-fast bench --device cuda --dtype fp32 --repeats "$REPEATS" --no-progress
step bench-bf16 lgd-fast bench --device cuda --dtype bf16 --repeats "$REPEATS" --no-progress
step bench-bf16-cl3d lgd-fast bench --device cuda --dtype bf16 --channels-last --repeats "$REPEATS" --no-progress
echo "results: $(ls "$RESULTS" | grep -c "$DEVICE") files named *$DEVICE* in $RESULTS; log $LOG" | tee -a "$LOG"
if ((${#FAILED[@]})); then
  echo "gpu_suite.sh: FAILED steps: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "gpu_suite.sh: every step passed" | tee -a "$LOG"
