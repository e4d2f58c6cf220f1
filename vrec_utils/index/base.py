"""One vector-index interface, several backends.

:class:`VectorIndex` holds one model's L2-normalised item vectors, keyed by string item id, with
optional label columns (``articleType``, ``gender``, ...) used as filters. Public methods
validate their input, then call one private hook per backend (``_add``, ``_delete``, ``_search``,
``_save``, ``_load``), so every backend sees clean arrays:

* vectors: C-contiguous float32 ``(n, dim)``, finite, L2-normalised (zero vectors are refused:
  cosine similarity is undefined for them and Elasticsearch rejects them);
* filters: one ``dict`` (column -> value, values as ``str``) or ``None`` per query, columns
  checked against the index's ``filter_columns``;
* exclusions: one item id or ``None`` per query.

Capabilities are declared on the class (``supports_filters``, ``max_k``), not found by failure.
Backends register themselves with :func:`register_index`; :func:`create_index` builds one by name.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ..catalog import Catalog
from ..store import Embeddings

INDEX_CONFIG = "index.json"
FORMAT_VERSION = 1

Filter = Mapping[str, str]


class IndexBackendError(Exception):
    """A failure of an index backend that the user fixes (server, index, settings); the message is
    one line that says what failed and the way out, and never holds credentials."""


class BackendUnavailableError(IndexBackendError, ConnectionError):
    """The backend's server or client library cannot be used (unreachable, not ready, credentials
    refused); the message says how to fix it."""


class IndexNotFoundError(IndexBackendError, LookupError):
    """The index named (e.g. an Elasticsearch index) does not exist on the server."""


class IndexSettingsMismatchError(IndexBackendError, ValueError):
    """The index already exists with other settings than those asked for (e.g. another
    ``index_options`` type); it is refused rather than silently used with the old settings."""


# ---------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SearchResult:
    """The k nearest items of each query.

    ``ids`` is a ``(n_queries, k)`` str array (``""`` where fewer than k results exist) and
    ``scores`` the matching float32 cosine similarities (``-inf`` where padded), best first.
    ``query_ids`` are the queries' catalog ids when the queries are catalog items.
    """

    ids: np.ndarray
    scores: np.ndarray
    query_ids: list[str] | None = None

    def __post_init__(self) -> None:
        if self.ids.shape != self.scores.shape or self.ids.ndim != 2:
            raise ValueError(f"ids {self.ids.shape} and scores {self.scores.shape} must be equal 2-D shapes")
        if self.query_ids is not None and len(self.query_ids) != len(self.ids):
            raise ValueError(f"{len(self.query_ids)} query ids for {len(self.ids)} queries")

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def counts(self) -> np.ndarray:
        """Number of real (non-padded) results per query."""
        return (self.ids != "").sum(axis=1)

    def to_frame(self, catalog: Catalog | None = None) -> pd.DataFrame:
        """One row per (query, result): ``query_id`` (or ``query``, the 0-based query number when
        the queries are not catalog items), ``rank`` (1-based), ``item_id``, ``score``, then the
        catalog's ``title`` and label columns when ``catalog`` is given. Padded slots are dropped."""
        rows, cols = np.nonzero(self.ids != "")
        if self.query_ids is not None:
            query_col = ("query_id", np.asarray(self.query_ids, dtype=object)[rows] if len(rows) else np.array([], dtype=object))
        else:
            query_col = ("query", rows.astype(np.int64))
        frame = pd.DataFrame(
            {
                query_col[0]: query_col[1],
                "rank": (cols + 1).astype(np.int64),
                "item_id": self.ids[rows, cols].astype(object),
                "score": self.scores[rows, cols].astype(np.float64),
            }
        )
        if catalog is not None:
            columns = [c for c in ("title", *catalog.label_columns) if c in catalog.items.columns]
            info = catalog.items[columns].reindex(frame["item_id"])
            for column in columns:
                frame[column] = info[column].to_numpy()
        return frame


# ---------------------------------------------------------------------------------------- the interface


