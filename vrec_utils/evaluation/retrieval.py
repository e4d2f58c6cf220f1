"""All queries at once: one model's top-k lists over the candidates, leave-one-out.

Through blocks of the exact similarity matrix (``backend="matrix"``, the default:
:func:`vrec_utils.index.exact.leave_one_out_knn`) or through the serving path,
:mod:`vrec_utils.index` (``backend="faiss"`` or any registered backend, with ``index_options``
such as ``{"ann": "hnsw"}`` to measure what approximate search costs). Exact backends give the same
lists: both end in :func:`vrec_utils.index.exact.canonical_top_k`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..index import VectorIndex, create_index
from ..index.exact import leave_one_out_knn
from .config import MATRIX


class Retriever:
    """Top-k over one model's candidate vectors: through the index layer (one index per model,
    filter column attached) or through blocks of the similarity matrix."""

    def __init__(
        self, backend: str, name: str, ids: np.ndarray, vectors: np.ndarray, metadata: pd.DataFrame | None,
        index_options: Mapping[str, Any], index: VectorIndex | None = None,
    ):
        """``index``: an index already holding these candidates (and maybe more items, e.g. the
        one ``vrec index`` saved); its searches are restricted to the candidates."""
        self.ids, self.vectors, self.metadata = ids, vectors, metadata
        self.index = index
        if index is not None:
            index.restrict_to(ids)
        elif backend != MATRIX:
            columns = list(metadata.columns) if metadata is not None else []
            self.index = create_index(backend, model=name, dim=vectors.shape[1], filter_columns=columns, **index_options)
            self.index.add(ids, vectors, metadata=metadata)

    def search(self, query_pos: np.ndarray, k: int, column: str | None) -> np.ndarray:
        """Candidate positions (n, k), -1 padded; the query is excluded, ``column`` filters."""
        if self.index is None:
            groups = pd.factorize(self.metadata[column])[0] if column else None
            return leave_one_out_knn(self.vectors, query_pos, k, groups)
        filters = None
        if column is not None:
            filters = [{column: v} for v in self.metadata[column].to_numpy(dtype=str)[query_pos]]
        result = self.index.search(self.vectors[query_pos], k, filters=filters, exclude_ids=list(self.ids[query_pos]))
        found = np.asarray(result.ids, dtype=str)
        return pd.Index(self.ids).get_indexer(found.ravel()).reshape(found.shape)


__all__ = ["Retriever"]
