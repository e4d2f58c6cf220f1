#!/usr/bin/env bash
# Set up (if needed) and run the demo: all notebooks on the bundled sample, offline models, FAISS,
# rendered to one HTML report with its figures. Extra arguments go to `vrec report`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
exec .venv/bin/vrec report --profile offline "$@"
