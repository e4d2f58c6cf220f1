"""Batch extraction of image and text embeddings into the resumable cache.

Images are decoded and transformed by a thread pool (CPU models: between torch's forward passes, or
while OpenVINO's streams run the batch before) or by DataLoader workers while the model runs (GPU
models); results are written chunk by chunk, so a killed run resumes where it stopped. Unreadable images are reported
(id + reason) on stderr and in ``skipped.csv``, and the run goes on.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .catalog import Catalog
from .engines import TorchEngine, select_engine, select_text_engine
from .image_files import FilesystemUnavailableError
from .images import ImageLoadError, load_rgb, pixel_batch, split_transform
from .models.base import Embedder
from .store import EmbeddingCache, Embeddings

DEFAULT_CHUNK_SIZE = 512
T = TypeVar("T")


class ImageDataset(Dataset):
    """Yields ``(position, pixels or None, error or "")``; decoding failures are data, not exceptions."""

    def __init__(self, paths: list[str], transform) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        try:
            pixels = self.transform(load_rgb(self.paths[position]))
        except FilesystemUnavailableError:
            raise  # a missing package (pip install 'vrec[cloud]'), not one bad image: stop
        except ImageLoadError as exc:
            return position, None, str(exc)
        except (OSError, ValueError, RuntimeError) as exc:  # a transform choking on odd input
            return position, None, f"{type(exc).__name__}: {exc}"
        return position, pixels, ""


def collate_skipping_failures(batch):
    good = [(pos, px) for pos, px, _ in batch if px is not None]
    failed = [(pos, err) for pos, px, err in batch if px is None]
    positions = [pos for pos, _ in good]
    if not good:
        return positions, None, failed
    if isinstance(good[0][1], np.ndarray):  # uint8 HWC from a split transform's PIL stage
        return positions, torch.from_numpy(np.stack([px for _, px in good])), failed
    return positions, torch.stack([px for _, px in good]), failed


def default_num_workers() -> int:
    # Decoding 60x80 JPEGs is cheap next to the model; one worker per spare core is enough.
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class ExtractResult:
    """One extraction run. ``n_cached`` items reused a vector of the same content (from any
    catalog), ``n_new`` were embedded because their content was new or changed."""

    embeddings: Embeddings
    cache_dir: Path
    n_requested: int
    n_cached: int
    n_new: int
    skipped: pd.DataFrame
    precision: str
    seconds: float
    engine: str = "torch"
    engine_reason: str = ""
    runner: str = "local"
    runner_reason: str = ""
    precision_choice: dict | None = None  # how precision auto was decided (measured numbers)

    @property
    def images_per_second(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"{self.embeddings.model}: reused {self.n_cached} (same content), embedded {self.n_new} "
            f"(new or changed), {len(self.skipped)} skipped, {self.engine} {self.precision}, "
            f"{self.images_per_second:.1f} img/s -> {self.cache_dir}"
        ) + (f"\nengine: {self.engine_reason}" if self.engine_reason else "") + (
            f"\nrunner: {self.runner}: {self.runner_reason}" if self.runner_reason else ""
        )

    def to_json(self) -> dict:
        return {
            "model": self.embeddings.model, "cache_dir": str(self.cache_dir), "requested": self.n_requested,
            "reused": self.n_cached, "reused_because": "same content (model, precision, normalisation and image/text digest)",
            "embedded": self.n_new, "embedded_because": "new or changed content",
            "from_cache": self.n_cached, "skipped": len(self.skipped), "precision": self.precision,
            "engine": self.engine, "engine_reason": self.engine_reason, "precision_choice": self.precision_choice,
            "runner": self.runner, "runner_reason": self.runner_reason, "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2) if self.n_new else None,
        }  # fmt: skip


def _todo(items: pd.DataFrame | pd.Series, cache: EmbeddingCache) -> pd.Index:
    """Ids to embed: content not in the store yet, one id per distinct content (copies of an
    image reuse the first copy's vector); ids with no content key stay, so that extraction
    reports why they cannot be read."""
    done = cache.done_ids()
    keys = cache.keys.reindex(items.index).fillna("")
    pending = ~items.index.isin(list(done))
    first_of_content = ~keys.duplicated() | (keys == "")
    return items.index[pending & first_of_content.to_numpy()]


def extract_image_embeddings(
    catalog: Catalog,
    embedder: Embedder,
    workdir: str | os.PathLike,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    precision: str = "auto",
    engine: str = "torch",
    normalize: bool = True,
    limit: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    lock_timeout: float | None = None,
    runner: BatchRunner | None = None,
) -> ExtractResult:
    """Embed the catalog's images (the first ``limit`` if given), reusing every vector of the
    same content already in the cache (whichever catalog it was made for). ``engine``: torch,
    openvino or auto (see :func:`vrec_utils.engines.select_engine`); a non-torch engine's vectors
    live under their own cache key, never mixed with torch's.

    ``runner`` embeds the items still to do and files them through the cache (this process's
    DataLoader pipeline by default; :mod:`vrec_utils.runners.ray_runner` spreads the work over a
    Ray cluster, with the torch engine). Whatever runs the model, this function owns the cache:
    one writer, the same chunks, manifest and skipped-items file."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not embedder.has_image:
        raise ValueError(f"model {embedder.name!r} has no image tower; use it for text (--text)")
    # real images a non-torch engine is checked on, and precision auto on a CPU decides on (cosine on 32)
    measured = precision == "auto" and embedder.device.type == "cpu"
    check = check_pixels(catalog.items["image"], embedder, 32 if measured else 8) if engine != "torch" or measured else None
    chosen = select_engine(engine, embedder, precision, workdir, check=check)
    if runner is not None and chosen.name != "torch":
        raise ValueError(f"a custom runner (e.g. --runner ray) runs the torch engine only, not {chosen.name}; use --engine torch")
    identity = {**embedder.identity(), **chosen.identity()}
    with EmbeddingCache.open(
        workdir, catalog, identity, precision=chosen.precision, normalized=normalize, lock_timeout=lock_timeout
    ) as cache:
        items = catalog.items if limit is None else catalog.items.iloc[:limit]
        todo = items.loc[_todo(items, cache)]
        start = time.perf_counter()
        skipped: dict[str, str] = {}
        if len(todo) and runner is not None:
            skipped = runner(todo, embedder, cache, batch_size=batch_size, precision=chosen.precision, normalize=normalize, chunk_size=chunk_size, progress=progress)
        elif len(todo):
            skipped = run_image_batches(todo, embedder, chosen, cache, batch_size, num_workers, normalize, chunk_size, progress)
        seconds = time.perf_counter() - start
        cache.write_skipped({**catalog.report.refused_rows(), **skipped})
        cache.consolidate(extra={"engine": chosen.name, "engine_reason": chosen.reason, **precision_choice(chosen)})
        embeddings = cache.load()
    n_new = len(todo) - len(skipped)
    return ExtractResult(
        embeddings=embeddings,
        cache_dir=cache.directory,
        n_requested=len(items),
        n_cached=len(items) - n_new - len(skipped),
        n_new=n_new,
        skipped=cache.skipped(),
        precision=chosen.precision,
        seconds=seconds,
        engine=chosen.name,
        engine_reason=chosen.reason,
        runner="local" if runner is None else getattr(runner, "name", "custom"),
        runner_reason="" if runner is None else getattr(runner, "reason", ""),
        precision_choice=getattr(chosen, "precision_choice", None),
    )


def precision_choice(engine) -> dict:
    """The manifest's record of how precision ``auto`` was decided (nothing for an explicit one)."""
    record = getattr(engine, "precision_choice", None)
    return {"precision_choice": record} if record else {}


class BatchRunner(Protocol):
    """Embeds ``todo`` (catalog rows with an ``image`` column) and files every vector through
    ``ChunkWriter(cache, ...)``; returns ``{id: reason}`` for the images it could not read.
    Optional attributes ``name`` and ``reason`` (which pipeline ran and why) go into the run summary."""

    def __call__(self, todo: pd.DataFrame, embedder: Embedder, cache: EmbeddingCache, *, batch_size: int, precision: str, normalize: bool, chunk_size: int, progress: bool) -> dict[str, str]: ...


class ChunkWriter:
    """Collects (id, vector) pairs and files them as cache chunks of ``chunk_size``: the one
    write path of every runner. An id arriving twice (a retried task) is filed once; an
    unreadable image is reported once, on stderr and in the returned ``skipped``."""

    def __init__(self, cache: EmbeddingCache, chunk_size: int) -> None:
        self.cache = cache
        self.chunk_size = chunk_size
        self.skipped: dict[str, str] = {}
        self.seen: set[str] = set()
        self.pending_ids: list[str] = []
        self.pending_vecs: list[np.ndarray] = []

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        fresh = [n for n, i in enumerate(ids) if i not in self.seen]
        if len(fresh) < len(ids):
            ids, vectors = [ids[n] for n in fresh], vectors[fresh]
        self.seen.update(ids)
        if ids:
            self.pending_ids.extend(ids)
            self.pending_vecs.append(np.asarray(vectors, dtype=np.float32))
        if len(self.pending_ids) >= self.chunk_size:
            self.flush()

    def skip(self, item_id: str, reason: str) -> None:
        if item_id not in self.skipped:
            self.skipped[item_id] = reason
            tqdm.write(f"skipped {item_id}: {reason}", file=sys.stderr)

    def flush(self) -> None:
        if self.pending_ids:
            self.cache.append(self.pending_ids, np.concatenate(self.pending_vecs))
        self.pending_ids, self.pending_vecs = [], []


def run_image_batches(todo, embedder, engine, cache, batch_size, num_workers, normalize, chunk_size, progress) -> dict[str, str]:
    """The local runner. The PIL part of the transform (decode, resize, crop: uint8 out) runs in
    :func:`image_batches`; the engine normalises each batch (torch in this process, OpenVINO
    inside its model) and runs it (:func:`encode_batches`: OpenVINO while the next batch is
    decoded). Chunks are written in this thread: a 512-vector chunk costs ~0.1 ms per
    image here, under 2% of the forward pass, and the cache's write lock belongs to this thread."""
    ids = todo.index.tolist()
    split = split_transform(embedder.image_transform)
    dataset = ImageDataset(todo["image"].tolist(), split[0] if split else embedder.image_transform)
    writer = ChunkWriter(cache, chunk_size)
    bar = tqdm(total=len(ids), desc=f"embed {embedder.name}", unit="img", disable=not progress, file=sys.stderr)
    batches = (((positions, failed), pixels) for positions, pixels, failed in image_batches(dataset, batch_size, num_workers, embedder.device))
    with bar:  # closed on errors too
        for (positions, failed), vectors in encode_batches(engine, batches, normalize):
            for pos, reason in failed:
                writer.skip(ids[pos], reason)
            if vectors is not None:
                writer.add([ids[p] for p in positions], vectors)
            bar.update(len(positions) + len(failed))
        writer.flush()
    return writer.skipped


def image_batches(dataset: ImageDataset, batch_size: int, num_workers: int | None, device: torch.device) -> Iterator:
    """Collated batches of ``dataset`` (:func:`collate_skipping_failures`), decoded the way that
    keeps the model busiest on ``device``.

    - ``num_workers=None`` with a CPU model: in this process, each batch decoded by a pool of
      one thread per core (one slice of the batch each), when the caller asks for it: between
      torch's forward passes, or while OpenVINO's streams run the batches queued before
      (:meth:`~vrec_utils.engines.openvino_engine.StreamRequests.infer_stream`, whose streams
      have no barrier a decoding thread could stall). The model's own threads use every core, and
      a loader process competing with them stalls their parallel regions each time it is
      scheduled (efficientnet-lite0 on OpenVINO, 2 cores: 174 img/s with one worker process,
      185 with the threads; PIL releases the GIL while it decodes and resizes).
    - otherwise (a GPU, or workers asked for): DataLoader worker processes decode while the
      model runs (``None``: :func:`default_num_workers`; 0: in this process, one image at a time)."""
    if num_workers is None and device.type == "cpu":
        return _threaded_batches(dataset, batch_size, os.cpu_count() or 1)
    workers = default_num_workers() if num_workers is None else num_workers
    return iter(DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_skipping_failures,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    ))  # fmt: skip


