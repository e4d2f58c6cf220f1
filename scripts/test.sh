#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q
# The OpenVINO engine's tests run in a process of their own: after torch's JIT-traced bf16 models
# have run in the same process, a later OpenVINO compile can crash it (seen once, not understood).
if .venv/bin/python -c "import openvino" 2>/dev/null; then
  VREC_OPENVINO_TESTS=1 .venv/bin/python -m pytest -q tests/test_engines.py
fi
