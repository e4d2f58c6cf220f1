"""The three query types: similar items, visual search, text-to-image search.

Each returns a DataFrame with one row per (query, result): the query (``query_id`` for catalog
items, else ``query`` = 0-based number plus ``query_image`` / ``query_text``), ``rank``
(1-based), ``item_id``, ``score`` (cosine similarity), then the catalog's title and labels.

Every function takes an already-built ``index`` (fast for many calls) or builds/loads one with
:func:`vrec_utils.index.build_index` (FAISS: loaded from next to the embedding cache when the
embeddings have not changed).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .catalog import Catalog
from .engines import autocast_context, select_engine, select_text_engine
from .images import ImageLoadError, load_rgb, pixel_batch
from .index import VectorIndex, build_index
from .models.base import Embedder, TextNotSupportedError
from .store import EmbeddingsNotFoundError, load_embeddings

ImageInput = str | os.PathLike | Image.Image


def recommend(
    catalog: Catalog,
    workdir: str | os.PathLike,
    model: str,
    item_ids: str | Sequence[str],
    k: int = 5,
    *,
    same_category: str | None = None,
    backend: str = "faiss",
    index: VectorIndex | None = None,
    allow_partial: bool = False,
    **index_config: Any,
) -> pd.DataFrame:
    """The ``k`` items most similar to each catalog item in ``item_ids``, never the item itself.

    ``same_category`` (a label column such as ``articleType``) keeps only items that share the
    query item's value: the article's filtered kNN, done inside the index.
    """
    ids = _as_list(item_ids, "item_ids")
    ids = [catalog.require_id(i) for i in ids]
    _check_k(k)
    if same_category is not None:
        catalog.require_column(same_category)
    embeddings = load_embeddings(workdir, catalog, model, allow_partial=allow_partial or index is not None)
    try:
        vectors = embeddings.vectors_for(ids)
    except KeyError as exc:
        raise KeyError(
            f"{exc.args[0]}: its image was skipped at extraction (see skipped.csv) or extraction has not "
            f"finished; rerun: vrec extract --catalog {catalog.root} --model {model} --workdir {workdir}"
        ) from None
    index = _index(index, workdir, catalog, model, backend, index_config, allow_partial)
    filters = None
    if same_category is not None:
        filters = [{same_category: str(catalog.items.at[i, same_category])} for i in ids]
    result = index.search(vectors, k, filters=filters, exclude_ids=ids)
    return result.to_frame(catalog)


def search_by_image(
    catalog: Catalog,
    workdir: str | os.PathLike,
    model: str,
    images: ImageInput | Sequence[ImageInput],
    k: int = 10,
    *,
    embedder: Embedder | None = None,
    weights: str | None = None,
    device: str | None = "auto",
    filters: Mapping[str, str] | None = None,
    backend: str = "faiss",
    index: VectorIndex | None = None,
    allow_partial: bool = False,
    engine: str = "torch",
    **index_config: Any,
) -> pd.DataFrame:
    """Visual search: the ``k`` catalog items closest to each query image (files or PIL images,
    which need not be in the catalog). ``filters`` (e.g. ``{"gender": "Women"}``) restrict results.
    ``engine`` (torch, openvino, auto) embeds the queries; which one ran and why goes to stderr."""
    items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
    if not items:
        raise ValueError("no query image given")
    _check_k(k)
    names, pictures = [], []
    for item in items:
        if isinstance(item, Image.Image):
            names.append(f"<image {item.width}x{item.height}>")
            pictures.append(item.convert("RGB") if item.mode != "RGB" else item)
        elif isinstance(item, (str, os.PathLike)):
            try:
                pictures.append(load_rgb(item))
            except ImageLoadError as exc:
                raise ImageLoadError(f"cannot read query image {str(item)!r}: {exc}") from None
            names.append(str(item))
        else:
            raise ValueError(f"query images must be paths or PIL images, got {type(item).__name__}")
    index = _index(index, workdir, catalog, model, backend, index_config, allow_partial)
    embedder = _embedder(embedder, model, weights, device)
    precision = _check_same_weights(embedder, workdir, catalog, model)
    if engine == "torch":
        with autocast_context(precision, embedder.device):  # queries in the catalog's precision
            vectors = embedder.embed_images(pictures)
    else:
        pixels = pixel_batch(pictures, embedder.image_transform)  # as extraction feeds the engine
        runner = select_engine(engine, embedder, precision, workdir, check=pixels)
        print(f"engine: {runner.reason}", file=sys.stderr)
        vectors = torch.nn.functional.normalize(runner.encode_images(pixels), dim=-1).numpy()
    return _search_frame(index, vectors, k, filters, catalog, "query_image", names)


def search_by_text(
    catalog: Catalog,
    workdir: str | os.PathLike,
    model: str,
    texts: str | Sequence[str],
    k: int = 10,
    *,
    embedder: Embedder | None = None,
    weights: str | None = None,
    device: str | None = "auto",
    filters: Mapping[str, str] | None = None,
    backend: str = "faiss",
    index: VectorIndex | None = None,
    allow_partial: bool = False,
    engine: str = "torch",
    **index_config: Any,
) -> pd.DataFrame:
    """Text-to-image search (vision-language models: SigLIP, open_clip, mini-siglip): the ``k``
    catalog images closest to each text. Image-only models raise ``TextNotSupportedError``.
    ``engine`` (torch, openvino, auto) embeds the texts; which one ran and why goes to stderr."""
    queries = _as_list(texts, "texts")
    if any(not q.strip() for q in queries):
        raise ValueError("query texts must not be empty")
    _check_k(k)
    if embedder is None:
        _require_text_tower(model)
    elif not embedder.has_text:
        embedder.encode_text(queries)  # raises TextNotSupportedError with the explanation
    index = _index(index, workdir, catalog, model, backend, index_config, allow_partial)
    embedder = _embedder(embedder, model, weights, device)
    precision = _check_same_weights(embedder, workdir, catalog, model)
    if engine == "torch":
        with autocast_context(precision, embedder.device):  # queries in the catalog's precision
            vectors = embedder.embed_texts(queries)
    else:
        runner = select_text_engine(engine, embedder, precision, workdir, check=queries)
        print(f"engine: {runner.reason}", file=sys.stderr)
        vectors = torch.nn.functional.normalize(runner.encode_texts(queries), dim=-1).numpy()
    return _search_frame(index, vectors, k, filters, catalog, "query_text", queries)


# ---------------------------------------------------------------------------------------- helpers


def _search_frame(index: VectorIndex, vectors: np.ndarray, k: int, filters, catalog: Catalog, column: str, names: Sequence[str]) -> pd.DataFrame:
    """Search ``vectors`` and return the result frame with ``column`` naming each query."""
    frame = index.search(vectors, k, filters=filters).to_frame(catalog)
    frame.insert(1, column, np.asarray(names, dtype=object)[frame["query"].to_numpy()] if len(frame) else [])
    return frame


def _as_list(values: str | Sequence[str], what: str) -> list[str]:
    out = [values] if isinstance(values, str) else [str(v) for v in values]
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _index(index, workdir, catalog, model, backend, index_config, allow_partial) -> VectorIndex:
    if index is None:
        return build_index(workdir, catalog, model, backend=backend, allow_partial=allow_partial, **index_config)
    if index_config:
        raise ValueError(f"index settings {sorted(index_config)} cannot apply to an index passed in")
    if index.model != model:
        raise ValueError(f"the index given holds {index.model!r} vectors, not {model!r}; pass the index of {model!r}")
    return index


def _embedder(embedder: Embedder | None, model: str, weights: str | None, device: str | None) -> Embedder:
    if embedder is not None:
        if embedder.name != model:
            raise ValueError(f"the embedder given is {embedder.name!r}, not {model!r}")
        return embedder
    from .models import create_embedder

    return create_embedder(model, weights=weights, device=device)


def _require_text_tower(model: str) -> None:
    from .models import get_model_entry

    entry, spec = get_model_entry(model)
    if spec is None and not entry.has_text:
        raise TextNotSupportedError(
            f"model {model!r} is image-only and cannot embed text; text search needs a vision-language "
            "model such as siglip-base, an openclip:... model or mini-siglip"
        )


def _check_same_weights(embedder: Embedder, workdir, catalog: Catalog, model: str) -> str:
    """Refuse to compare query vectors from other weights or preprocessing than the catalog's;
    return the precision the catalog was embedded in ("fp32" when there is no local cache)."""
    try:
        manifest = load_embeddings(workdir, catalog, model).manifest
    except EmbeddingsNotFoundError:
        return "fp32"  # an index passed in without a local cache (e.g. Elasticsearch elsewhere)
    cached = manifest.get("identity") or {}
    mine = embedder.identity()
    for key in ("weights", "preprocess"):
        if key in cached and cached[key] != mine.get(key):
            raise ValueError(
                f"the query model's {key} ({str(mine.get(key))[:80]}) differ from those of the cached "
                f"{model} embeddings ({str(cached[key])[:80]}); use the same --weights as at extraction"
            )
    return str(manifest.get("precision") or "fp32")


__all__ = ["recommend", "search_by_image", "search_by_text"]