def _threaded_batches(dataset: ImageDataset, batch_size: int, threads: int) -> Iterator:
    """Each batch cut into one contiguous slice per thread: one task per thread instead of one
    per image (a task's hand-over holds the GIL; ~0.08 ms per image on 2 cores)."""

    def decode(positions: range) -> list:
        return [dataset[position] for position in positions]

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vrec-decode") as pool:
        for begin in range(0, len(dataset), batch_size):
            end = min(begin + batch_size, len(dataset))
            step = -(-(end - begin) // threads)
            slices = [range(start, min(start + step, end)) for start in range(begin, end, step)]
            yield collate_skipping_failures([item for part in pool.map(decode, slices) for item in part])


def encode_batch(engine: TorchEngine, pixels: torch.Tensor, normalize: bool) -> np.ndarray:
    """One batch of model inputs through ``engine`` (anything with ``encode_images``), as float32 rows."""
    return _rows(engine.encode_images(pixels), normalize)


def encode_batches(engine, batches: Iterable[tuple[T, torch.Tensor | None]], normalize: bool) -> Iterator[tuple[T, np.ndarray | None]]:
    """``(tag, float32 rows)`` for each ``(tag, pixels)`` of ``batches``, in order (None for None
    pixels). An engine with ``encode_stream`` (OpenVINO) runs batches while the next ones are
    decoded; any other (``encode_images`` only) one at a time."""
    stream = getattr(engine, "encode_stream", None)
    if stream is None:
        for tag, pixels in batches:
            yield tag, None if pixels is None else encode_batch(engine, pixels, normalize)
        return
    for tag, features in stream(batches):
        yield tag, None if features is None else _rows(features, normalize)


def _rows(features: torch.Tensor, normalize: bool) -> np.ndarray:
    if normalize:
        features = torch.nn.functional.normalize(features, dim=-1)
    return features.cpu().numpy()


def check_pixels(paths: pd.Series, embedder: Embedder, n: int = 8) -> torch.Tensor | None:
    """Up to ``n`` readable catalog images as the batch engines take (:func:`pixel_batch`): the
    real inputs a non-torch engine is checked on against torch fp32 and precision auto decides
    on (None when none of the first 4n reads)."""
    batches = []
    for path in paths.iloc[: 4 * n]:
        try:
            batches.append(pixel_batch([load_rgb(path)], embedder.image_transform))
        except (ImageLoadError, OSError, ValueError, RuntimeError):  # unreadable, or the transform chokes on it
            continue
        if len(batches) == n:
            break
    return torch.cat(batches) if batches else None


def extract_text_embeddings(
    catalog: Catalog,
    embedder: Embedder,
    workdir: str | os.PathLike,
    *,
    column: str = "title",
    batch_size: int = 128,
    precision: str = "fp32",
    engine: str = "torch",
    normalize: bool = True,
    progress: bool = True,
) -> ExtractResult:
    """Embed a text column (titles by default); empty texts are skipped and reported. ``engine``:
    torch, openvino or auto (:func:`vrec_utils.engines.select_text_engine`); a non-torch engine's
    vectors live under their own cache key."""
    catalog.require_column(column)
    if not embedder.has_text:
        embedder.encode_text([])  # raises TextNotSupportedError with the explanation
    texts = catalog.items[column].astype(str).str.strip()
    check = texts[texts != ""].iloc[:16].tolist() if engine != "torch" else None
    chosen = select_text_engine(engine, embedder, precision, workdir, check=check)
    with EmbeddingCache.open(
        workdir, catalog, {**embedder.identity(), **chosen.identity()}, precision=chosen.precision, normalized=normalize,
        modality="text", source_column=column,
    ) as cache:
        todo = texts.loc[_todo(texts, cache)]
        skipped = {i: f"empty {column}" for i in texts.index[texts == ""]}
        todo = todo[todo != ""]
        start = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"embed {embedder.name} text", unit="text", disable=not progress, file=sys.stderr)
        with bar:  # closed on errors too
            for begin in range(0, len(todo), batch_size):
                batch = todo.iloc[begin : begin + batch_size]
                features = chosen.encode_texts(batch.tolist())
                if normalize:
                    features = torch.nn.functional.normalize(features, dim=-1)
                cache.append(batch.index.tolist(), features.cpu().numpy())
                bar.update(len(batch))
        seconds = time.perf_counter() - start
        cache.write_skipped({**catalog.report.refused_rows(), **skipped})
        cache.consolidate(extra={"engine": chosen.name, "engine_reason": chosen.reason})
        embeddings = cache.load()
    return ExtractResult(
        embeddings=embeddings,
        cache_dir=cache.directory,
        n_requested=len(texts),
        n_cached=len(texts) - len(todo) - len(skipped),
        n_new=len(todo),
        skipped=cache.skipped(),
        precision=chosen.precision,
        seconds=seconds,
        engine=chosen.name,
        engine_reason=chosen.reason,
    )
