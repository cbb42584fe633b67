#!/usr/bin/env bash
# The GPU checks and figures in one command: benchmarks/gpu_suite.py says what it runs and where results go.
#   bash benchmarks/gpu_suite.sh --quick          # a lent GPU: at most 8 minutes, results in $OUT
#   bash benchmarks/gpu_suite.sh                  # the full suite, for a longer lease
#   bash benchmarks/gpu_suite.sh --quick --smoke  # no GPU: every step on the CPU, tiny, nothing measured
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_suite.py "$@"
