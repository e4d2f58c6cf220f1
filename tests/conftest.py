"""Shared fixtures: real catalogs (the bundled sample and ../shared/data/fashion-small)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
FASHION_SMALL = Path(os.environ.get("VREC_FASHION_SMALL", REPO.parent / "shared" / "data" / "fashion-small"))

# Tests never download: make any hub access fail fast instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def sample_catalog():
    from vrec_utils.catalog import load_catalog

    return load_catalog(SAMPLE)


@pytest.fixture(scope="session")
def small_catalog(sample_catalog):
    """200 real items of the bundled sample, all article types mixed (the sample is stratified)."""
    return sample_catalog.head(200)


@pytest.fixture(scope="session")
def fashion_small_dir() -> Path:
    if not (FASHION_SMALL / "styles.csv").is_file():
        pytest.skip(f"fashion-small not found at {FASHION_SMALL} (set VREC_FASHION_SMALL)")
    return FASHION_SMALL


@pytest.fixture(scope="session")
def real(fashion_small_dir, tmp_path_factory):
    """(catalog, workdir, embeddings): efficientnet-lite0 fp32 embeddings of 300 real fashion-small
    images, computed once per session (the index and search tests share them)."""
    from vrec_utils.catalog import load_catalog
    from vrec_utils.extract import extract_image_embeddings
    from vrec_utils.models import create_embedder

    catalog = load_catalog(fashion_small_dir).head(300)
    workdir = tmp_path_factory.getbasetemp() / "index-embeddings"
    embedder = create_embedder("efficientnet-lite0", device="cpu")
    result = extract_image_embeddings(catalog, embedder, workdir, precision="fp32", num_workers=0, progress=False)
    return catalog, workdir, result.embeddings


# ---------------------------------------------------------------------------------------- live Elasticsearch

ES_NODE_SCRIPT = REPO / "scripts" / "es-test-node.sh"


@pytest.fixture(scope="session")
def es_url():
    """The URL of a live Elasticsearch: VREC_ES_URL when set, else a node started (and stopped at
    the end of the session) by scripts/es-test-node.sh. Without Java 21+ or the distribution the
    live tests skip with one line; VREC_REQUIRE_ES=1 (CI) turns that skip into a failure."""
    import subprocess

    if os.environ.get("VREC_ES_URL", "").strip():
        yield os.environ["VREC_ES_URL"].strip()
        return
    running = subprocess.run(["bash", str(ES_NODE_SCRIPT), "status"], capture_output=True, text=True)
    started = running.returncode != 0
    if started:
        proc = subprocess.run(["bash", str(ES_NODE_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            reason = f"no live Elasticsearch: {lines[-1] if lines else f'{ES_NODE_SCRIPT.name} start exited {proc.returncode}'}"
            if os.environ.get("VREC_REQUIRE_ES") == "1":
                pytest.fail(f"{reason} (VREC_REQUIRE_ES=1 requires the live tests to run)", pytrace=False)
            pytest.skip(reason)
        url = proc.stdout.strip().splitlines()[-1]
    else:
        url = running.stdout.strip().splitlines()[-1]
    yield url
    if started:
        subprocess.run(["bash", str(ES_NODE_SCRIPT), "stop"], capture_output=True, text=True, timeout=120)
