#!/usr/bin/env bash
# Before a GPU lease, on this (GPU-less) machine: build lgd_fast/_C*.so for the GPU machine's Python and torch,
# so that `bash benchmarks/gpu_suite.sh --quick --prebuilt` there import-checks them instead of spending a minute
# and a half of the lease on the build; and, with --rehearse, run what can run here under those same versions.
#
#   bash benchmarks/gpu_prebuild.sh              # about 5 minutes: a venv, torch's CUDA wheel, the build
#   bash benchmarks/gpu_prebuild.sh --rehearse   # then the CUDA tests' collection (no PyAV, no DALI), the suite's
#                                                # smoke run and the Triton kernels' sm_90a compile (a few minutes)
#
# The versions are the GPU machine's (the device tool's KINDS.md): override with GPU_PYTHON (an interpreter of the
# same minor version), GPU_TORCH, GPU_TRITON; GPU_VENV says where the venv goes. The build runs in a copy of the
# working tree, so this checkout's own install is left alone; only the two .so files land in lgd_fast/ (ignored by
# git, with the stamp of the sources they were built from, lgd_fast/_C.sources-sha256; carry the three with the device
# call: `carry: ["lgd_fast/_C.cpython-312-x86_64-linux-gnu.so", "lgd_fast/_C_cuda.cpython-312-x86_64-linux-gnu.so",
# "lgd_fast/_C.sources-sha256"]`). Needs nvcc of the GPU torch's CUDA version (13.0) here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GPU_PYTHON=${GPU_PYTHON:-python3.12}
GPU_TORCH=${GPU_TORCH:-2.11.0}
GPU_TRITON=${GPU_TRITON:-3.6.0}
GPU_VENV=${GPU_VENV:-/tmp/lgd_fast_gpu_venv}
REHEARSE=0
for arg in "$@"; do
  case $arg in
    --rehearse) REHEARSE=1 ;;
    *) echo "gpu_prebuild.sh: unknown argument '$arg' (only --rehearse)" >&2; exit 2 ;;
  esac
done

command -v "$GPU_PYTHON" >/dev/null || { echo "gpu_prebuild.sh: no '$GPU_PYTHON' here (with pyenv: PYENV_VERSION=3.12.1)" >&2; exit 2; }
NVCC=$(command -v nvcc) || { echo "gpu_prebuild.sh: no nvcc on PATH: _C_cuda cannot be built here" >&2; exit 2; }

if [ ! -x "$GPU_VENV/bin/python" ]; then
  echo "== venv $GPU_VENV ($("$GPU_PYTHON" --version))"
  "$GPU_PYTHON" -m venv "$GPU_VENV"
fi
PY=$GPU_VENV/bin/python
if ! "$PY" -c "import torch, triton, sys; sys.exit(torch.__version__.split('+')[0] != '$GPU_TORCH' or torch.version.cuda is None or triton.__version__ != '$GPU_TRITON')" 2>/dev/null; then
  echo "== torch $GPU_TORCH (its CUDA build, from PyPI: a few GB), triton $GPU_TRITON"
  "$PY" -m pip install -q "torch==$GPU_TORCH" "triton==$GPU_TRITON" ninja numpy pyyaml tqdm matplotlib pytest pytest-benchmark
fi
"$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"

# CUDA_HOME: the toolkit whose lib64 holds libcudart (a wrapper nvcc on PATH can sit outside it).
if [ -z "${CUDA_HOME:-}" ]; then
  for home in "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda-"$("$PY" -c 'import torch; print(torch.version.cuda)')" /usr/local/cuda; do
    if [ -e "$home/lib64/libcudart.so" ]; then CUDA_HOME=$home; break; fi
  done
fi
[ -n "${CUDA_HOME:-}" ] || { echo "gpu_prebuild.sh: no CUDA toolkit with lib64/libcudart.so found; set CUDA_HOME" >&2; exit 2; }
export CUDA_HOME
echo "== CUDA_HOME $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"

WORK=$(mktemp -d /tmp/lgd_fast_gpu_build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# the working tree's tracked files, edits included (one deleted here but not yet committed is left out)
git ls-files -z | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$WORK"
echo "== build in $WORK (TORCH_CUDA_ARCH_LIST=9.0: the H100/H200's sm_90)"
start=$SECONDS
(cd "$WORK" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
echo "   built in $((SECONDS - start)) s"
tag=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
for name in _C _C_cuda; do
  cp "$WORK/lgd_fast/$name$tag" "$ROOT/lgd_fast/$name$tag"
  strip --strip-debug "$ROOT/lgd_fast/$name$tag"  # the debug sections are most of the size that must travel
  echo "   lgd_fast/$name$tag ($(du -h "$ROOT/lgd_fast/$name$tag" | cut -f1))"
done
(cd "$WORK" && "$PY" -c "from lgd_fast import _C, _C_cuda; print('   both import here (no GPU: kernels not run)')")
# the digest of the sources they were built from, which --prebuilt checks on the GPU machine against its copy
"$PY" "$WORK/benchmarks/gpu_suite.py" --sources-digest > "$ROOT/lgd_fast/_C.sources-sha256"
echo "   lgd_fast/_C.sources-sha256 ($(cut -c1-12 "$ROOT/lgd_fast/_C.sources-sha256"): csrc/ and setup.py as built)"

if [ "$REHEARSE" = 1 ]; then
  cd "$WORK"
  export PYTHONPATH=$WORK LGD_FAST_TEST_SEED=${LGD_FAST_TEST_SEED:-0}
  echo "== rehearse: CUDA tests collected without PyAV and DALI (neither is on the GPU machine)"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_suite.py -k collected
  echo "== rehearse: the suite's smoke run"
  "$PY" benchmarks/gpu_suite.py --quick --smoke --out "$WORK/smoke"
  echo "== rehearse: every Triton kernel compiled for sm_80/sm_90a by triton $GPU_TRITON, as its JIT does"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_backends.py -k "compile_for_sm80_and_sm90a or without_the_hints"
fi
commit=$(git -C "$ROOT" rev-parse HEAD)
if [ -n "$(git -C "$ROOT" status --porcelain -- . ':(exclude)benchmarks/results')" ]; then
  commit="$commit-dirty"
  echo "   (uncommitted edits: commit them first, or the results cannot be tied to a commit)"
fi
echo "== done: carry lgd_fast/_C$tag, lgd_fast/_C_cuda$tag and lgd_fast/_C.sources-sha256, and run on the GPU"
echo "   (its copy of the tree has no .git: name the commit):"
echo "   LGD_FAST_COMMIT=$commit bash benchmarks/gpu_suite.sh --quick --prebuilt"
