"""Inference engines (vrec_utils/engines): the batch preprocessing split, engine selection and its
reasons, and the OpenVINO engine (skipped where the optional extra is not installed)."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch

from test_extract import SmallConvEmbedder
from vrec_utils import engines
from vrec_utils.catalog import load_catalog
from vrec_utils.engines import select_engine
from vrec_utils.extract import extract_image_embeddings
from vrec_utils.images import load_rgb, split_transform
from vrec_utils.models import create_embedder
from vrec_utils.models.base import ModelUnavailableError


@functools.cache
def built(name: str, weights: str | None = None):
    return create_embedder(name, weights=weights, device="cpu")


class NormalizedConvEmbedder(SmallConvEmbedder):
    """SmallConvEmbedder with the usual [PIL..., ToTensor, Normalize] transform (split in batches)."""

    name = "test-normalized-conv"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from torchvision import transforms

        self.image_transform = transforms.Compose(
            [transforms.Resize(40), transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])]
        )
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))

    def weights_id(self) -> str:
        return f"random-init:{self.seed}"


class NumpyStepEmbedder(NormalizedConvEmbedder):
    """A step computed in numpy: export (a trace) records its result as a constant."""

    name = "test-numpy-step"

    def encode_image(self, pixels):
        brightest = np.sort(pixels.detach().cpu().numpy().reshape(len(pixels), -1), axis=1)[:, -16:]
        return self.net(pixels) + torch.from_numpy(brightest.copy())


# ---------------------------------------------------------------------------------------- preprocessing split
@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet50", "tiny-siglip", "tiny-openclip"])
def test_batch_preprocessing_gives_the_same_pixels(name, small_catalog):
    embedder = built(name, "random" if name == "resnet50" else None)
    split = split_transform(embedder.image_transform)
    assert split is not None, f"{name}'s transform is not split: its pipeline would lose the batch path"
    pil, batch = split
    images = [load_rgb(p) for p in small_catalog.items["image"][:6]]
    expected = torch.stack([embedder.image_transform(im) for im in images])
    got = batch(torch.from_numpy(np.stack([pil(im) for im in images])))
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_extraction_vectors_unchanged_by_the_batch_path(tmp_path, small_catalog, monkeypatch):
    catalog = small_catalog.head(40)
    split = extract_image_embeddings(catalog, NormalizedConvEmbedder(), tmp_path / "a", num_workers=1, precision="fp32", progress=False)
    monkeypatch.setattr("vrec_utils.extract.split_transform", lambda transform: None)  # the per-image path
    whole = extract_image_embeddings(catalog, NormalizedConvEmbedder(), tmp_path / "b", num_workers=0, precision="fp32", progress=False)
    np.testing.assert_array_equal(split.embeddings.vectors, whole.embeddings.vectors)


def test_transforms_that_are_not_the_known_shape_stay_whole():
    from torchvision import transforms

    assert split_transform(transforms.Compose([transforms.Resize(8), transforms.ToTensor()])) is None
    assert split_transform(lambda im: im) is None
    tensor_step = transforms.Compose([transforms.ToTensor(), transforms.RandomErasing(), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    assert split_transform(tensor_step) is None


# ---------------------------------------------------------------------------------------- selection
def test_without_openvino_auto_runs_torch_and_openvino_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "openvino_module", lambda: None)
    auto = select_engine("auto", NormalizedConvEmbedder(), "fp32", tmp_path)
    assert auto.name == "torch" and "not installed" in auto.reason and "pip install" in auto.reason
    with pytest.raises(ModelUnavailableError, match=r"--engine openvino: OpenVINO is not installed; pip install"):
        select_engine("openvino", NormalizedConvEmbedder(), "fp32", tmp_path)
    with pytest.raises(ValueError, match="engine must be one of"):
        select_engine("onnx", NormalizedConvEmbedder(), "fp32", tmp_path)


def test_cli_extract_engine_openvino_without_the_extra_is_one_line(tmp_path, sample_dir, monkeypatch, capsys):
    from vrec_utils.cli import main

    monkeypatch.setattr(engines, "openvino_module", lambda: None)
    code = main(["extract", "--catalog", str(sample_dir), "--model", "efficientnet-lite0", "--workdir", str(tmp_path), "--engine", "openvino", "--limit", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install" in err[0]


# ---------------------------------------------------------------------------------------- OpenVINO
@pytest.fixture
def ov():
    # Known issue: after these tests compile OpenVINO models, the same pytest process segfaulted in
    # test_extract's real-model bf16 run (torch JIT + OpenVINO in one process). Until that is
    # understood they run on their own: VREC_OPENVINO_TESTS=1 pytest tests/test_engines.py
    if os.environ.get("VREC_OPENVINO_TESTS") != "1":
        pytest.skip("OpenVINO tests run on their own: VREC_OPENVINO_TESTS=1 pytest tests/test_engines.py")
    return pytest.importorskip("openvino")


def test_engine_is_in_the_cache_key_and_manifest(ov, tmp_path, small_catalog):
    catalog = small_catalog.head(24)
    torch_run = extract_image_embeddings(catalog, NormalizedConvEmbedder(), tmp_path, num_workers=0, precision="fp32", progress=False)
    ov_run = extract_image_embeddings(catalog, NormalizedConvEmbedder(), tmp_path, num_workers=0, precision="fp32", engine="openvino", progress=False)
    assert ov_run.engine == "openvino" and ov_run.engine_reason.startswith("openvino f32: asked for")
    assert ov_run.cache_dir != torch_run.cache_dir and ov_run.n_new == 24 and ov_run.n_cached == 0  # nothing reused across engines
    manifest = json.loads((ov_run.cache_dir / "manifest.json").read_text())
    assert manifest["identity"]["engine"] == "openvino" and manifest["engine"] == "openvino" and manifest["precision"] == "fp32"
    again = extract_image_embeddings(catalog, NormalizedConvEmbedder(), tmp_path, num_workers=0, precision="fp32", progress=False)
    assert again.cache_dir == torch_run.cache_dir and again.n_new == 0  # and back: torch's own vectors
    cosine = np.sum(torch_run.embeddings.vectors * ov_run.embeddings.vectors, axis=1)
    assert cosine.min() >= 0.999
    assert "engine: openvino f32" in ov_run.summary()


def test_a_model_that_does_not_export_falls_back_to_torch_saying_so(ov, tmp_path, small_catalog):
    result = extract_image_embeddings(small_catalog.head(8), NumpyStepEmbedder(), tmp_path, num_workers=0, precision="fp32", engine="openvino", progress=False)
    assert result.engine == "torch"
    assert result.engine_reason.startswith("torch: test-numpy-step did not export to OpenVINO (") and result.engine_reason.endswith("fell back to torch")
    assert "\n" not in result.engine_reason
    assert "engine" not in json.loads((result.cache_dir / "manifest.json").read_text())["identity"]  # torch's cache


def test_compiled_model_is_reused_and_rebuilt_for_other_weights(ov, tmp_path):
    first = select_engine("openvino", NormalizedConvEmbedder(seed=0), "fp32", tmp_path)
    second = select_engine("openvino", NormalizedConvEmbedder(seed=0), "fp32", tmp_path)
    assert not first.reused and second.reused and second.directory == first.directory
    assert "compiled model reused" in second.reason and any((first.directory / "compiled").iterdir())
    other = select_engine("openvino", NormalizedConvEmbedder(seed=1), "fp32", tmp_path)
    assert not other.reused and other.directory != first.directory
    pixels = torch.randn(3, 3, 32, 32)
    assert not torch.allclose(other.encode_images(pixels), first.encode_images(pixels))  # other weights really ran


@pytest.mark.parametrize("name", ["resnet50", "tiny-siglip", "tiny-openclip"])
def test_exportable_families_match_torch_fp32(ov, name, tmp_path, small_catalog):
    embedder = built(name, "random" if name == "resnet50" else None)
    engine = select_engine("openvino", embedder, "fp32", tmp_path)
    assert engine.name == "openvino", engine.reason
    pixels = torch.stack([embedder.image_transform(load_rgb(p)) for p in small_catalog.items["image"][:4]])
    with torch.inference_mode():
        expected = embedder.encode_image(pixels).float()
    assert torch.nn.functional.cosine_similarity(engine.encode_images(pixels), expected).min() >= 0.999


def test_efficientnet_lite0_real_weights_on_200_real_images(ov, fashion_small_dir, tmp_path):
    """OpenVINO f32: cosine >= 0.999 and the same top-5 neighbours as torch fp32. The bf16 hint is
    held to the bar of vrec's torch bf16 path: at least as close to fp32 as it is."""
    embedder = built("efficientnet-lite0")
    catalog = load_catalog(fashion_small_dir).head(200)
    pixels = torch.stack([embedder.image_transform(load_rgb(p)) for p in catalog.items["image"]])

    def run(engine) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.cat([engine.encode_images(pixels[i : i + 50]) for i in range(0, 200, 50)]), dim=-1)

    def top5(vectors: torch.Tensor) -> torch.Tensor:
        scores = vectors @ vectors.T
        scores.fill_diagonal_(-2.0)
        return scores.topk(5).indices

    reference = run(select_engine("torch", embedder, "fp32", tmp_path))
    f32 = run(select_engine("openvino", embedder, "fp32", tmp_path))
    assert (f32 * reference).sum(1).min() >= 0.999
    assert torch.equal(top5(f32), top5(reference))
    bf16_engine = select_engine("openvino", embedder, "bf16", tmp_path)
    if bf16_engine.hint == "bf16":
        ov_bf16 = (run(bf16_engine) * reference).sum(1)
        torch_bf16 = (run(select_engine("torch", embedder, "bf16", tmp_path)) * reference).sum(1)
        assert ov_bf16.min() >= torch_bf16.min() and ov_bf16.mean() >= 0.998


def test_search_by_image_with_openvino_finds_what_torch_finds(ov, tmp_path, small_catalog, capsys):
    from vrec_utils.search import search_by_image

    catalog = small_catalog.head(40)
    extract_image_embeddings(catalog, NormalizedConvEmbedder(), tmp_path, num_workers=0, precision="fp32", progress=False)
    queries = catalog.items["image"].tolist()[:3]
    found = {
        engine: search_by_image(catalog, tmp_path, NormalizedConvEmbedder.name, queries, 5, embedder=NormalizedConvEmbedder(), engine=engine)
        for engine in ("torch", "openvino")
    }
    assert found["openvino"]["item_id"].tolist() == found["torch"]["item_id"].tolist()
    assert found["openvino"].groupby("query_image", sort=False)["item_id"].first().tolist() == catalog.ids[:3]  # each image finds itself first
    assert "engine: openvino f32" in capsys.readouterr().err
