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
