#!/usr/bin/env bash
# Create .venv and install vrec with every extra. Safe to rerun: an up-to-date venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.vrec-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  # torch from PyPI brings its CUDA libraries: .venv grows to ~7.5 GB, and pip's downloads take ~3.5 GB
  # more in the temporary folder until it ends. Say so before the downloads, not as ENOSPC half-way.
  # one line per file system (.venv and the temporary folder usually share one)
  df -Pk .venv "${TMPDIR:-/tmp}" | awk 'NR > 1 && !seen[$6]++ && $4 < 12 * 1048576 {
    printf "WARNING: only %d GB free on %s; installing vrec needs ~11 GB (torch with its CUDA libraries)\n", $4 / 1048576, $6 }' >&2 || true
  # constraints.txt pins the versions the test suite passed with (torch 2.14.1 / torchvision 0.29.1:
  # a plain `torch` resolves to another multi-GB build).
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[all]" 2>&1 | { grep -v "^WARNING: Location" || true; }
  .venv/bin/python -c "import vrec_utils, torch, faiss, transformers" # fail here, not in the tests, if the install broke
  touch "$stamp"
fi
echo "vrec installed in $(pwd)/.venv (activate with: source .venv/bin/activate)"
