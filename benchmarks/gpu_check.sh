#!/usr/bin/env bash
# One command for a CUDA machine (issue #14): the CUDA tests, then encode and construction
# throughput as Markdown tables for BENCHMARKS.md. Under 5 minutes. Without CUDA it says so and
# does a small dry run on the CPU (those numbers are not GPU numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "No CUDA device found: skipping the CUDA tests; CPU dry run of the benchmark (not GPU numbers)."
    exec timeout 280 "$PY" benchmarks/gpu_check.py --quick --device cpu
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 100 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_backends.py tests/test_pursuit.py tests/test_ormp.py
timeout 180 "$PY" benchmarks/gpu_check.py --device cuda
