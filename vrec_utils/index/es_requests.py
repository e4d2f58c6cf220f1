"""Elasticsearch request bodies, built by pure functions the tests check exactly (mappings, kNN
queries, bulk actions), and the report of a bulk run."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .base import IndexBackendError

MAX_KNN = 10_000  # Elasticsearch's limit on k and num_candidates
MAX_DIMS = 4096
INDEX_TYPES = ("hnsw", "int8_hnsw", "int4_hnsw", "bbq_hnsw", "flat", "int8_flat", "int4_flat", "bbq_flat")
SERVER_DEFAULT = "default"  # no index_options in the mapping: the server chooses (9.1+: bbq_hnsw from 384 dims, else int8_hnsw)
_FIELD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESERVED_FIELDS = ("item_id",)


class BulkIndexError(IndexBackendError, RuntimeError):
    """Some documents were not indexed; ``report`` lists them. Re-running indexes only those missing."""

    def __init__(self, report: "BulkReport", action: str = "index") -> None:
        self.report = report
        super().__init__(f"{action}: {report.summary()}")


def vector_field(model: str) -> str:
    """The document field that holds ``model``'s vectors: ``emb_`` + a lowercase slug."""
    slug = re.sub(r"[^a-z0-9]+", "_", model.lower()).strip("_")
    if not slug:
        raise ValueError(f"cannot make a field name from model {model!r}")
    return f"emb_{slug}"[:200]


def dense_vector_mapping(dims: int, *, index_type: str = "hnsw", m: int = 16, ef_construction: int = 100) -> dict[str, Any]:
    """A ``dense_vector`` field with cosine similarity and explicit ``index_options``.

    ``index_type`` is set explicitly because Elasticsearch 9.1+ otherwise quantizes vectors of 384+
    dimensions with BBQ, which changes the results; ``hnsw`` (default) keeps float32 vectors,
    ``flat`` searches exhaustively (exact). ``index_type="default"`` leaves ``index_options`` out,
    so that the server applies its own default (what a user who sets nothing gets)."""
    if index_type not in INDEX_TYPES + (SERVER_DEFAULT,):
        raise ValueError(f"index_type must be one of {', '.join(INDEX_TYPES + (SERVER_DEFAULT,))}, got {index_type!r}")
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or not 1 <= dims <= MAX_DIMS:
        raise ValueError(f"Elasticsearch dense_vector fields hold 1..{MAX_DIMS} dimensions, got {dims!r}")
    mapping: dict[str, Any] = {"type": "dense_vector", "dims": int(dims), "element_type": "float", "index": True, "similarity": "cosine"}
    if index_type == SERVER_DEFAULT:
        return mapping
    options: dict[str, Any] = {"type": index_type}
    if index_type.endswith("hnsw"):
        options.update(m=int(m), ef_construction=int(ef_construction))
    return {**mapping, "index_options": options}


