"""Elasticsearch backend: one ``dense_vector`` field per model in a shared items index.

Documents are keyed by item id (``_id``), hold ``item_id``, the catalog's label columns as
``keyword`` fields (filters) and one ``emb_<model-slug>`` vector per model, so several models
live side by side and re-runs are idempotent. Request bodies are built by pure functions in
:mod:`.es_requests` (:func:`index_mapping`, :func:`bulk_upsert_actions`, :func:`knn_query`, ...)
that the tests check exactly; settings, the client and error messages are in :mod:`.es_config`
(the official ``elasticsearch`` client, 8.x/9.x, is imported only when a client is made). This
module holds the backend, :class:`ElasticsearchIndex`, and exports all of them.

Connection settings come from an explicit config file (JSON or TOML), else environment variables,
never from code::

    VREC_ES_URL            http(s)://host:9200 (default http://localhost:9200)
    VREC_ES_API_KEY        API key (base64 "id:key" as Kibana shows it), or
    VREC_ES_USER / VREC_ES_PASSWORD   basic auth
    VREC_ES_CA_CERTS       CA bundle for https (self-signed clusters)
    VREC_ES_VERIFY_CERTS   true/false (default true)
    VREC_ES_INDEX          index name (default vrec-<catalog> from build_index, else vrec-items)

Scores: Elasticsearch returns ``(1 + cosine) / 2`` for ``similarity: cosine``; results are
converted back to cosine so they compare with FAISS, and hits are ordered by the project's tie
rule (score descending, then catalog row ascending).

Failures users fix come out as :class:`~vrec_utils.index.base.IndexBackendError` subclasses with
one line naming the URL (``user:password@`` removed) and the way out: unreachable, not ready (503)
or credentials refused (401) -> ``BackendUnavailableError``; no such index (404) ->
``IndexNotFoundError``; an existing vector field with another similarity or ``index_options`` ->
``IndexSettingsMismatchError``; rejected documents -> :class:`BulkIndexError`.
"""

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .base import IndexSettingsMismatchError, VectorIndex, _check_ids, register_index
from .es_config import (
    DEFAULT_INDEX,
    DEFAULT_URL,
    ENV_VARS,
    START_HINT,
    ElasticsearchConfig,
    _checked,
    _error_parts,
    _raise_api_error,
    check_index_name,
    connect,
    default_index_name,
    load_es_config,
    without_credentials,
)
from .es_requests import (
    INDEX_TYPES,
    MAX_DIMS,
    MAX_KNN,
    RESERVED_FIELDS,
    SERVER_DEFAULT,
    BulkIndexError,
    BulkReport,
    FailedDocument,
    _failed_document,
    bulk_remove_vector_actions,
    bulk_upsert_actions,
    check_knn_sizes,
    check_label_field,
    default_num_candidates,
    dense_vector_mapping,
    ids_with_vector_body,
    index_mapping,
    knn_query,
    knn_search_body,
    mapping_differences,
    vector_field,
)


