"""Vector indexes over cached embeddings: one interface, FAISS (default) and Elasticsearch backends.

>>> index = build_index("work", catalog, "efficientnet-lite0")          # FAISS, exact, cached on disk
>>> result = index.search(vectors, k=10, filters={"articleType": "Dresses"}, exclude_ids=ids)
>>> result.to_frame(catalog)                                             # query_id, rank, item_id, score, labels
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..catalog import Catalog
from ..store import Embeddings, catalog_dir, load_embeddings, slugify
from .base import (
    BackendUnavailableError,
    IndexBackendError,
    IndexNotFoundError,
    IndexSettingsMismatchError,
    SearchResult,
    VectorIndex,
    create_index,
    get_index_class,
    list_index_backends,
    register_index,
)


def build_index(
    workdir: str | os.PathLike,
    catalog: Catalog,
    model: str,
    *,
    backend: str = "faiss",
    filter_columns: str | Sequence[str] | None = None,
    rebuild: bool = False,
    allow_partial: bool = False,
    **config: Any,
) -> VectorIndex:
    """An index over ``model``'s cached image embeddings of ``catalog``'s items.

    ``filter_columns`` (default: all the catalog's label columns) can be used in search filters.
    FAISS: the index is saved next to the embedding cache and loaded instead of rebuilt while the
    embeddings, the labels and the build settings are unchanged (``rebuild=True`` forces it).
    Elasticsearch: documents missing this model's vector are indexed (a backfill); ``rebuild=True``
    re-sends all of them. ``config`` is passed to the backend (e.g. ``ann="hnsw"``, ``ef_search=..``
    for FAISS; ``index_name=..``, ``config_file=..`` for Elasticsearch).

    Raises :class:`~vrec_utils.store.EmbeddingsNotFoundError` (naming the ``vrec extract`` command)
    when the embeddings are not cached, and :class:`~vrec_utils.store.PartialCacheError` when some
    catalog items lack a vector, unless ``allow_partial`` (then the items that have one are indexed).
    """
    get_index_class(backend)  # an unknown backend fails before the embeddings load
    if filter_columns is None:
        columns = list(catalog.label_columns)
    else:
        columns = [filter_columns] if isinstance(filter_columns, str) else list(filter_columns)
        columns = [catalog.require_column(c) for c in columns]
    embeddings = load_embeddings(workdir, catalog, model, allow_partial=allow_partial)
    return index_of_embeddings(embeddings, catalog, backend=backend, cache_dir=embedding_cache_dir(workdir, catalog, embeddings), filter_columns=columns, rebuild=rebuild, **config)


def index_of_embeddings(
    embeddings: Embeddings, catalog: Catalog, *, backend: str, cache_dir: str | os.PathLike, filter_columns: Sequence[str] | None = None,
    rebuild: bool = False, **config: Any,
) -> VectorIndex:
    """:func:`build_index` for embeddings already loaded (the catalog's items among them; filter
    columns: the catalog's label columns by default, as ``vrec index`` does): the index saved in
    ``cache_dir`` is reused while its fingerprint matches, else built (``info["reused"]`` says which)."""
    columns = list(catalog.label_columns) if filter_columns is None else list(filter_columns)
    embeddings = _restrict_to_catalog(embeddings, catalog)
    metadata = catalog.items.loc[embeddings.ids, columns]
    key = _fingerprint(embeddings, metadata)
    return get_index_class(backend)._from_embeddings(embeddings, metadata, cache_dir=Path(cache_dir), key=key, rebuild=rebuild, catalog=catalog, **config)


def embedding_cache_dir(workdir: str | os.PathLike, catalog: Catalog, embeddings: Embeddings) -> Path:
    """The catalog's folder in the vector store ``embeddings`` were loaded from (indexes are
    saved there: they hold the catalog's ids and labels, the vectors are shared)."""
    folder = embeddings.manifest.get("catalog_dir")
    if folder:
        return Path(folder)
    return Path(workdir) / "embeddings" / slugify(embeddings.model) / "catalogs" / catalog_dir(catalog)


def _restrict_to_catalog(embeddings: Embeddings, catalog: Catalog) -> Embeddings:
    ids = np.asarray(embeddings.ids, dtype=str)
    inside = catalog.items.index.get_indexer(ids) >= 0
    if inside.all():
        return embeddings
    if not inside.any():
        raise ValueError(
            f"none of the {len(ids)} cached {embeddings.model} embeddings belong to catalog {catalog.name!r}'s items"
        )
    return embeddings.restrict(ids[inside].tolist())


def _fingerprint(embeddings: Embeddings, metadata: pd.DataFrame) -> str:
    """Changes when the vectors, their ids or the filter labels change."""
    manifest = embeddings.manifest
    h = hashlib.sha256()
    h.update(json.dumps({k: manifest.get(k) for k in ("model", "key", "count", "updated", "dim", "identity")}, sort_keys=True, default=str).encode())
    h.update("\n".join(map(str, embeddings.ids)).encode())
    h.update(",".join(map(str, metadata.columns)).encode())
    h.update(pd.util.hash_pandas_object(metadata, index=True).to_numpy().tobytes())
    vectors = embeddings.vectors
    if isinstance(vectors, np.memmap) and getattr(vectors, "filename", None):
        stat = os.stat(vectors.filename)
        h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        h.update(np.ascontiguousarray(vectors).tobytes())
    return h.hexdigest()[:16]


__all__ = [
    "BackendUnavailableError",
    "IndexBackendError",
    "IndexNotFoundError",
    "IndexSettingsMismatchError",
    "SearchResult",
    "VectorIndex",
    "build_index",
    "create_index",
    "embedding_cache_dir",
    "get_index_class",
    "index_of_embeddings",
    "list_index_backends",
    "register_index",
]
