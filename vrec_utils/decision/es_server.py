"""Part 2, measured on a server: each model's vectors in Elasticsearch under each ``index_options``
type (``hnsw`` float, ``int8_hnsw``, ``bbq_hnsw`` where the dimensions allow, and the mapping left
to the server's default), swept over ``num_candidates``, with and without the category filter.
Per setting: recall@k against exact search of the same vectors, nDCG@5 through the server with its
CI, the server's ``took`` and the client's wall time per query; then the paired model difference
through every setting (does the ranking survive the server?).

The rows say ``measured on Elasticsearch <version>``; beside them, on the same queries, exact
search and the emulated default quantisation of :mod:`.fidelity` (``emulated``), so the two can
be set side by side. Queries go in batched ``_msearch`` requests (the backend's search); a seeded
subset of the queries (``n_queries``) bounds the time, and the table says how many.

Indexes are the report's own: ``vrec-decision-<model>-<type>-<content key>``, the key a hash of
the ids, vectors, category values and mapping, so they cannot collide with a user's index nor
hold another catalog's vectors. They are deleted afterwards unless ``keep``; a kept index is
reused only when its recorded key and document count match (else it is rebuilt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..catalog import hash_unit_interval
from ..index.elasticsearch import SERVER_DEFAULT, ElasticsearchConfig, ElasticsearchIndex, load_es_config
from ..index.exact import neighbour_recall
from .compression import model_variants, search_variant
from .data import DecisionData
from .fidelity import _index_search, es_default_quantiser, fidelity_table

ES_INDEX_TYPES = ("hnsw", "int8_hnsw", "bbq_hnsw", SERVER_DEFAULT)
ES_NUM_CANDIDATES = (5, 10, 25, 50, 100, 500)
ES_QUERIES = 500  # queries sent to the server per setting (a seeded subset; None: all)
BBQ_MIN_DIMS = 64  # Elasticsearch refuses bbq_* below 64 dimensions
INDEX_PREFIX = "vrec-decision-"


def es_index_types(dims: int, wanted: Sequence[str] = ES_INDEX_TYPES) -> list[str]:
    """The ``wanted`` types a ``dims``-dimensional field can have (no ``bbq_*`` below 64 dims)."""
    return [t for t in wanted if not (t.startswith("bbq") and dims < BBQ_MIN_DIMS)]


def content_key(model: str, ids: np.ndarray, vectors: np.ndarray, categories: np.ndarray | None, index_type: str) -> str:
    """Hex digest of everything an index serves: model, ids, vectors, category values, mapping type."""
    digest = hashlib.sha256()
    for part in (model, index_type, "\x1f".join(map(str, ids))):
        digest.update(part.encode() + b"\x00")
    digest.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    if categories is not None:
        digest.update("\x1f".join(map(str, categories)).encode())
    return digest.hexdigest()


def decision_index_name(model: str, index_type: str, key: str) -> str:
    """``vrec-decision-<model slug>-<type>-<first 16 hex of the key>`` (a valid index name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:60] or "model"
    return f"{INDEX_PREFIX}{slug}-{index_type.replace('_', '-')}-{key[:16]}"


def sampled(data: DecisionData, n_queries: int | None) -> DecisionData:
    """``data`` with a seeded subset of ``n_queries`` of its queries (all of them when fewer)."""
    if n_queries is None or data.n_queries <= n_queries:
        return data
    keys = hash_unit_interval(data.ids[data.query_pos], f"decision-es-queries-{data.seed}")
    return dataclasses.replace(data, query_pos=np.sort(data.query_pos[np.argsort(keys, kind="stable")[:n_queries]]))


def open_index(data: DecisionData, model: str, index_type: str, config: ElasticsearchConfig, client=None) -> tuple[ElasticsearchIndex, float]:
    """The report's index of ``model`` under ``index_type``, reused when its content key and count
    match, else (re)built from the vectors; the seconds spent building (0 when reused)."""
    x = data.vectors[model]
    column = data.category_column
    meta = data.catalog.items.loc[data.ids, [column]].astype(str) if column else None
    key = content_key(model, data.ids, x, meta[column].to_numpy() if column else None, index_type)
    options = {"config": config, "client": client, "index_name": decision_index_name(model, index_type, key), "index_type": index_type}
    index = ElasticsearchIndex(model, x.shape[1], [column] if column else None, **options)
    if index.holds(key, len(data.ids)):
        index.rank_ties_by(data.ids)
        return index, 0.0
    if len(index):  # a partial or stale build under our name: start again
        index.drop()
        index = ElasticsearchIndex(model, x.shape[1], [column] if column else None, **options)
    start = time.perf_counter()
    index.add(data.ids, x, metadata=meta)
    index.record_content(key)
    index.rank_ties_by(data.ids)
    return index, time.perf_counter() - start


