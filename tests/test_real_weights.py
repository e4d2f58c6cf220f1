"""The path a user with real weights takes, on offline replicas of the real files (tests/replicas.py).

SigLIP's hub repo ships its tokenizer as a SentencePiece model (spiece.model, no tokenizer.json):
the replica does too, so text search runs through the same transformers code as the real model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from replicas import SIGLIP_BASE_REPO, build_siglip_base_replica, hub_cache_layout
from vrec_utils.cli import main
from vrec_utils.models import ModelUnavailableError, create_embedder


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory, sample_dir) -> Path:
    titles = pd.read_csv(sample_dir / "styles.csv", keep_default_na=False)["productDisplayName"].head(600)
    return build_siglip_base_replica(tmp_path_factory.mktemp("siglip-base"), titles)


@pytest.fixture()
def hub_home(siglip_dir, tmp_path, monkeypatch) -> Path:
    """A hub cache holding the replica under google/siglip-base-patch16-224, read offline."""
    home = tmp_path / "hf"
    hub_cache_layout(home / "hub", SIGLIP_BASE_REPO, siglip_dir)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_siglip_text_from_a_sentencepiece_tokenizer(siglip_dir, hub_home):
    """siglip-base from --weights DIR and from the hub cache: the same weights identity (their
    digest), and text embeddings through SiglipTokenizer (sentencepiece + protobuf)."""
    from_dir = create_embedder("siglip-base", weights=str(siglip_dir), device="cpu")
    from_hub = create_embedder("siglip-base", device="cpu")
    assert from_dir.identity() == from_hub.identity()
    assert from_hub.describe_weights().startswith(f"hf:{SIGLIP_BASE_REPO}@")
    assert type(from_dir._tokenizer.get()).__name__ == "SiglipTokenizer"
    texts = ["Red summer dress", "Black leather watch for men"]
    np.testing.assert_array_equal(from_dir.embed_texts(texts), from_hub.embed_texts(texts))
    assert from_dir.embed_texts(texts).shape == (2, 32)


@pytest.fixture()
def forty_items(sample_dir, tmp_path) -> Path:
    """A 40-item catalog folder (styles.csv + images/) cut from the bundled sample."""
    folder = tmp_path / "forty"
    (folder / "images").mkdir(parents=True)
    styles = pd.read_csv(sample_dir / "styles.csv", dtype=str, keep_default_na=False).head(40)
    styles.to_csv(folder / "styles.csv", index=False)
    for item in styles["id"]:
        shutil.copy(sample_dir / "images" / f"{item}.jpg", folder / "images" / f"{item}.jpg")
    return folder


def test_cli_extract_with_one_weights_path_search_with_the_other(siglip_dir, hub_home, forty_items, tmp_path, capsys):
    workdir = tmp_path / "work"
    code = main(["extract", "--catalog", str(forty_items), "--model", "siglip-base", "--weights", str(siglip_dir),
                 "--workdir", str(workdir), "--workers", "0", "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["embedded"] == 40
    code = main(["search", "--catalog", str(forty_items), "--model", "siglip-base", "--text", "red dress", "-k", "3",
                 "--workdir", str(workdir), "--json"])  # fmt: skip  (weights from the hub cache this time)
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 3 and {r["query_text"] for r in rows} == {"red dress"}


def test_siglip_folder_without_its_tokenizer(siglip_dir, tmp_path, monkeypatch):
    """Images work from the weights alone; a text query names what is missing and how to get it."""
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(siglip_dir, broken)
    (broken / "spiece.model").unlink()
    embedder = create_embedder("siglip-base", weights=str(broken), device="cpu")
    assert embedder.embed_images([_grey()]).shape == (1, 32)
    with pytest.raises(ModelUnavailableError, match="no tokenizer in .*spiece.model"):
        embedder.embed_texts(["red dress"])


def test_siglip_tokenizer_needs_protobuf_and_says_so(siglip_dir, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "google.protobuf" else real_find_spec(name, *a))
    embedder = create_embedder("siglip-base", weights=str(siglip_dir), device="cpu")
    with pytest.raises(ModelUnavailableError, match="pip install protobuf"):
        embedder.embed_texts(["red dress"])


def test_queries_are_embedded_in_the_catalogs_precision(sample_catalog, tmp_path):
    """A bf16 catalog gets bf16 queries (image and text): the same arithmetic on both sides."""
    from vrec_utils.extract import extract_image_embeddings
    from vrec_utils.search import search_by_image, search_by_text

    catalog = sample_catalog.head(12)
    seen: list[bool] = []
    embedder = create_embedder("tiny-siglip", device="cpu")
    for method in ("encode_image", "encode_text"):
        original = getattr(embedder, method)

        def spy(*args, _original=original, **kwargs):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return _original(*args, **kwargs)

        setattr(embedder, method, spy)
    for precision in ("bf16", "fp32"):
        workdir = tmp_path / precision
        extract_image_embeddings(catalog, embedder, workdir, precision=precision, num_workers=0, progress=False)
        seen.clear()
        search_by_text(catalog, workdir, "tiny-siglip", ["red dress"], k=2, embedder=embedder)
        search_by_image(catalog, workdir, "tiny-siglip", [_grey()], k=2, embedder=embedder)
        assert seen == [precision == "bf16"] * 2, precision


def test_truncated_weights_file_is_a_clear_error(siglip_dir, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(siglip_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelUnavailableError, match=r"cannot load .*model.safetensors.*download"):
        create_embedder("siglip-base", weights=str(broken), device="cpu")


def _grey():
    from PIL import Image

    return Image.new("RGB", (60, 80), (128, 128, 128))