@register_index("elasticsearch")
class ElasticsearchIndex(VectorIndex):
    """Elasticsearch dense_vector kNN; server from VREC_ES_URL or a config file."""

    supports_filters = True
    max_k = MAX_KNN
    search_options = ("num_candidates",)

    def __init__(
        self,
        model: str,
        dim: int,
        filter_columns: Sequence[str] | None = None,
        *,
        client: Any = None,
        config: ElasticsearchConfig | None = None,
        config_file: str | os.PathLike | None = None,
        index_name: str | None = None,
        index_type: str = "hnsw",
        hnsw_m: int = 16,
        ef_construction: int = 100,
        num_candidates: int | None = None,
        chunk_size: int = 200,
        max_chunk_bytes: int = 20 * 1024 * 1024,
        bulk_retries: int = 3,
        bulk_backoff: float = 1.0,
        msearch_batch: int = 64,
        refresh: bool = True,
        create: bool = True,
    ) -> None:
        """``create=False`` opens an existing index only (:class:`IndexNotFoundError` if the server
        has none of that name) instead of creating it."""
        super().__init__(model, dim, filter_columns)
        for column in self.filter_columns:
            check_label_field(column)
        self.config = config or load_es_config(config_file)
        self.index_name = check_index_name(index_name or self.config.index or DEFAULT_INDEX)
        self.field = vector_field(model)
        self.vector_mapping = dense_vector_mapping(self.dim, index_type=index_type, m=hnsw_m, ef_construction=ef_construction)
        if num_candidates is not None:
            check_knn_sizes(1, int(num_candidates))
        self.num_candidates = None if num_candidates is None else int(num_candidates)
        self.chunk_size = int(chunk_size)
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.bulk_retries = int(bulk_retries)
        self.bulk_backoff = float(bulk_backoff)
        self.msearch_batch = int(msearch_batch)
        self.refresh = refresh
        self.client = client if client is not None else connect(self.config)
        self.last_report: BulkReport | None = None
        #: the server's ``took`` (ms) of each query of the last :meth:`search`
        self.last_took_ms: list[int] = []
        #: item id -> catalog row (insertion order), for the tie rule of search results
        self._rows: dict[str, int] = {}
        self._fingerprint: str | None = None
        self._ensure_index(create)

    # -- mapping ----------------------------------------------------------------------------------
    def _call(self, fn, *args, **kwargs):
        return _checked(lambda: fn(*args, **kwargs), self.config.url, self.index_name)

    def _ensure_index(self, create: bool = True) -> None:
        """Create the index, or add this model's vector field / new label fields to it; refuse a
        field of another dimension, model, similarity or ``index_options``."""
        from elasticsearch import BadRequestError

        indices = self.client.indices
        if not self._call(indices.exists, index=self.index_name):
            if not create:
                _raise_api_error(404, "index_not_found_exception", f"no such index [{self.index_name}]", self.config.url, self.index_name)
            mapping = index_mapping({self.field: self.vector_mapping}, self.filter_columns, models={self.field: self.model})
            try:
                self._call(indices.create, index=self.index_name, mappings=mapping)
                return
            except BadRequestError as exc:  # created meanwhile by another process
                if "resource_already_exists" not in str(exc):
                    raise
        current = self._call(indices.get_mapping, index=self.index_name)
        mapping = next(iter(current.body.values()))["mappings"]
        properties = mapping.get("properties", {})
        meta = mapping.get("_meta", {}).get("vrec", {})
        models = dict(meta.get("models", {}))
        labels = list(meta.get("label_columns", []))
        if self.field in properties:
            existing = properties[self.field]
            if existing.get("type") != "dense_vector":
                raise ValueError(f"field {self.field!r} of index {self.index_name!r} is a {existing.get('type')}, not a dense_vector")
            if int(existing.get("dims", self.dim)) != self.dim:
                raise ValueError(
                    f"dimension mismatch: index {self.index_name!r} holds {existing.get('dims')}-d vectors in "
                    f"{self.field!r} but model {self.model!r} makes {self.dim}-d ones; use another index name "
                    "(VREC_ES_INDEX) or delete the index"
                )
            if models.get(self.field, self.model) != self.model:
                raise ValueError(f"field {self.field!r} of {self.index_name!r} belongs to model {models[self.field]!r}")
            differences = mapping_differences(existing, self.vector_mapping)
            if differences:
                raise IndexSettingsMismatchError(
                    f"index {self.index_name!r} already holds {self.model!r} vectors in {self.field!r} with "
                    f"{'; '.join(differences)}; Elasticsearch cannot change them in place: ask for the existing "
                    "settings (e.g. --es-index-type), use another index name (VREC_ES_INDEX, --es-index) "
                    "or delete the index to rebuild it"
                )
        new_properties: dict[str, Any] = {}
        if self.field not in properties:
            new_properties[self.field] = self.vector_mapping
        for column in self.filter_columns:
            if column in properties:
                if properties[column].get("type") != "keyword":
                    raise ValueError(f"field {column!r} of {self.index_name!r} is not a keyword field; it cannot be a filter")
            else:
                new_properties[column] = {"type": "keyword"}
        if not self.filter_columns:
            self.filter_columns = tuple(labels)
        if new_properties or models.get(self.field) != self.model or set(self.filter_columns) - set(labels):
            models[self.field] = self.model
            labels += [c for c in self.filter_columns if c not in labels]
            self._call(
                indices.put_mapping,
                index=self.index_name,
                properties=new_properties,
                meta={"vrec": {**meta, "models": models, "label_columns": labels}},
            )
        self._fingerprint = (meta.get("fingerprints") or {}).get(self.field)

    def holds(self, key: str, count: int) -> bool:
        """Whether this field was last fully indexed from content ``key`` (see :meth:`record_content`)
        and the index holds ``count`` documents: then it can be served without a per-id check."""
        return self._fingerprint == key and len(self) == count

    def rank_ties_by(self, ids) -> None:
        """Break equal-score ties in the order of ``ids`` (catalogue order, as exact search does)."""
        self._rows = {item_id: row for row, item_id in enumerate(np.asarray(ids, dtype=str).tolist())}

    def record_content(self, key: str) -> None:
        """Remember in the mapping's ``_meta`` which embeddings this field was last fully indexed
        from, so that the next build from the same embeddings skips the per-id check (:meth:`holds`)."""
        current = self._call(self.client.indices.get_mapping, index=self.index_name)
        meta = dict(next(iter(current.body.values()))["mappings"].get("_meta", {}).get("vrec", {}))
        meta["fingerprints"] = {**(meta.get("fingerprints") or {}), self.field: key}
        self._call(self.client.indices.put_mapping, index=self.index_name, meta={"vrec": meta})
        self._fingerprint = key

    # -- hooks: add / delete / count --------------------------------------------------------------
    def index_documents(self, ids, vectors: np.ndarray, metadata: pd.DataFrame | None = None) -> BulkReport:
        """Upsert documents and report failures instead of raising (validated like :meth:`add`)."""
        id_array = _check_ids(ids, what="ids", unique=True)
        matrix = self._check_vectors(vectors, len(id_array), id_array)
        meta = self._check_metadata(metadata, id_array)
        return self._bulk_upsert(id_array, matrix, meta)

    def _add(self, ids, vectors, metadata) -> None:
        report = self._bulk_upsert(ids, vectors, metadata)
        for item_id in ids.tolist():
            self._rows.setdefault(item_id, len(self._rows))
        if report.failed:
            raise BulkIndexError(report)

    def _bulk_upsert(self, ids, vectors, metadata) -> BulkReport:
        actions = bulk_upsert_actions(self.index_name, self.field, ids, vectors, metadata)
        report = self._run_bulk(actions)
        self.last_report = report
        return report

    def _run_bulk(self, actions: Iterable[dict[str, Any]]) -> BulkReport:
        from elasticsearch import helpers

        n_ok, failed = 0, []

        def run() -> None:
            nonlocal n_ok
            for ok, item in helpers.streaming_bulk(
                self.client,
                actions,
                chunk_size=self.chunk_size,
                max_chunk_bytes=self.max_chunk_bytes,
                max_retries=self.bulk_retries,  # 429 (busy) answers are retried with backoff
                initial_backoff=self.bulk_backoff,
                max_backoff=30,
                raise_on_error=False,
            ):
                if ok:
                    n_ok += 1
                else:
                    failed.append(_failed_document(item))

        self._call(run)
        if self.refresh:
            self._call(self.client.indices.refresh, index=self.index_name)
        return BulkReport(n_ok, tuple(failed))

    def _delete(self, ids: np.ndarray) -> None:
        have = self.ids_with_vector(ids)
        missing = [i for i in ids.tolist() if i not in have]
        if missing:
            raise KeyError(
                f"{len(missing)} id(s) have no {self.model} vector in index {self.index_name!r}, e.g. "
                f"{missing[:5]}; nothing was deleted"
            )
        report = self._run_bulk(bulk_remove_vector_actions(self.index_name, self.field, ids))
        if report.failed:
            raise BulkIndexError(report, action="delete")

    def ids_with_vector(self, ids: Sequence[str], batch: int = 1000) -> set[str]:
        """The subset of ``ids`` whose documents hold this model's vector."""
        found: set[str] = set()
        ids = [str(i) for i in ids]
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            response = self._call(self.client.search, index=self.index_name, **ids_with_vector_body(self.field, chunk))
            found.update(hit["_id"] for hit in response["hits"]["hits"])
        return found

    def _count(self) -> int:
        response = self._call(self.client.count, index=self.index_name, query={"exists": {"field": self.field}})
        return int(response["count"])

    # -- hooks: search -----------------------------------------------------------------------------
    def _search(self, queries, k, filters, exclude_ids, *, num_candidates=None):
        if num_candidates is None and self.num_candidates is None:
            candidates = default_num_candidates(k)
        else:
            candidates = int(num_candidates if num_candidates is not None else self.num_candidates)
            check_knn_sizes(k, candidates)
        n = len(queries)
        ids = np.full((n, k), "", dtype=object)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        self.last_took_ms = []
        for start in range(0, n, self.msearch_batch):
            rows = range(start, min(n, start + self.msearch_batch))
            searches: list[dict[str, Any]] = []
            for row in rows:
                searches.append({"index": self.index_name})
                searches.append(
                    knn_search_body(
                        self.field, queries[row], k, candidates,
                        filter=filters[row] if filters is not None else None,
                        exclude_id=exclude_ids[row] if exclude_ids is not None else None,
                    )
                )
            response = self._call(self.client.msearch, searches=searches)
            for row, answer in zip(rows, response["responses"]):
                if "error" in answer:
                    kind, reason = _error_parts(answer)
                    _raise_api_error(int(answer.get("status", 0) or 0), kind, reason, self.config.url, self.index_name)
                    raise ValueError(f"Elasticsearch rejected the kNN query for query {row}: {reason}")
                self.last_took_ms.append(int(answer.get("took", -1)))
                hits = self._tie_sorted(answer["hits"]["hits"][:k])
                ids[row, : len(hits)] = [hit["_id"] for hit in hits]
                scores[row, : len(hits)] = [2.0 * float(hit["_score"]) - 1.0 for hit in hits]
        return ids.astype(str), scores

    def _tie_sorted(self, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The project's order: score descending, then catalog row ascending (items without a known
        row, e.g. in an index reopened from disk, after those with one, by id)."""
        unknown = len(self._rows)
        return sorted(hits, key=lambda h: (-float(h["_score"]), self._rows.get(h["_id"], unknown), h["_id"]))

    # -- what the server runs -----------------------------------------------------------------------
    def served_index_options(self) -> dict[str, Any]:
        """The ``index_options`` the server applies to this field, its defaults included (what
        ``index_type="default"`` resolved to, e.g. ``bbq_hnsw`` with a ``rescore_vector``)."""
        answer = self._call(self.client.indices.get_field_mapping, index=self.index_name, fields=self.field, include_defaults=True)
        entry = next(iter(answer.body.values()))["mappings"][self.field]["mapping"]
        return dict(next(iter(entry.values())).get("index_options") or {})

    def server_version(self) -> str:
        """The server's version number (``GET /``, else the nodes' info on servers without it)."""
        from elasticsearch import ApiError

        try:
            return str(self.client.info()["version"]["number"])
        except ApiError:
            nodes = self._call(self.client.nodes.info, filter_path="nodes.*.version")
            return min(str(node["version"]) for node in nodes["nodes"].values())

    def drop(self) -> None:
        """Delete the whole index on the server (every model's vectors in it)."""
        self._call(self.client.indices.delete, index=self.index_name, ignore_unavailable=True)

    # -- persistence -------------------------------------------------------------------------------
    def _save(self, directory: Path) -> dict[str, Any]:
        # The data lives on the server; the folder records where (never the credentials).
        return {
            "url": self.config.url,
            "index_name": self.index_name,
            "field": self.field,
            "index_options": self.vector_mapping.get("index_options", {"type": SERVER_DEFAULT}),
            "num_candidates": self.num_candidates,
        }

    @classmethod
    def _load(cls, directory: Path, saved: dict[str, Any], *, client=None, config_file=None, **options):
        es_config = options.pop("config", None) or load_es_config(config_file, defaults={"url": saved["url"]})
        index_options = dict(saved.get("index_options", {}))
        return cls(
            saved["model"],
            int(saved["dim"]),
            saved.get("filter_columns") or None,
            client=client,
            config=es_config,
            index_name=options.pop("index_name", saved["index_name"]),
            index_type=index_options.get("type", "hnsw"),
            hnsw_m=index_options.get("m", 16),
            ef_construction=index_options.get("ef_construction", 100),
            num_candidates=options.pop("num_candidates", saved.get("num_candidates")),
            create=options.pop("create", False),
            **options,
        )

    def _describe(self) -> dict[str, Any]:
        return {
            "url": self.config.url,
            "index_name": self.index_name,
            "field": self.field,
            "index_options": self.vector_mapping.get("index_options", {"type": SERVER_DEFAULT}),
            "num_candidates": self.num_candidates or "10 x k (>= 100)",
        }

    # -- build_index support -----------------------------------------------------------------------
    @classmethod
    def _from_embeddings(cls, embeddings, metadata, *, cache_dir, key, rebuild, catalog=None, **config):
        """Create/extend the index, then index only the items lacking this model's vector (all of
        them with ``rebuild``). Raises :class:`BulkIndexError` after the run if some failed."""
        if "index_name" not in config or config["index_name"] is None:
            es_config = config.get("config") or load_es_config(config.get("config_file"))
            config["index_name"] = es_config.index or default_index_name(catalog.name if catalog is not None else None)
        index = cls(embeddings.model, embeddings.dim, filter_columns=list(metadata.columns), **config)
        ids = np.asarray(embeddings.ids, dtype=str)
        index.rank_ties_by(ids)
        if not rebuild and index.holds(key, len(ids)):
            # the same embeddings and labels were fully indexed before: one count, no per-id check
            report = BulkReport(0, (), n_skipped=len(ids))
            index.last_report = report
            index.info = {"fingerprint": key, "index_name": index.index_name, "backfill": report.summary()}
            return index
        have = set() if rebuild else index.ids_with_vector(ids)
        todo = np.flatnonzero(~np.isin(ids, list(have))) if have else np.arange(len(ids))
        report = BulkReport()
        if len(todo):
            report = index.index_documents(ids[todo], np.asarray(embeddings.vectors[todo]), metadata.iloc[todo])
        report = BulkReport(report.n_ok, report.failed, n_skipped=len(ids) - len(todo))
        index.last_report = report
        index.info = {"fingerprint": key, "index_name": index.index_name, "backfill": report.summary()}
        if report.failed:
            raise BulkIndexError(report, action=f"indexing {embeddings.model} into {index.index_name}")
        index.record_content(key)
        return index


__all__ = [
    "DEFAULT_INDEX",
    "DEFAULT_URL",
    "ENV_VARS",
    "INDEX_TYPES",
    "MAX_DIMS",
    "MAX_KNN",
    "RESERVED_FIELDS",
    "SERVER_DEFAULT",
    "START_HINT",
    "BulkIndexError",
    "BulkReport",
    "ElasticsearchConfig",
    "ElasticsearchIndex",
    "FailedDocument",
    "bulk_remove_vector_actions",
    "bulk_upsert_actions",
    "check_index_name",
    "check_knn_sizes",
    "check_label_field",
    "connect",
    "default_index_name",
    "default_num_candidates",
    "dense_vector_mapping",
    "ids_with_vector_body",
    "index_mapping",
    "knn_query",
    "knn_search_body",
    "load_es_config",
    "mapping_differences",
    "vector_field",
    "without_credentials",
]