def served_type(options: dict) -> str:
    """``bbq_hnsw + rescore x3``-style description of the server's ``index_options``."""
    kind = str(options.get("type", "?"))
    rescore = (options.get("rescore_vector") or {}).get("oversample")
    return f"{kind} + rescore x{rescore:g}" if rescore else kind


def server_rows(data: DecisionData, index_types: Sequence[str] = ES_INDEX_TYPES, num_candidates: Sequence[int] = ES_NUM_CANDIDATES,
                config: ElasticsearchConfig | None = None, client=None, keep: bool = False) -> tuple[dict, dict, list[dict]]:
    """Per-query values, dims and records of the exact, emulated and measured rows (``data`` is
    the query sample already). Every index the run creates is deleted unless ``keep``."""
    config = config or load_es_config()
    k, values, dims, records = data.k, {}, {}, []
    filters = [False, True] if data.category_column else [False]
    version = None
    for model in data.models:
        x = data.vectors[model]
        exact = {f: data.search(x, x, k, filtered=f) for f in filters}
        kind = es_default_quantiser(x.shape[1])
        emulated = next(v for v in model_variants(data, model, pca_dims=(), quantisers=(kind,)) if v.name == kind)
        for f in filters:
            tag = " +filter" if f else ""
            emulated_found = search_variant(data, emulated, filtered=f)
            for setting, found, source in ((f"exact{tag}", exact[f], "exact (numpy)"), (f"es-default emulated{tag}", emulated_found, "emulated")):
                values[(model, setting)], dims[(model, setting)] = data.score(found), x.shape[1]
                records.append({"model": model, "setting": setting, "source": source, "index_type": "exact" if setting.startswith("exact") else
                                f"{'bbq' if kind != 'int8' else 'int8'} emulated", "num_candidates": np.nan, "filtered": f,
                                f"recall@{k}": neighbour_recall(found, exact[f]).mean()})
        for index_type in es_index_types(x.shape[1], index_types):
            index, build_s = open_index(data, model, index_type, config, client)
            try:
                version = version or index.server_version()
                served = served_type(index.served_index_options())
                label = f"default={served}" if index_type == SERVER_DEFAULT else served
                for f in filters:
                    tag = " +filter" if f else ""
                    for nc in (n for n in num_candidates if n >= k):
                        found, wall_ms = _index_search(data, index, x, k, f, num_candidates=int(nc))
                        setting = f"es {index_type} nc={nc}{tag}"
                        values[(model, setting)], dims[(model, setting)] = data.score(found), x.shape[1]
                        records.append({"model": model, "setting": setting, "source": f"measured on Elasticsearch {version}",
                                        "index_type": label, "num_candidates": nc, "filtered": f,
                                        f"recall@{k}": neighbour_recall(found, exact[f]).mean(),
                                        "took_ms_per_query": float(np.mean(index.last_took_ms)), "wall_ms_per_query": wall_ms,
                                        "build_s": round(build_s, 1), "index_name": index.index_name})
            finally:
                if not keep:
                    index.drop()
    return values, dims, records


def server_table(data: DecisionData, records: list[dict], result, n_all: int, metric: str = "ndcg@5") -> pd.DataFrame:
    """The records with nDCG@5 and its CI, and how many queries (of how many) were sent."""
    frame = fidelity_table(data, records, result, metric)
    frame["n_queries"] = data.n_queries
    frame["queries"] = f"all {n_all} queries" if data.n_queries == n_all else f"{data.n_queries} of {n_all} queries, drawn with seed {data.seed}"
    return frame


__all__ = [
    "BBQ_MIN_DIMS", "ES_INDEX_TYPES", "ES_NUM_CANDIDATES", "ES_QUERIES", "INDEX_PREFIX", "content_key", "decision_index_name",
    "es_index_types", "open_index", "sampled", "served_type", "server_rows", "server_table",
]
