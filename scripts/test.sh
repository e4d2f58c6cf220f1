#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
# The S3 tests (tests/test_image_uris.py) need a local S3 emulator. moto pins botocore versions that
# conflict with vrec's own pins, so it lives in a venv of its own, used only as a server process.
if [ -z "${VREC_TEST_MOTO_SERVER:-}" ]; then
  if [ ! -x .venv-moto/bin/moto_server ]; then
    python3 -m venv .venv-moto
    .venv-moto/bin/python -m pip install --quiet 'moto[server]==5.2.5' 2>&1 | { grep -v "^WARNING: Location" || true; }
  fi
  export VREC_TEST_MOTO_SERVER=$PWD/.venv-moto/bin/moto_server
fi
# The gs:// tests need a GCS emulator: fake-gcs-server, a Go program, built once into .bin/ through the
# Go module proxy. Without Go (or if the build fails) those tests skip, saying why.
FAKE_GCS_VERSION=v1.56.1
if [ -z "${VREC_TEST_FAKE_GCS_SERVER:-}" ]; then
  if [ ! -x .bin/fake-gcs-server ]; then
    GO=$(command -v go || echo /usr/local/go/bin/go)
    if [ -x "$GO" ]; then
      echo "building fake-gcs-server $FAKE_GCS_VERSION into .bin/ (once; minutes)" >&2
      GOBIN=$PWD/.bin "$GO" install "github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION" \
        || echo "fake-gcs-server did not build: the gs:// tests will skip" >&2
    else
      echo "go not found: the gs:// tests will skip (install Go to build fake-gcs-server)" >&2
    fi
  fi
  if [ -x .bin/fake-gcs-server ]; then
    export VREC_TEST_FAKE_GCS_SERVER=$PWD/.bin/fake-gcs-server
  fi
fi
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q
