"""Elasticsearch backend: one ``dense_vector`` field per model in a shared items index.

Documents are keyed by item id (``_id``), hold ``item_id``, the catalog's label columns as
``keyword`` fields (filters) and one ``emb_<model-slug>`` vector per model, so several models
live side by side and re-runs are idempotent. Request bodies are built by pure functions
(:func:`index_mapping`, :func:`bulk_upsert_actions`, :func:`knn_query`, ...) that the tests
check exactly; the official ``elasticsearch`` client (8.x/9.x) is imported only when a client is
made.

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

from __future__ import annotations

import json
import logging
import os
import re
import stat
import tomllib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import pandas as pd

from ..redact import redact_url
from .base import (
    BackendUnavailableError,
    IndexBackendError,
    IndexNotFoundError,
    IndexSettingsMismatchError,
    VectorIndex,
    _check_ids,
    register_index,
)

DEFAULT_URL = "http://localhost:9200"
DEFAULT_INDEX = "vrec-items"
MAX_KNN = 10_000  # Elasticsearch's limit on k and num_candidates
MAX_DIMS = 4096
INDEX_TYPES = ("hnsw", "int8_hnsw", "int4_hnsw", "bbq_hnsw", "flat", "int8_flat", "int4_flat", "bbq_flat")
ENV_VARS = {
    "url": "VREC_ES_URL",
    "api_key": "VREC_ES_API_KEY",
    "username": "VREC_ES_USER",
    "password": "VREC_ES_PASSWORD",
    "ca_certs": "VREC_ES_CA_CERTS",
    "verify_certs": "VREC_ES_VERIFY_CERTS",
    "index": "VREC_ES_INDEX",
}
START_HINT = (
    "set VREC_ES_URL to your server's address, or start a local one with "
    "`docker compose up -d elasticsearch` (docker-compose.yml at the repository root) "
    "or `bash scripts/es-test-node.sh start`"
)
_INDEX_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,254}$")
_FIELD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESERVED_FIELDS = ("item_id",)


class BulkIndexError(IndexBackendError, RuntimeError):
    """Some documents were not indexed; ``report`` lists them. Re-running indexes only those missing."""

    def __init__(self, report: "BulkReport", action: str = "index") -> None:
        self.report = report
        super().__init__(f"{action}: {report.summary()}")


# ---------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ElasticsearchConfig:
    """Where and how to connect. Secrets are kept out of ``repr``."""

    url: str = DEFAULT_URL
    index: str | None = None
    api_key: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_certs: str | None = None
    verify_certs: bool = True
    request_timeout: float = 30.0
    #: timeout of the first contact: an unreachable server is reported fast
    ping_timeout: float = 3.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^\s/]+", self.url or ""):
            raise ValueError(f"Elasticsearch URL must look like http(s)://host:9200, got {redact_url(self.url or '')!r} (VREC_ES_URL)")
        parts = urlsplit(self.url)
        if parts.username is not None or parts.password is not None:
            # user:password@ in the URL becomes basic auth; the URL kept (and shown) has none
            if self.username or self.password or self.api_key:
                raise ValueError(
                    f"credentials in VREC_ES_URL ({redact_url(self.url)}) and in VREC_ES_USER/VREC_ES_PASSWORD/"
                    "VREC_ES_API_KEY: give them one way"
                )
            object.__setattr__(self, "username", unquote(parts.username or ""))
            object.__setattr__(self, "password", unquote(parts.password or ""))
            object.__setattr__(self, "url", without_credentials(self.url))
        if self.api_key and (self.username or self.password):
            raise ValueError("set either an API key (VREC_ES_API_KEY) or basic auth (VREC_ES_USER/VREC_ES_PASSWORD), not both")
        if bool(self.username) != bool(self.password):
            raise ValueError("basic auth needs both VREC_ES_USER and VREC_ES_PASSWORD")
        if self.ca_certs and not Path(self.ca_certs).expanduser().is_file():
            raise ValueError(f"CA certificate file {self.ca_certs!r} does not exist (VREC_ES_CA_CERTS)")
        if self.index is not None:
            check_index_name(self.index)
        for name in ("request_timeout", "ping_timeout"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0")

    @property
    def auth(self) -> str:
        return "api_key" if self.api_key else "basic" if self.username else "none"


def without_credentials(url: str) -> str:
    """``url`` without its ``user:password@`` part: the address the client connects to once the
    credentials have moved into ``username``/``password`` (messages use :func:`redact_url`, which
    also masks malformed URLs)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def load_es_config(
    config_file: str | os.PathLike | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> ElasticsearchConfig:
    """Settings from ``overrides`` > ``config_file`` (JSON or TOML, optionally under an
    ``[elasticsearch]`` table) > ``VREC_ES_*`` environment variables > ``defaults`` > built-ins."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = dict(defaults or {})
    for key, var in ENV_VARS.items():
        if env.get(var, "").strip():
            values[key] = env[var].strip()
    if config_file is not None:
        values.update(_read_config_file(Path(config_file)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(ElasticsearchConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown Elasticsearch setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "verify_certs" in values:
        values["verify_certs"] = _as_bool(values["verify_certs"], "verify_certs (VREC_ES_VERIFY_CERTS)")
    for key in ("request_timeout", "ping_timeout"):
        if key in values:
            values[key] = float(values[key])
    if "max_retries" in values:
        values["max_retries"] = int(values["max_retries"])
    return ElasticsearchConfig(**values)


def _read_config_file(path: Path) -> dict[str, Any]:
    path = path.expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Elasticsearch config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse Elasticsearch config file {str(path)!r}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("elasticsearch"), dict):
        data = data["elasticsearch"]
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a table/object of settings")
    data = dict(data)
    if "user" in data:
        data["username"] = data.pop("user")
    if (data.get("api_key") or data.get("password")) and os.name == "posix":
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.warn(f"{path} holds a secret but is readable by other users; chmod 600 it", stacklevel=3)
    return data


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def check_index_name(name: str) -> str:
    if not isinstance(name, str) or not _INDEX_NAME.match(name):
        raise ValueError(
            f"invalid Elasticsearch index name {name!r}: use lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def default_index_name(catalog_name: str | None = None) -> str:
    if not catalog_name:
        return DEFAULT_INDEX
    slug = re.sub(r"[^a-z0-9]+", "-", catalog_name.lower()).strip("-")
    return f"vrec-{slug}" if slug else DEFAULT_INDEX


# ---------------------------------------------------------------------------------------- client


def _import_elasticsearch():
    try:
        import elasticsearch
    except ImportError as exc:
        raise BackendUnavailableError(
            "the Elasticsearch backend needs the official client: pip install 'vrec[es]' "
            "(elasticsearch>=8.13,<10)"
        ) from exc
    return elasticsearch


def connect(config: ElasticsearchConfig | None = None, **client_options: Any):
    """An ``elasticsearch.Elasticsearch`` client, checked with one quick request.

    Raises :class:`BackendUnavailableError` with one clear line when the server is unreachable,
    refuses the credentials or the TLS setup, or is not Elasticsearch 8+.
    """
    es = _import_elasticsearch()
    config = config or load_es_config()
    kwargs: dict[str, Any] = {
        "hosts": [config.url],
        "request_timeout": config.request_timeout,
        "max_retries": config.max_retries,
        "retry_on_timeout": True,
    }
    if config.api_key:
        kwargs["api_key"] = config.api_key
    elif config.username:
        kwargs["basic_auth"] = (config.username, config.password)
    if config.url.startswith("https://"):
        kwargs["verify_certs"] = config.verify_certs
        if config.ca_certs:
            kwargs["ca_certs"] = str(Path(config.ca_certs).expanduser())
        if not config.verify_certs:
            kwargs["ssl_show_warn"] = False
    elif config.auth != "none":
        warnings.warn(f"sending Elasticsearch credentials over plain http to {config.url}", stacklevel=2)
    kwargs.update(client_options)
    client = es.Elasticsearch(**kwargs)
    quick = client.options(request_timeout=config.ping_timeout, max_retries=0)
    pool_log = logging.getLogger("elastic_transport.node_pool")
    level = pool_log.level
    pool_log.setLevel(logging.ERROR)  # a 405 on `GET /` is no node failure worth a warning
    try:
        info = _checked(quick.info, config.url, root=True)
    except _RootMissing:
        # Servers without the rest-root module (Elastic's integration-test distribution) have no
        # `GET /`: check the cluster instead; the product header was checked by the client.
        _checked(quick.cluster.health, config.url)
        return client
    finally:
        pool_log.setLevel(level)
    version = str(info.get("version", {}).get("number", "0"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < 8:
        raise BackendUnavailableError(f"Elasticsearch at {config.url} is version {version}; vrec needs 8.x or 9.x")
    return client


class _RootMissing(Exception):
    """``GET /`` answered 404/405: a server without the rest-root module."""


def _checked(call, url: str, index: str | None = None, *, root: bool = False):
    """Run one client call, turning transport, auth, readiness and missing-index failures into
    the project's exceptions with one line naming ``url`` (never credentials) and the way out."""
    import elastic_transport
    from elasticsearch import ApiError, AuthorizationException, UnsupportedProductError

    url = redact_url(url)
    try:
        return call()
    except elastic_transport.TlsError as exc:
        raise BackendUnavailableError(
            f"TLS handshake with Elasticsearch at {url} failed ({_reason(exc)}); set VREC_ES_CA_CERTS to the "
            "cluster's CA file (or VREC_ES_VERIFY_CERTS=false for a throwaway local cluster)"
        ) from None
    except (elastic_transport.ConnectionError, elastic_transport.ConnectionTimeout) as exc:
        raise BackendUnavailableError(
            f"cannot reach Elasticsearch at {url} ({_reason(exc)}); {START_HINT}"
        ) from None
    except AuthorizationException as exc:
        raise BackendUnavailableError(
            f"Elasticsearch at {url} denied the request (403: {_reason(exc)}); the API key or user needs "
            "read/write/manage privileges on the vrec index"
        ) from None
    except UnsupportedProductError:
        raise BackendUnavailableError(f"the server at {url} is not Elasticsearch") from None
    except ApiError as exc:
        kind, reason = _error_parts(exc.body, _reason(exc))
        _raise_api_error(exc.status_code, kind, reason, url, index, root=root)  # 401 (AuthenticationException) too
        raise


def _error_parts(body: Any, default: str = "") -> tuple[str, str]:
    """(type, one-line reason) of an Elasticsearch error body."""
    error = body.get("error") if isinstance(body, Mapping) else body
    if not isinstance(error, Mapping):
        return "", str(error or default).splitlines()[0][:200] if (error or default) else ""
    kind = str(error.get("type", ""))
    reason = str(error.get("reason") or default)
    text = f"{kind}: {reason}" if kind and kind not in reason else reason
    return kind, text.splitlines()[0][:200] if text else kind


def _raise_api_error(status: int, kind: str, reason: str, url: str, index: str | None, *, root: bool = False) -> None:
    """Raise the project's exception for an Elasticsearch error answer (returns for the others)."""
    if root and status in (404, 405, 410):
        raise _RootMissing()
    if status == 404 and kind in ("index_not_found_exception", ""):
        raise IndexNotFoundError(
            f"Elasticsearch at {url} has no index {index or '(unknown)'!r} ({reason}); check the index name "
            "(VREC_ES_INDEX, --es-index) or build it: vrec index --backend elasticsearch ..."
        )
    if status == 503:
        raise BackendUnavailableError(
            f"Elasticsearch at {url} is not ready (503: {reason}); it may still be starting or the index's "
            "shards are not assigned: wait until GET /_cluster/health is yellow or green, then retry"
        )
    if status == 401:
        raise BackendUnavailableError(
            f"Elasticsearch at {url} refused the credentials (401); set VREC_ES_API_KEY, or "
            "VREC_ES_USER and VREC_ES_PASSWORD, or the api_key/username/password of your config file"
        )


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------- request bodies (pure)


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
    ``flat`` searches exhaustively (exact)."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or not 1 <= dims <= MAX_DIMS:
        raise ValueError(f"Elasticsearch dense_vector fields hold 1..{MAX_DIMS} dimensions, got {dims!r}")
    options: dict[str, Any] = {"type": index_type}
    if index_type.endswith("hnsw"):
        options.update(m=int(m), ef_construction=int(ef_construction))
    return {
        "type": "dense_vector",
        "dims": int(dims),
        "element_type": "float",
        "index": True,
        "similarity": "cosine",
        "index_options": options,
    }


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


# ---------------------------------------------------------------------------------------- the index


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

    def _record_fingerprint(self, key: str) -> None:
        """Remember in the mapping's ``_meta`` which embeddings this field was last fully indexed
        from, so that the next :func:`build_index` of the same embeddings skips the per-id check."""
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
                hits = self._tie_sorted(answer["hits"]["hits"][:k])
                ids[row, : len(hits)] = [hit["_id"] for hit in hits]
                scores[row, : len(hits)] = [2.0 * float(hit["_score"]) - 1.0 for hit in hits]
        return ids.astype(str), scores

    def _tie_sorted(self, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The project's order: score descending, then catalog row ascending (items without a known
        row, e.g. in an index reopened from disk, after those with one, by id)."""
        unknown = len(self._rows)
        return sorted(hits, key=lambda h: (-float(h["_score"]), self._rows.get(h["_id"], unknown), h["_id"]))

    # -- persistence -------------------------------------------------------------------------------
    def _save(self, directory: Path) -> dict[str, Any]:
        # The data lives on the server; the folder records where (never the credentials).
        return {
            "url": self.config.url,
            "index_name": self.index_name,
            "field": self.field,
            "index_options": self.vector_mapping["index_options"],
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
            "index_options": self.vector_mapping["index_options"],
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
        index._rows = {item_id: row for row, item_id in enumerate(ids.tolist())}
        if not rebuild and index._fingerprint == key and len(index) == len(ids):
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
        index._record_fingerprint(key)
        return index


__all__ = [
    "BulkIndexError",
    "BulkReport",
    "ElasticsearchConfig",
    "ElasticsearchIndex",
    "FailedDocument",
    "bulk_remove_vector_actions",
    "bulk_upsert_actions",
    "check_knn_sizes",
    "connect",
    "default_num_candidates",
    "dense_vector_mapping",
    "ids_with_vector_body",
    "index_mapping",
    "knn_query",
    "knn_search_body",
    "load_es_config",
    "vector_field",
]
