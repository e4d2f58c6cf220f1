"""Batch extraction of image and text embeddings into the resumable cache.

Images are decoded and transformed by DataLoader workers while the model runs; results are
written chunk by chunk, so a killed run resumes where it stopped. Unreadable images are reported
(id + reason) on stderr and in ``skipped.csv``, and the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .catalog import Catalog
from .images import ImageLoadError, load_rgb
from .models.base import Embedder
from .store import EmbeddingCache, Embeddings

PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_CHUNK_SIZE = 512


def bf16_is_native(device: torch.device) -> bool:
    """True where bf16 matmuls run in hardware: AVX512-BF16/AMX CPUs, Ampere+ GPUs."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_native(device) else "fp32"
    return precision


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
        except ImageLoadError as exc:
            return position, None, str(exc)
        except (OSError, ValueError, RuntimeError) as exc:  # a transform choking on odd input
            return position, None, f"{type(exc).__name__}: {exc}"
        return position, pixels, ""


def collate_skipping_failures(batch):
    good = [(pos, px) for pos, px, _ in batch if px is not None]
    failed = [(pos, err) for pos, px, err in batch if px is None]
    positions = [pos for pos, _ in good]
    pixels = torch.stack([px for _, px in good]) if good else None
    return positions, pixels, failed


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

    @property
    def images_per_second(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"{self.embeddings.model}: reused {self.n_cached} (same content), embedded {self.n_new} "
            f"(new or changed), {len(self.skipped)} skipped, {self.precision}, "
            f"{self.images_per_second:.1f} img/s -> {self.cache_dir}"
        )

    def to_json(self) -> dict:
        return {
            "model": self.embeddings.model, "cache_dir": str(self.cache_dir), "requested": self.n_requested,
            "reused": self.n_cached, "reused_because": "same content (model, precision, normalisation and image/text digest)",
            "embedded": self.n_new, "embedded_because": "new or changed content",
            "from_cache": self.n_cached, "skipped": len(self.skipped), "precision": self.precision,
            "seconds": round(self.seconds, 3),
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
    normalize: bool = True,
    limit: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    lock_timeout: float | None = None,
    runner: BatchRunner | None = None,
) -> ExtractResult:
    """Embed the catalog's images (the first ``limit`` if given), reusing every vector of the
    same content already in the cache (whichever catalog it was made for).

    ``runner`` embeds the items still to do and files them through the cache (the local
    DataLoader pipeline by default; :mod:`vrec_utils.runners.ray_runner` spreads the work over a
    Ray cluster). Whatever runs the model, this function owns the cache: one writer, the same
    chunks, manifest and skipped-items file."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not embedder.has_image:
        raise ValueError(f"model {embedder.name!r} has no image tower; use it for text (--text)")
    precision = resolve_precision(precision, embedder.device)
    with EmbeddingCache.open(
        workdir, catalog, embedder.identity(), precision=precision, normalized=normalize, lock_timeout=lock_timeout
    ) as cache:
        items = catalog.items if limit is None else catalog.items.iloc[:limit]
        todo = items.loc[_todo(items, cache)]
        start = time.perf_counter()
        skipped: dict[str, str] = {}
        if len(todo) and runner is not None:
            skipped = runner(todo, embedder, cache, batch_size=batch_size, precision=precision, normalize=normalize, chunk_size=chunk_size, progress=progress)
        elif len(todo):
            skipped = run_image_batches(
                todo, embedder, cache, batch_size, num_workers, precision, normalize, chunk_size, progress
            )
        seconds = time.perf_counter() - start
        cache.write_skipped({**catalog.report.refused_rows(), **skipped})
        cache.consolidate()
        embeddings = cache.load()
    n_new = len(todo) - len(skipped)
    return ExtractResult(
        embeddings=embeddings,
        cache_dir=cache.directory,
        n_requested=len(items),
        n_cached=len(items) - n_new - len(skipped),
        n_new=n_new,
        skipped=cache.skipped(),
        precision=precision,
        seconds=seconds,
    )


class BatchRunner(Protocol):
    """Embeds ``todo`` (catalog rows with an ``image`` column) and files every vector through
    ``ChunkWriter(cache, ...)``; returns ``{id: reason}`` for the images it could not read."""

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


def run_image_batches(todo, embedder, cache, batch_size, num_workers, precision, normalize, chunk_size, progress):
    ids = todo.index.tolist()
    dataset = ImageDataset(todo["image"].tolist(), embedder.image_transform)
    workers = default_num_workers() if num_workers is None else num_workers
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_skipping_failures,
        pin_memory=embedder.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    writer = ChunkWriter(cache, chunk_size)
    encoder = FrozenCNNEncoder(embedder, precision)
    bar = tqdm(total=len(ids), desc=f"embed {embedder.name}", unit="img", disable=not progress, file=sys.stderr)
    with torch.inference_mode(), autocast_context(precision, embedder.device), bar:  # bar: closed on errors too
        for positions, pixels, failed in loader:
            for pos, reason in failed:
                writer.skip(ids[pos], reason)
            if pixels is not None:
                writer.add([ids[p] for p in positions], encode_batch(embedder, encoder, pixels, normalize))
            bar.update(len(positions) + len(failed))
    writer.flush()
    bar.close()
    return writer.skipped


class FrozenCNNEncoder:
    """``embedder.encode_image``, traced and frozen for bf16 CNN inference on the CPU.

    Under CPU autocast every forward casts the fp32 weights to bf16 again; freezing a trace taken
    under autocast bakes the bf16 weights (and BatchNorm) into the graph once, which is ~1.4x
    faster for ResNet50 and EfficientNet-Lite0 here. Anything else, or any failure to trace,
    runs the eager model unchanged.
    """

    def __init__(self, embedder: Embedder, precision: str) -> None:
        self.embedder = embedder
        self.enabled = embedder.prefers_channels_last and precision == "bf16" and embedder.device.type == "cpu"
        self.frozen = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.frozen is None:
            self.frozen = self._freeze(pixels)
            self.enabled = self.frozen is not None
        return self.frozen(pixels) if self.frozen is not None else self.embedder.encode_image(pixels)

    def _freeze(self, example: torch.Tensor):
        import warnings

        module = _EncodeImage(self.embedder)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about data-independent shapes
                with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                    frozen = torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))
                eager = self.embedder.encode_image(example[:2]).float()
                check = frozen(example[:2]).float()
        except (RuntimeError, TypeError, ValueError):
            return None
        same = torch.nn.functional.cosine_similarity(eager, check).min().item() > 0.999
        return frozen if same else None


class _EncodeImage(torch.nn.Module):
    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder
        for module in embedder.modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)  # frozen graphs hold weights as constants

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embedder.encode_image(pixels)


def encode_batch(embedder: Embedder, encoder, pixels: torch.Tensor, normalize: bool) -> np.ndarray:
    pixels = pixels.to(embedder.device, non_blocking=True)
    if embedder.prefers_channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    features = encoder(pixels).float()
    if normalize:
        features = torch.nn.functional.normalize(features, dim=-1)
    return features.cpu().numpy()


def extract_text_embeddings(
    catalog: Catalog,
    embedder: Embedder,
    workdir: str | os.PathLike,
    *,
    column: str = "title",
    batch_size: int = 128,
    precision: str = "fp32",
    normalize: bool = True,
    progress: bool = True,
) -> ExtractResult:
    """Embed a text column (titles by default); empty texts are skipped and reported."""
    catalog.require_column(column)
    if not embedder.has_text:
        embedder.encode_text([])  # raises TextNotSupportedError with the explanation
    precision = resolve_precision(precision, embedder.device)
    with EmbeddingCache.open(
        workdir, catalog, embedder.identity(), precision=precision, normalized=normalize,
        modality="text", source_column=column,
    ) as cache:
        texts = catalog.items[column].astype(str).str.strip()
        todo = texts.loc[_todo(texts, cache)]
        skipped = {i: f"empty {column}" for i in texts.index[texts == ""]}
        todo = todo[todo != ""]
        start = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"embed {embedder.name} text", unit="text", disable=not progress, file=sys.stderr)
        with torch.inference_mode(), autocast_context(precision, embedder.device), bar:  # bar: closed on errors too
            for begin in range(0, len(todo), batch_size):
                batch = todo.iloc[begin : begin + batch_size]
                features = embedder.encode_text(batch.tolist()).float()
                if normalize:
                    features = torch.nn.functional.normalize(features, dim=-1)
                cache.append(batch.index.tolist(), features.cpu().numpy())
                bar.update(len(batch))
        bar.close()
        seconds = time.perf_counter() - start
        cache.write_skipped({**catalog.report.refused_rows(), **skipped})
        cache.consolidate()
        embeddings = cache.load()
    return ExtractResult(
        embeddings=embeddings,
        cache_dir=cache.directory,
        n_requested=len(texts),
        n_cached=len(texts) - len(todo) - len(skipped),
        n_new=len(todo),
        skipped=cache.skipped(),
        precision=precision,
        seconds=seconds,
    )