class VectorIndex(ABC):
    """Vectors of one model, searchable by cosine similarity (inner product of unit vectors)."""

    backend: ClassVar[str]
    supports_filters: ClassVar[bool] = False
    #: largest k a search accepts (None: no limit beyond the index size)
    max_k: ClassVar[int | None] = None
    #: extra keyword arguments :meth:`search` accepts for this backend (validated by name)
    search_options: ClassVar[tuple[str, ...]] = ()
    #: built once from every vector: a second :meth:`add` or a :meth:`delete` raises IndexBackendError
    read_only: ClassVar[bool] = False

    def __init__(self, model: str, dim: int, filter_columns: Sequence[str] | None = None) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.model = model
        self.dim = int(dim)
        self.filter_columns: tuple[str, ...] = tuple(_check_columns(filter_columns or ()))
        #: where the index came from (embedding cache, fingerprint); set by build_index/load
        self.info: dict[str, Any] = {}

    # -- public API: validate, then call the backend hook ---------------------------------------
    def add(self, ids: Sequence[str] | np.ndarray, vectors: np.ndarray, metadata: pd.DataFrame | None = None) -> None:
        """Insert or replace (upsert) items. ``metadata`` holds the filter columns, indexed by id."""
        id_array = _check_ids(ids, what="ids", unique=True)
        matrix = self._check_vectors(vectors, len(id_array), id_array)
        meta = self._check_metadata(metadata, id_array)
        if len(id_array):
            self._add(id_array, matrix, meta)

    def delete(self, ids: Sequence[str] | np.ndarray) -> None:
        """Remove items; raises KeyError (and removes nothing) if some id is not in the index."""
        id_array = _check_ids(ids, what="ids", unique=False)
        if len(id_array):
            self._delete(np.unique(id_array))

    def __len__(self) -> int:
        return self._count()

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        filters: Sequence[Filter | None] | Filter | None = None,
        exclude_ids: Sequence[str | None] | None = None,
        query_ids: Sequence[str] | None = None,
        **options: Any,
    ) -> SearchResult:
        """The ``k`` most similar items of each query vector.

        ``queries``: ``(n, dim)`` or ``(dim,)``. ``filters``: one dict per query (e.g.
        ``{"articleType": "Dresses"}``) or one for all; only items whose labels equal every value
        are returned. ``exclude_ids``: per query an item id to leave out (the query item itself);
        the query still gets k results. ``query_ids`` label the queries in the result (defaults to
        ``exclude_ids`` when every query has one).
        """
        matrix = self._check_queries(queries)
        n = len(matrix)
        k = self._check_k(k)
        filter_list = self._check_filters(filters, n)
        exclude_list = _check_exclude(exclude_ids, n)
        unknown = sorted(set(options) - set(self.search_options))
        if unknown:
            allowed = ", ".join(self.search_options) or "none"
            raise TypeError(f"{self.backend} search got unknown option(s) {', '.join(unknown)}; allowed: {allowed}")
        if query_ids is None and exclude_list is not None and all(e is not None for e in exclude_list):
            query_ids = exclude_list
        if query_ids is not None:
            query_ids = [str(q) for q in query_ids]
            if len(query_ids) != n:
                raise ValueError(f"{len(query_ids)} query_ids for {n} queries")
        if n == 0:
            return SearchResult(np.full((0, k), "", dtype=str), np.full((0, k), -np.inf, np.float32), query_ids)
        ids, scores = self._search(matrix, k, filter_list, exclude_list, **options)
        ids = np.asarray(ids, dtype=str)
        scores = np.asarray(scores, dtype=np.float32)
        return SearchResult(ids, scores, list(query_ids) if query_ids is not None else None)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to the folder ``path`` (replaced atomically) and return it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            config = {
                "backend": self.backend,
                "format_version": FORMAT_VERSION,
                "model": self.model,
                "dim": self.dim,
                "filter_columns": list(self.filter_columns),
                "info": self.info,
                **self._save(tmp),
            }
            (tmp / INDEX_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, **options: Any) -> "VectorIndex":
        """Read an index written by :meth:`save` (any backend, found from its ``index.json``)."""
        path = Path(path)
        config_path = path / INDEX_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a saved index (no {INDEX_CONFIG})")
        config = json.loads(config_path.read_text())
        backend_cls = get_index_class(config["backend"])
        if not issubclass(backend_cls, cls):
            raise ValueError(f"{str(path)!r} holds a {config['backend']} index, not a {cls.__name__}")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} was written in index format {config.get('format_version')}, this version reads "
                f"{FORMAT_VERSION}; rebuild it (vrec index ... --rebuild)"
            )
        index = backend_cls._load(path, config, **options)
        index.info = dict(config.get("info") or {})
        return index

    def describe(self) -> dict[str, Any]:
        """Settings and size, for logs and the CLI."""
        return {"backend": self.backend, "model": self.model, "dim": self.dim, "size": len(self),
                "filter_columns": list(self.filter_columns), **self._describe()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, dim={self.dim}, filter_columns={list(self.filter_columns)})"

    # -- backend hooks -----------------------------------------------------------------------------
    @abstractmethod
    def _add(self, ids: np.ndarray, vectors: np.ndarray, metadata: dict[str, np.ndarray]) -> None:
        """Upsert; ``metadata`` maps every filter column to a str array aligned with ``ids``."""

    @abstractmethod
    def _delete(self, ids: np.ndarray) -> None:
        """Remove unique ``ids``; KeyError naming those not in the index."""

    @abstractmethod
    def _count(self) -> int: ...

    @abstractmethod
    def _search(
        self, queries: np.ndarray, k: int, filters: list[dict[str, str] | None] | None,
        exclude_ids: list[str | None] | None, **options: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, scores)``, both ``(n, k)``, padded with ``""`` / ``-inf``."""

    @abstractmethod
    def _save(self, directory: Path) -> dict[str, Any]:
        """Write backend files into ``directory``; return extra settings for ``index.json``."""

    @classmethod
    @abstractmethod
    def _load(cls, directory: Path, config: dict[str, Any], **options: Any) -> "VectorIndex": ...

    def _describe(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_embeddings(
        cls,
        embeddings: "Embeddings",
        metadata: pd.DataFrame,
        *,
        cache_dir: Path,
        key: str,
        rebuild: bool,
        catalog: "Catalog | None" = None,
        **config: Any,
    ) -> "VectorIndex":
        """Build (or reuse) an index over cached embeddings; see :func:`vrec_utils.index.build_index`.

        ``embeddings`` rows are in ``metadata``'s index order; ``key`` fingerprints them together with
        the metadata; ``catalog`` is the catalog they belong to. Default: build in memory, every time."""
        index = cls(embeddings.model, embeddings.dim, filter_columns=list(metadata.columns), **config)
        index.add(embeddings.ids, embeddings.vectors, metadata)
        return index

    # -- validation helpers ----------------------------------------------------------------------
    def _check_vectors(self, vectors: Any, n: int, ids: np.ndarray) -> np.ndarray:
        matrix = np.asarray(vectors)
        if matrix.ndim == 1 and n == 1:
            matrix = matrix[None, :]
        if matrix.ndim != 2 or matrix.shape[0] != n:
            raise ValueError(f"expected {n} vectors as an ({n}, {self.dim}) array, got shape {matrix.shape}")
        if matrix.shape[1] != self.dim:
            raise ValueError(self._dim_message(matrix.shape[1], "vectors"))
        return _normalise(matrix, ids, "item")

    def _check_queries(self, queries: Any) -> np.ndarray:
        matrix = np.asarray(queries)
        if matrix.ndim == 1:
            matrix = matrix[None, :]
        if matrix.ndim != 2:
            raise ValueError(f"queries must be (n, {self.dim}) or ({self.dim},), got shape {matrix.shape}")
        if matrix.shape[1] != self.dim:
            raise ValueError(self._dim_message(matrix.shape[1], "query vectors"))
        return _normalise(matrix, None, "query")

    def _dim_message(self, got: int, what: str) -> str:
        return (
            f"dimension mismatch: the index holds {self.dim}-d vectors of model {self.model!r} but the "
            f"{what} are {got}-d; query with the model the index was built from, or build an index for "
            "this model (vrec index --model ...)"
        )

    def _check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.max_k is not None and k > self.max_k:
            raise ValueError(f"k={k} is over the {self.backend} backend's limit of {self.max_k:,} results per query")
        return int(k)

    def _check_filters(self, filters: Any, n: int) -> list[dict[str, str] | None] | None:
        if filters is None:
            return None
        if isinstance(filters, Mapping):
            filter_list: list[Any] = [filters] * n
        elif isinstance(filters, (str, bytes)) or not isinstance(filters, Sequence):
            raise ValueError("filters must be a dict (column -> value), a list of them (one per query) or None")
        else:
            filter_list = list(filters)
            if len(filter_list) != n:
                raise ValueError(f"{len(filter_list)} filters for {n} queries; give one per query or one dict for all")
        out: list[dict[str, str] | None] = []
        cache: dict[int, dict[str, str] | None] = {}
        for f in filter_list:
            key = id(f)
            if key not in cache:
                cache[key] = self._check_filter(f)
            out.append(cache[key])
        if all(f is None for f in out):
            return None
        if not self.supports_filters:
            raise ValueError(f"the {self.backend} backend does not support filters")
        return out

    def _check_filter(self, f: Any) -> dict[str, str] | None:
        if f is None or (isinstance(f, Mapping) and not f):
            return None
        if not isinstance(f, Mapping):
            raise ValueError(f"each filter must be a dict (column -> value) or None, got {f!r}")
        clean = {}
        for column, value in f.items():
            if column not in self.filter_columns:
                have = ", ".join(self.filter_columns) or "none"
                raise ValueError(
                    f"cannot filter on {column!r}: this index has filter columns {have}; build it with "
                    f"filter_columns including {column!r}"
                )
            if value is None or (isinstance(value, float) and np.isnan(value)):
                raise ValueError(f"filter value for {column!r} is missing")
            clean[str(column)] = str(value)
        return clean

    def _check_metadata(self, metadata: pd.DataFrame | None, ids: np.ndarray) -> dict[str, np.ndarray]:
        if metadata is None:
            if self.filter_columns and len(ids):
                raise ValueError(
                    f"this index filters on {', '.join(self.filter_columns)}; pass metadata with those columns "
                    "(a DataFrame indexed by item id)"
                )
            return {}
        if not isinstance(metadata, pd.DataFrame):
            raise ValueError("metadata must be a pandas DataFrame indexed by item id")
        columns = [str(c) for c in metadata.columns]
        if not self.filter_columns:
            if len(self) and columns:
                raise ValueError(
                    f"this index was built without filter columns; cannot add {', '.join(columns)} now (rebuild it)"
                )
            self.filter_columns = tuple(_check_columns(columns))
        missing = [c for c in self.filter_columns if c not in columns]
        if missing:
            raise ValueError(f"metadata lacks filter column(s) {', '.join(missing)}")
        index = metadata.index.astype(str)
        if index.has_duplicates:
            raise ValueError("metadata index (item ids) has duplicates")
        positions = index.get_indexer(ids)
        if (positions < 0).any():
            absent = ids[positions < 0][:5].tolist()
            raise ValueError(f"metadata has no row for {(positions < 0).sum()} id(s), e.g. {absent}")
        frame = metadata.iloc[positions]
        frame.columns = columns
        out = {}
        for column in self.filter_columns:
            values = frame[column]
            if values.isna().any():
                raise ValueError(f"metadata column {column!r} has missing values; fill them (e.g. with '')")
            out[column] = values.astype(str).to_numpy(dtype=str)
        return out


# ---------------------------------------------------------------------------------------- helpers


def _check_columns(columns: Sequence[str]) -> list[str]:
    out = [str(c) for c in columns]
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate filter columns: {out}")
    bad = [c for c in out if not c or c in ("image",)]
    if bad:
        raise ValueError(f"invalid filter column(s): {bad}")
    return out


def _check_ids(ids: Any, *, what: str, unique: bool) -> np.ndarray:
    if isinstance(ids, (str, bytes)):
        ids = [ids]
    array = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of item ids")
    if array.dtype.kind not in "UO" or (array.dtype.kind == "O" and not all(isinstance(i, str) for i in array)):
        array = np.asarray([str(i) for i in array.tolist()])
    array = array.astype(str) if len(array) else np.asarray([], dtype=str)
    if (array == "").any():
        raise ValueError(f"{what} contain an empty id")
    if unique and len(np.unique(array)) != len(array):
        values, counts = np.unique(array, return_counts=True)
        raise ValueError(f"{what} contain duplicates, e.g. {values[counts > 1][:5].tolist()}")
    return array


def _check_exclude(exclude_ids: Any, n: int) -> list[str | None] | None:
    if exclude_ids is None:
        return None
    if isinstance(exclude_ids, (str, bytes)):
        if n != 1:
            raise ValueError(f"exclude_ids must give one id (or None) per query; got one string for {n} queries")
        exclude_ids = [exclude_ids]
    out = [None if e is None else str(e) for e in list(exclude_ids)]
    if len(out) != n:
        raise ValueError(f"{len(out)} exclude_ids for {n} queries; give one id (or None) per query")
    return None if all(e is None for e in out) else out


#: rows whose norm is within this of 1 count as normalised and are kept as they are
UNIT_NORM_TOLERANCE = 1e-4


def _normalise(matrix: np.ndarray, ids: np.ndarray | None, what: str, chunk: int = 65536) -> np.ndarray:
    """Unit-length float32 rows; refuses NaN/inf and zero rows. Works in row chunks, so a large
    (memory-mapped) matrix is not copied when it is already normalised."""
    if matrix.dtype.kind not in "fiu":
        raise ValueError(f"{what} vectors must be numeric, got dtype {matrix.dtype}")
    if not len(matrix):
        return np.ascontiguousarray(matrix, dtype=np.float32)
    norms = np.empty(len(matrix), dtype=np.float64)
    for start in range(0, len(matrix), chunk):
        block = np.asarray(matrix[start : start + chunk])
        if block.dtype == np.float32:  # no float64 copy (it cost more than the search itself)
            norms[start : start + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block))
            odd = ~(np.isfinite(norms[start : start + len(block)]) & (norms[start : start + len(block)] > 1e-12))
            if not odd.any():
                continue
        block = np.asarray(block, dtype=np.float64)  # exact answer for huge, tiny or non-float rows
        norms[start : start + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block))
    bad = ~np.isfinite(norms)
    if bad.any():
        raise ValueError(f"{what} vector(s) {_name_rows(np.flatnonzero(bad), ids)} contain NaN or infinity")
    zero = norms <= 1e-12
    if zero.any():
        raise ValueError(
            f"{what} vector(s) {_name_rows(np.flatnonzero(zero), ids)} are all zeros: cosine similarity is "
            "undefined for them (Elasticsearch rejects them too)"
        )
    if matrix.dtype == np.float32 and matrix.flags.c_contiguous and np.all(np.abs(norms - 1.0) < UNIT_NORM_TOLERANCE):
        return matrix
    out = np.empty(matrix.shape, dtype=np.float32)
    for start in range(0, len(matrix), chunk):
        block = np.asarray(matrix[start : start + chunk], dtype=np.float64)
        out[start : start + len(block)] = block / norms[start : start + len(block), None]
    return out


def _name_rows(rows: np.ndarray, ids: np.ndarray | None) -> str:
    names = [repr(str(ids[r])) if ids is not None else f"#{r}" for r in rows[:5]]
    return ", ".join(names) + (f" (+{len(rows) - 5} more)" if len(rows) > 5 else "")


def _replace_dir(new: Path, target: Path) -> None:
    """Move folder ``new`` to ``target``, replacing what is there with as short a gap as possible."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------- registry