def index_mapping(
    vector_fields: Mapping[str, Mapping[str, Any]],
    label_columns: Sequence[str] = (),
    *,
    models: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The index mapping: ``item_id`` and each label column as ``keyword``, one vector field per
    model (``vector_fields``: field -> :func:`dense_vector_mapping`). ``dynamic: strict`` makes a
    stray field an error instead of a silently mapped one."""
    properties: dict[str, Any] = {"item_id": {"type": "keyword"}}
    for column in label_columns:
        properties[check_label_field(column)] = {"type": "keyword"}
    properties.update({name: dict(spec) for name, spec in vector_fields.items()})
    return {
        "dynamic": "strict",
        "_meta": {"vrec": {"models": dict(models or {}), "label_columns": list(label_columns)}},
        "properties": properties,
    }


def mapping_differences(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """What the vector field mapping on the server (``existing``) has other than ``wanted``: the
    similarity and each ``index_options`` setting vrec sets (defaults the server adds, such as
    ``rescore_vector``, are not compared). Empty when they agree."""
    out = []
    if existing.get("similarity", "cosine") != wanted.get("similarity"):
        out.append(f"similarity {existing.get('similarity')!r} (not {wanted.get('similarity')!r})")
    if existing.get("element_type", "float") != wanted.get("element_type", "float"):
        out.append(f"element_type {existing.get('element_type')!r} (not {wanted.get('element_type')!r})")
    have = existing.get("index_options") or {}
    for key, value in (wanted.get("index_options") or {}).items():
        if have.get(key) != value:
            out.append(f"index_options.{key} {have.get(key)!r} (not {value!r})")
    return out


def check_label_field(column: str) -> str:
    if not _FIELD_NAME.match(column) or column in RESERVED_FIELDS or column.startswith("emb_"):
        raise ValueError(
            f"label column {column!r} cannot be an Elasticsearch field here: use letters, digits, '_' or '-' "
            f"(no dots), not {', '.join(RESERVED_FIELDS)} or emb_*"
        )
    return column


def bulk_upsert_actions(
    index_name: str,
    vector_field_name: str,
    ids: Sequence[str],
    vectors: np.ndarray,
    metadata: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[dict[str, Any]]:
    """``update`` + ``doc_as_upsert`` actions: the document id is the item id, so a re-run
    overwrites instead of duplicating, and other models' vectors in the same document are kept."""
    metadata = metadata or {}
    for row, item_id in enumerate(ids):
        doc: dict[str, Any] = {"item_id": str(item_id)}
        for column, values in metadata.items():
            doc[column] = str(values[row])
        doc[vector_field_name] = np.asarray(vectors[row], dtype=np.float32).tolist()
        yield {"_op_type": "update", "_index": index_name, "_id": str(item_id), "doc": doc, "doc_as_upsert": True}


def bulk_remove_vector_actions(index_name: str, vector_field_name: str, ids: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Remove one model's vector from documents (other models' vectors and the labels stay): a
    partial update setting the field to null, which indexes no vector. No script, so it also works
    where scripting is off or the painless module is absent (Elastic's integration-test build)."""
    for item_id in ids:
        yield {"_op_type": "update", "_index": index_name, "_id": str(item_id), "doc": {vector_field_name: None}}


def knn_query(
    vector_field_name: str,
    vector: Sequence[float] | np.ndarray,
    k: int,
    num_candidates: int,
    *,
    filter: Mapping[str, str] | None = None,
    exclude_id: str | None = None,
) -> dict[str, Any]:
    """The ``knn`` clause. ``filter`` (column -> value, e.g. the query item's ``articleType``: the
    article's ``apply_filter``) and ``exclude_id`` (the query item) go in the kNN ``filter``, which
    Elasticsearch applies during the search, so k results still come back."""
    check_knn_sizes(k, num_candidates)
    knn: dict[str, Any] = {
        "field": vector_field_name,
        "query_vector": np.asarray(vector, dtype=np.float32).tolist(),
        "k": int(k),
        "num_candidates": int(num_candidates),
    }
    clauses: dict[str, Any] = {}
    if filter:
        clauses["filter"] = [{"term": {column: str(value)}} for column, value in sorted(filter.items())]
    if exclude_id is not None:
        clauses["must_not"] = [{"ids": {"values": [str(exclude_id)]}}]
    if clauses:
        knn["filter"] = {"bool": clauses}
    return knn


def knn_search_body(
    vector_field_name: str,
    vector: Sequence[float] | np.ndarray,
    k: int,
    num_candidates: int,
    *,
    filter: Mapping[str, str] | None = None,
    exclude_id: str | None = None,
) -> dict[str, Any]:
    """A ``_search`` body returning the k nearest item ids and scores (no ``_source``)."""
    return {
        "knn": knn_query(vector_field_name, vector, k, num_candidates, filter=filter, exclude_id=exclude_id),
        "size": int(k),
        "_source": False,
        "track_total_hits": False,
    }


def check_knn_sizes(k: int, num_candidates: int) -> None:
    if k > MAX_KNN:
        raise ValueError(f"k={k} is over Elasticsearch's limit of {MAX_KNN:,} nearest neighbours per query")
    if num_candidates > MAX_KNN:
        raise ValueError(
            f"num_candidates={num_candidates} is over Elasticsearch's limit of {MAX_KNN:,}; lower it (it must be >= k)"
        )
    if num_candidates < k:
        raise ValueError(f"num_candidates={num_candidates} must be >= k={k}")


def default_num_candidates(k: int) -> int:
    """Candidates per shard: 10 x k (at least 100), capped at Elasticsearch's 10,000."""
    return min(MAX_KNN, max(100, 10 * k))


def ids_with_vector_body(vector_field_name: str, ids: Sequence[str]) -> dict[str, Any]:
    """Which of ``ids`` already have this model's vector (used by backfills and deletes)."""
    return {
        "query": {"bool": {"filter": [{"ids": {"values": [str(i) for i in ids]}}, {"exists": {"field": vector_field_name}}]}},
        "size": len(ids),
        "_source": False,
        "track_total_hits": False,
    }


# ---------------------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class FailedDocument:
    id: str
    status: int
    error: str


@dataclass(frozen=True)
class BulkReport:
    """Outcome of a bulk run: how many documents succeeded and which failed, with why."""

    n_ok: int = 0
    failed: tuple[FailedDocument, ...] = ()
    n_skipped: int = 0  # already indexed (backfill)

    def summary(self) -> str:
        text = f"{self.n_ok} document(s) indexed"
        if self.n_skipped:
            text += f", {self.n_skipped} already had the vector"
        if self.failed:
            first = "; ".join(f"{f.id}: {f.status} {f.error}" for f in self.failed[:3])
            text += f", {len(self.failed)} failed (e.g. {first}); re-run to retry only the missing ones"
        return text

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([vars(f) for f in self.failed], columns=["id", "status", "error"])


def _failed_document(item: Mapping[str, Any]) -> FailedDocument:
    (_, info), = item.items()
    error = info.get("error", "")
    if isinstance(error, Mapping):
        error = f"{error.get('type', '')}: {error.get('reason', '')}".strip(": ")
    return FailedDocument(str(info.get("_id", "")), int(info.get("status", 0) or 0), str(error)[:300])

