"""The three query types: similar items, visual search, text-to-image search.

Each returns a DataFrame with one row per (query, result): the query (``query_id`` for catalog
items, else ``query`` = 0-based number plus ``query_image`` / ``query_text``), ``rank``
(1-based), ``item_id``, ``score`` (cosine similarity), then the catalog's title and labels.

Every function takes an already-built ``index`` (fast for many calls) or builds/loads one with
:func:`vrec_utils.index.build_index` (FAISS: loaded from next to the embedding cache when the
embeddings have not changed).

A fine-tune with an in-domain gate that records the serving mode "routed" (or records none: a model
saved before round 6, with a note) routes image queries (:func:`~vrec_utils.models.local.query_router`):
a query item or image whose efficientnet-lite0 features the gate passes searches the fine-tune's
vectors, any other searches efficientnet-lite0's vectors of the same catalog (``base_index``), so an
out-of-domain photo gets exactly the base model's neighbours (issue 13, round 5: without routing, a
photo's base vector searched studio items' tuned vectors and lost -0.17 nDCG@5). Text queries always
search the fine-tune's vectors (its text tower is aligned with them).
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
from .index import SearchResult, VectorIndex, build_index
from .models.base import Embedder, TextNotSupportedError
from .models.local import QueryRouter, query_router
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
    base_index: VectorIndex | None = None,
    allow_partial: bool = False,
    **index_config: Any,
) -> pd.DataFrame:
    """The ``k`` items most similar to each catalog item in ``item_ids``, never the item itself.

    ``same_category`` (a label column such as ``articleType``) keeps only items that share the
    query item's value: the article's filtered kNN, done inside the index. A gated fine-tune routes
    each query item by its gate (module docstring; ``base_index``: efficientnet-lite0's index over
    the same items as ``index``, built from ``workdir`` when needed and not given).
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
    router = query_router(model)
    if router is None:
        return index.search(vectors, k, filters=filters, exclude_ids=ids).to_frame(catalog)
    base_vectors = _base_embeddings(workdir, catalog, router, model, allow_partial or index is not None).vectors_for(ids)
    route = _Route(router, base_vectors, base_index, index, workdir, catalog, backend, index_config, allow_partial)
    return route.search(vectors, k, filters=filters, exclude_ids=ids).to_frame(catalog)


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
    base_index: VectorIndex | None = None,
    allow_partial: bool = False,
    engine: str = "torch",
    **index_config: Any,
) -> pd.DataFrame:
    """Visual search: the ``k`` catalog items closest to each query image (files or PIL images,
    which need not be in the catalog). ``filters`` (e.g. ``{"gender": "Women"}``) restrict results.
    ``engine`` (torch, openvino, auto) embeds the queries; which one ran and why goes to stderr.
    A gated fine-tune routes each query image by its gate (module docstring, ``base_index``)."""
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
    router = query_router(model)
    if router is not None:
        base = embedder.feature_model  # the tower the gate reads (a gated model is a mini-siglip)
        with autocast_context(_check_same_weights(base, workdir, catalog, router.base_model), base.device):
            base_vectors = base.embed_images(pictures)
        index = _Route(router, base_vectors, base_index, index, workdir, catalog, backend, index_config, allow_partial)
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


def _base_embeddings(workdir, catalog: Catalog, router: QueryRouter, model: str, allow_partial: bool):
    try:
        return load_embeddings(workdir, catalog, router.base_model, allow_partial=allow_partial)
    except EmbeddingsNotFoundError:
        raise EmbeddingsNotFoundError(
            f"{model} routes out-of-domain queries to {router.base_model}'s vectors, which are not cached for catalog "
            f"{catalog.name!r}; run: vrec extract --catalog {catalog.root} --model {router.base_model} --workdir {workdir}"
        ) from None


class _Route:
    """Searches the fine-tune's ``index`` for the queries inside ``router``'s gate and the base
    model's index (``base_index``, or built from ``workdir`` on first need) with ``base_vectors``
    for the others; quacks like :meth:`VectorIndex.search`."""

    def __init__(self, router, base_vectors, base_index, index, workdir, catalog, backend, index_config, allow_partial) -> None:
        self.router, self.index, self.base_index = router, index, base_index
        self.base_vectors = np.asarray(base_vectors, dtype=np.float32)
        self.inside = router.inside(self.base_vectors)
        self._build = lambda: build_index(workdir, catalog, router.base_model, backend=backend, allow_partial=allow_partial, **index_config)

    def search(self, vectors: np.ndarray, k: int, *, filters=None, exclude_ids=None) -> SearchResult:
        n = len(vectors)
        if self.inside.all():
            return self.index.search(vectors, k, filters=filters, exclude_ids=exclude_ids)
        if self.base_index is None:
            self.base_index = self._build()
            if len(self.base_index) != len(self.index):
                raise ValueError(
                    f"the index given holds {len(self.index)} items but {self.router.base_model}'s has {len(self.base_index)}; "
                    f"pass base_index= ({self.router.base_model}'s index over the same items) to route out-of-domain queries"
                )
        print(f"routing: {int((~self.inside).sum())} of {n} queries outside the fine-tune's domain searched {self.router.base_model}'s vectors", file=sys.stderr)
        ids, scores = np.full((n, k), "", dtype=object), np.full((n, k), -np.inf, dtype=np.float32)
        for mask, index, x in ((self.inside, self.index, vectors), (~self.inside, self.base_index, self.base_vectors)):
            rows = np.flatnonzero(mask)
            if len(rows):
                part = index.search(x[rows], k, filters=_rows_of(filters, rows), exclude_ids=_rows_of(exclude_ids, rows))
                ids[rows], scores[rows] = part.ids, part.scores
        return SearchResult(ids.astype(str), scores, query_ids=None if exclude_ids is None else [str(i) for i in exclude_ids])


def _rows_of(values, rows: np.ndarray):
    """Per-query ``values`` (a list) at ``rows``; None or one mapping for all stays as it is."""
    return values if values is None or isinstance(values, Mapping) else [values[r] for r in rows]


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