_BACKENDS: dict[str, type[VectorIndex]] = {}
_BACKEND_MODULES = ("vrec_utils.index.faiss_index", "vrec_utils.index.elasticsearch", "vrec_utils.index.ivf_ondisk")


def register_index(name: str) -> Callable[[type[VectorIndex]], type[VectorIndex]]:
    """Class decorator: make a :class:`VectorIndex` subclass available as ``create_index(name)``."""

    def decorate(cls: type[VectorIndex]) -> type[VectorIndex]:
        if name in _BACKENDS and _BACKENDS[name] is not cls:
            raise ValueError(f"index backend {name!r} is registered twice")
        if not (isinstance(cls, type) and issubclass(cls, VectorIndex)):
            raise TypeError(f"{cls!r} is not a VectorIndex subclass")
        cls.backend = name
        _BACKENDS[name] = cls
        return cls

    return decorate


def _ensure_backends_imported() -> None:
    # Backend modules register themselves on import: imported on first use, since they import this
    # module (a cycle at module level) and faiss; their client libraries load lazily.
    for module in _BACKEND_MODULES:
        importlib.import_module(module)


def get_index_class(backend: str) -> type[VectorIndex]:
    _ensure_backends_imported()
    try:
        return _BACKENDS[backend]
    except KeyError:
        raise KeyError(f"unknown index backend {backend!r}; available: {', '.join(sorted(_BACKENDS))}") from None


def create_index(backend: str = "faiss", *, model: str, dim: int, **config: Any) -> VectorIndex:
    """An empty index of ``backend`` for ``model``'s ``dim``-d vectors; ``config`` is backend-specific."""
    return get_index_class(backend)(model=model, dim=dim, **config)


def list_index_backends() -> pd.DataFrame:
    """The registered backends and their declared capabilities, one row each."""
    _ensure_backends_imported()
    rows = [
        {
            "name": name,
            "supports_filters": cls.supports_filters,
            "max_k": cls.max_k,
            "description": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        }
        for name, cls in sorted(_BACKENDS.items())
    ]
    return pd.DataFrame(rows, columns=["name", "supports_filters", "max_k", "description"])
