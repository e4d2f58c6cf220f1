"""FAISS backend (the embedded default).

Vectors are L2-normalised, so the inner product is the cosine similarity.

* ``ann="none"`` (default): ``IndexFlatIP``, exact. Batches of 256+ queries on CPUs with AMX-BF16
  take a bf16 first pass and rescore its candidates in fp32, with a certificate that the answer is
  the exact one (``exact.py``; ``exact_method`` setting): 2.6x ``IndexFlatIP.search`` on
  fashion-small all-vs-all (0.53 s vs 1.39 s), after a one-off bf16 copy of the vectors.
* ``ann="hnsw"``: ``IndexHNSWFlat`` (``hnsw_m`` 32, ``ef_construction`` 80; ``ef_search`` 64 at
  query time).
* ``ann="ivf"``: ``IndexIVFFlat`` (``nlist`` = sqrt(n) lists, trained on the first batch added;
  ``nprobe`` = 1.5 * sqrt(nlist) at query time). Batches of 32+ queries are searched list by
  list, one BLAS product per inverted list (see ``_ivf_batched``): FAISS's per-query scan reads
  each probed list from memory once per query, which is memory-bound for 1280-d vectors.

Defaults were chosen on efficientnet-lite0 embeddings of fashion-small (benchmarks/bench_index.py):
recall@10 against exact search >= 0.99 for both.

Filtered search happens inside FAISS: queries are grouped by filter value, each group gets the
mask of allowed items, and is searched either exactly over those items' vectors (``faiss.knn`` on
the masked rows: flat indexes, and ANN indexes when the allowed set has at most
``exact_filter_max`` items), through the IVF lists with the mask, or through the ANN index with an
``IDSelectorBitmap`` in its ``SearchParameters``. ANN rows that come back with fewer results than
exist are redone exactly, so a filtered search returns k items whenever k such items exist.
``exclude_ids`` searches k+1 and drops the excluded item (or the last one).

Item ids are strings; FAISS labels are int64 rows of a label table (``_ids``, ``_alive``, one
str array per filter column). Deletes: ``remove_ids`` for flat (label table compacted) and IVF;
tombstones for HNSW (which cannot remove), rebuilt once more than half the rows are dead.
Upserts delete the old vector and append the new one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
import pandas as pd

from .base import UNIT_NORM_TOLERANCE, VectorIndex, register_index
from .exact import EXACT_METHODS, TIE_MARGIN, Bf16Items, exact_knn, resolve_exact_method

ANN_KINDS = ("none", "hnsw", "ivf")
VECTORS_FILE = "vectors.faiss"
IVF_TRAIN_PER_LIST = 64  # k-means training points per IVF list (faiss warns under 39)
IVF_BATCH_MIN = 32  # from this many queries, IVF searches list by list with BLAS (see _ivf_batched)


@dataclass(frozen=True)
class FaissSettings:
    """FAISS index settings; ``None`` means "chosen from the data" (see each field)."""

    ann: str = "none"
    #: HNSW: graph degree, and the candidate list size while building / searching
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    #: IVF: number of lists (None: sqrt(n) at training, at most n / 39) and lists probed per query
    #: (None: 1.5 * sqrt(nlist))
    nlist: int | None = None
    nprobe: int | None = None
    #: filtered ANN search over at most this many allowed items is done exactly (cheaper and exact)
    exact_filter_max: int = 4096
    #: OpenMP threads while searching/building (None: the CPUs this process may use)
    threads: int | None = None
    #: exact search (flat indexes, filtered and completed ANN rows): "fp32" is ``faiss.knn``;
    #: "bf16-rescored" picks candidates with bf16 scores and rescores them in fp32, with a
    #: certificate that the answer is the exact one (see ``exact.py``); "auto" takes it on CPUs with
    #: AMX-BF16 for large searches. Same answers either way: only the speed differs.
    exact_method: str = "auto"

    #: settings that change the built structure (the others only change searches)
    BUILD_FIELDS: ClassVar[tuple[str, ...]] = ("ann", "hnsw_m", "ef_construction", "nlist")

    def __post_init__(self) -> None:
        if self.ann not in ANN_KINDS:
            raise ValueError(f"ann must be one of {', '.join(ANN_KINDS)}, got {self.ann!r}")
        if self.exact_method not in EXACT_METHODS:
            raise ValueError(f"exact_method must be one of {', '.join(EXACT_METHODS)}, got {self.exact_method!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "exact_filter_max"):
            _check_positive(name, getattr(self, name), allow_zero=name == "exact_filter_max")
        for name in ("nlist", "nprobe", "threads"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FaissSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise TypeError(f"unknown faiss index option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in config.items() if v is not None})

    def build_key(self) -> str:
        payload = json.dumps({f: getattr(self, f) for f in self.BUILD_FIELDS}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


#: the stored vectors are L2-normalised (VectorIndex keeps rows already within
#: UNIT_NORM_TOLERANCE of unit length), so exact search need not read them all to bound its
#: kernels' error by their largest norm
STORED_NORM_BOUND = 1.0 + 2 * UNIT_NORM_TOLERANCE


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")


def default_threads() -> int:
    """OpenMP threads for FAISS: the CPUs this process may run on (cgroup/affinity aware), capped by
    OMP_NUM_THREADS when set."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS/Windows
        available = os.cpu_count() or 1
    return max(1, min(available, faiss.omp_get_max_threads()))


@contextlib.contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads inside the block, restoring the previous count after."""
    before = faiss.omp_get_max_threads()
    n = n or default_threads()
    if n != before:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            faiss.omp_set_num_threads(before)


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS limited to one thread inside the block (threadpoolctl, when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads (the bf16 exact path) set to ``n`` inside the block (None: unchanged)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@register_index("faiss")
class FaissIndex(VectorIndex):
    """Embedded FAISS index: exact inner product, or HNSW / IVF approximate search."""

    supports_filters = True
    max_k = None
    search_options = ("ef_search", "nprobe")

    def __init__(self, model: str, dim: int, filter_columns=None, **config: Any) -> None:
        super().__init__(model, dim, filter_columns)
        self.settings = FaissSettings.from_config(config)
        self._faiss = self._new_faiss_index()
        self._ids = np.asarray([], dtype=str)  # label -> item id
        self._alive = np.zeros(0, dtype=bool)  # label -> still in the index
        self._meta: dict[str, np.ndarray] = {c: np.asarray([], dtype=str) for c in self.filter_columns}
        self._pos: dict[str, int] = {}  # live item id -> label
        self._n_dead = 0  # HNSW tombstones
        self._bf16_copy = None  # flat index: bf16 copy of the stored vectors (exact.py)

    # -- construction ---------------------------------------------------------------------------
    def _new_faiss_index(self) -> faiss.Index:
        s = self.settings
        if s.ann == "none":
            return faiss.IndexFlatIP(self.dim)
        if s.ann == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = s.ef_construction
            index.hnsw.efSearch = s.ef_search
            return index
        # IVF: created untrained; the list count is fixed at the first add (see _train_ivf)
        return None  # type: ignore[return-value]

    def _train_ivf(self, vectors: np.ndarray) -> None:
        n = len(vectors)
        nlist = self.settings.nlist or max(1, min(round(math.sqrt(n)), n // 39))
        if nlist > n:
            raise ValueError(f"ivf needs at least nlist={nlist} vectors in the first add to train, got {n}")
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234
        sample = vectors
        if n > IVF_TRAIN_PER_LIST * nlist:  # k-means on a sample: minutes saved at 1M, same lists
            rows = np.sort(np.random.default_rng(1234).choice(n, IVF_TRAIN_PER_LIST * nlist, replace=False))
            sample = np.ascontiguousarray(vectors[rows])
        with omp_threads(self.settings.threads), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index.train(sample)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # for reconstruct() and remove_ids()
        index.nprobe = self._nprobe(index)
        self._quantizer = quantizer  # keep the Python object alive with the index
        self._faiss = index

    def _nprobe(self, index: faiss.Index | None = None) -> int:
        index = self._faiss if index is None else index
        return self.settings.nprobe or min(index.nlist, max(1, round(1.5 * math.sqrt(index.nlist))))

    # -- hooks: add / delete / count --------------------------------------------------------------
    def _add(self, ids: np.ndarray, vectors: np.ndarray, metadata: dict[str, np.ndarray]) -> None:
        self._bf16_copy = None
        existing = np.asarray([i for i in ids if i in self._pos], dtype=str)
        if len(existing):
            self._remove(existing)
        if self._faiss is None:
            self._train_ivf(vectors)
        start = len(self._ids)
        labels = np.arange(start, start + len(ids), dtype=np.int64)
        with omp_threads(self.settings.threads):
            if self.settings.ann == "ivf":
                self._faiss.add_with_ids(vectors, labels)
            else:
                self._faiss.add(vectors)  # labels are rows: start .. start+n-1
        self._ids = np.concatenate([self._ids, ids]) if start else ids.copy()
        self._alive = np.concatenate([self._alive, np.ones(len(ids), dtype=bool)])
        for column in self.filter_columns:
            values = metadata[column]
            self._meta[column] = np.concatenate([self._meta[column], values]) if start else values.copy()
        self._pos.update(zip(ids.tolist(), labels.tolist()))

    def _delete(self, ids: np.ndarray) -> None:
        missing = [i for i in ids.tolist() if i not in self._pos]
        if missing:
            raise KeyError(
                f"{len(missing)} id(s) not in the {self.model} index, e.g. {missing[:5]}; nothing was deleted"
            )
        self._remove(ids)

    def _remove(self, ids: np.ndarray) -> None:
        self._bf16_copy = None
        labels = np.asarray([self._pos.pop(i) for i in ids.tolist()], dtype=np.int64)
        self._alive[labels] = False
        if self.settings.ann == "none":
            self._faiss.remove_ids(faiss.IDSelectorBatch(labels))  # shifts rows, keeps order
            self._compact_table()
        elif self.settings.ann == "ivf":
            self._faiss.remove_ids(faiss.IDSelectorArray(labels))  # the only selector the hashtable map takes
        else:  # HNSW cannot remove: tombstone, rebuild when mostly dead
            self._n_dead += len(labels)
            if self._n_dead * 2 > len(self._ids):
                self._rebuild_hnsw()

    def _compact_table(self) -> None:
        keep = self._alive
        self._ids = self._ids[keep]
        for column in self.filter_columns:
            self._meta[column] = self._meta[column][keep]
        self._alive = np.ones(len(self._ids), dtype=bool)
        self._pos = dict(zip(self._ids.tolist(), range(len(self._ids))))

    def _rebuild_hnsw(self) -> None:
        keep = np.flatnonzero(self._alive)
        vectors = np.ascontiguousarray(self._stored_vectors()[keep])
        self._faiss = self._new_faiss_index()
        with omp_threads(self.settings.threads):
            if len(vectors):
                self._faiss.add(vectors)
        self._compact_table()
        self._n_dead = 0

    def _count(self) -> int:
        return len(self._pos)

    @property
    def ids(self) -> np.ndarray:
        """The item ids in the index (in insertion order)."""
        return self._ids[self._alive]

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._pos

    def get_vectors(self, ids) -> np.ndarray:
        """The stored (normalised) vectors of ``ids``; KeyError for ids not in the index."""
        labels = []
        for item_id in ids:
            try:
                labels.append(self._pos[str(item_id)])
            except KeyError:
                raise KeyError(f"item {item_id!r} is not in the {self.model} index") from None
        return self._vectors_for(np.asarray(labels, dtype=np.int64))

    # -- vector access ---------------------------------------------------------------------------
    def _stored_vectors(self) -> np.ndarray:
        """Zero-copy view of the flat storage (flat and HNSW); row = label."""
        storage = self._faiss if self.settings.ann == "none" else faiss.downcast_index(self._faiss.storage)
        n = storage.ntotal
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return faiss.rev_swig_ptr(storage.get_xb(), n * self.dim).reshape(n, self.dim)

    def _vectors_for(self, labels: np.ndarray) -> np.ndarray:
        if self.settings.ann == "ivf":
            if not len(labels):
                return np.zeros((0, self.dim), dtype=np.float32)
            return self._faiss.reconstruct_batch(np.ascontiguousarray(labels, dtype=np.int64))
        return np.ascontiguousarray(self._stored_vectors()[labels])

    # -- hooks: search -----------------------------------------------------------------------------
    def _search(self, queries, k, filters, exclude_ids, *, ef_search=None, nprobe=None):
        n = len(queries)
        kk = k + (1 if exclude_ids is not None else 0)
        labels = np.full((n, kk), -1, dtype=np.int64)
        scores = np.full((n, kk), -np.inf, dtype=np.float32)
        if len(self._pos):
            with omp_threads(self.settings.threads), _torch_threads(self.settings.threads):
                for flt, rows in _group_by_filter(filters, n):
                    mask = self._allowed(flt)
                    d, i = self._search_group(queries[rows], kk, mask, ef_search, nprobe)
                    scores[rows], labels[rows] = d, i
        ids = np.where(labels >= 0, self._ids[np.maximum(labels, 0)] if len(self._ids) else "", "")
        scores[labels < 0] = -np.inf
        if exclude_ids is not None:
            ids, scores = _drop_excluded(ids, scores, exclude_ids, k)
        return ids, scores

    def _allowed(self, flt: dict[str, str] | None) -> np.ndarray | None:
        """Boolean mask over labels of the items a query may return; None when all labels are live."""
        if flt is None:
            return None if self._n_dead == 0 and self._alive.all() else self._alive.copy()
        mask = self._alive.copy()
        for column, value in flt.items():
            mask &= self._meta[column] == value
        return mask

    def _search_group(self, q, kk, mask, ef_search, nprobe):
        ann = self.settings.ann
        if mask is None:
            if ann == "none":
                return self._exact_all(q, kk)
            if ann == "ivf" and len(q) >= IVF_BATCH_MIN:
                d, i = self._ivf_batched(q, kk, nprobe, None)
            else:
                d, i = self._faiss.search(q, kk, params=self._ann_params(kk, None, ef_search, nprobe))
            return self._complete(q, kk, d, i, None)
        allowed = np.flatnonzero(mask)
        if len(allowed) == 0:
            return np.full((len(q), kk), -np.inf, np.float32), np.full((len(q), kk), -1, np.int64)
        if ann == "none" or len(allowed) <= self.settings.exact_filter_max:
            return self._exact(q, kk, allowed)
        if ann == "ivf" and len(q) >= IVF_BATCH_MIN:
            d, i = self._ivf_batched(q, kk, nprobe, mask)
            return self._complete(q, kk, d, i, allowed)
        bits = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
        d, i = self._faiss.search(q, kk, params=self._ann_params(kk, selector, ef_search, nprobe))
        del selector, bits
        return self._complete(q, kk, d, i, allowed)

    def _ivf_batched(self, q, kk, nprobe, mask):
        """IVF search for many queries at once, one BLAS product per inverted list.

        FAISS scans each (query, list) pair separately, which reads every probed list from memory
        once per query: memory-bound for 1280-d float vectors. Here the coarse quantizer assigns
        the queries, then each list's vectors are read once and multiplied with all the queries that
        probe it; per-list top-k candidates are merged per query. ``mask`` (bool over labels)
        restricts the items, as an IDSelector would. Same results as FAISS's scan."""
        index = self._faiss
        nprobe = min(nprobe or self._nprobe(), index.nlist)
        _, assign = index.quantizer.search(q, nprobe)
        pairs_list = assign.ravel()
        pairs_query = np.repeat(np.arange(len(q)), nprobe)
        keep = pairs_list >= 0
        order = np.argsort(pairs_list[keep], kind="stable")
        lists, queries = pairs_list[keep][order], pairs_query[keep][order]
        bounds = np.flatnonzero(np.diff(lists)) + 1
        invlists = index.invlists
        groups = list(zip(np.split(lists, bounds), np.split(queries, bounds)))

        def scan(part):
            out_q, out_s, out_l = [], [], []
            for group_lists, group_queries in part:
                number = int(group_lists[0])
                size = invlists.list_size(number)
                if size == 0:
                    continue
                codes = faiss.rev_swig_ptr(invlists.get_codes(number), size * self.dim * 4)
                vectors = codes.view(np.float32).reshape(size, self.dim)
                labels = faiss.rev_swig_ptr(invlists.get_ids(number), size)
                if mask is not None:
                    allowed = mask[labels]
                    if not allowed.any():
                        continue
                    vectors, labels = vectors[allowed], labels[allowed]
                sims = q[group_queries] @ vectors.T
                top = min(kk, sims.shape[1])
                if top < sims.shape[1]:
                    best = np.argpartition(-sims, top - 1, axis=1)[:, :top]
                else:
                    best = np.broadcast_to(np.arange(top), sims.shape)
                out_q.append(np.repeat(group_queries, top))
                out_s.append(np.take_along_axis(sims, best, axis=1).ravel())
                out_l.append(np.asarray(labels)[best].ravel())
            return out_q, out_s, out_l

        # Many small products: single-threaded BLAS in one Python thread per core (numpy releases
        # the GIL) is several times faster than multi-threaded BLAS on each small product.
        workers = min(self.settings.threads or default_threads(), max(1, len(groups)))
        with _single_threaded_blas():
            if workers > 1:
                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    parts = list(pool.map(scan, [groups[w::workers] for w in range(workers)]))
            else:
                parts = [scan(groups)]
        cand_q = [a for part in parts for a in part[0]]
        cand_s = [a for part in parts for a in part[1]]
        cand_l = [a for part in parts for a in part[2]]
        scores = np.full((len(q), kk), -np.inf, dtype=np.float32)
        found = np.full((len(q), kk), -1, dtype=np.int64)
        if cand_q:
            cq, cs, cl = np.concatenate(cand_q), np.concatenate(cand_s), np.concatenate(cand_l)
            order = np.lexsort((cl, -cs, cq))  # by query, best score first (ties: lower label)
            cq, cs, cl = cq[order], cs[order], cl[order]
            starts = np.searchsorted(cq, np.arange(len(q)))
            rank = np.arange(len(cq)) - starts[cq]
            take = rank < kk
            scores[cq[take], rank[take]] = cs[take]
            found[cq[take], rank[take]] = cl[take]
        return scores, found

    def _ann_params(self, kk, selector, ef_search, nprobe):
        if self.settings.ann == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(ef_search or self.settings.ef_search, kk)
        else:
            params = faiss.SearchParametersIVF()
            params.nprobe = min(nprobe or self._nprobe(), self._faiss.nlist)
        if selector is not None:
            params.sel = selector
        return params

    def _complete(self, q, kk, d, i, allowed):
        """Redo exactly the rows where the ANN search found fewer items than exist."""
        available = len(self._pos) if allowed is None else len(allowed)
        short = (i >= 0).sum(axis=1) < min(kk, available)
        if short.any():
            if allowed is None:
                allowed = np.flatnonzero(self._alive)
            d2, i2 = self._exact(q[short], kk, allowed)
            d[short], i[short] = d2, i2
        return d, i

    def _exact(self, q, kk, allowed):
        if self.settings.ann == "none" and len(allowed) == self._faiss.ntotal:
            return self._exact_all(q, kk)
        vectors = self._vectors_for(allowed)
        d, i = exact_knn(q, vectors, kk, method=self.settings.exact_method, max_item_norm=STORED_NORM_BOUND)
        return d, np.where(i >= 0, allowed[np.maximum(i, 0)], -1)

    def _exact_all(self, q, kk):
        """Exact search over every stored vector of a flat index (labels = rows)."""
        vectors = self._stored_vectors()
        method = self.settings.exact_method
        if resolve_exact_method(method, len(q), len(vectors), kk + TIE_MARGIN) == "bf16-rescored":
            if self._bf16_copy is None or len(self._bf16_copy) != len(vectors):
                self._bf16_copy = Bf16Items.from_vectors(vectors)
        return exact_knn(q, vectors, kk, method=method, bf16_items=self._bf16_copy, max_item_norm=STORED_NORM_BOUND)

    # -- persistence -------------------------------------------------------------------------------
    def _save(self, directory: Path) -> dict[str, Any]:
        if self._n_dead:
            self._rebuild_hnsw()
        index = self._faiss if self._faiss is not None else faiss.IndexFlatIP(self.dim)
        faiss.write_index(index, str(directory / VECTORS_FILE))
        np.save(directory / "ids.npy", self._ids, allow_pickle=False)
        np.save(directory / "alive.npy", self._alive, allow_pickle=False)
        for n, column in enumerate(self.filter_columns):
            np.save(directory / f"meta-{n}.npy", self._meta[column], allow_pickle=False)
        settings = asdict(self.settings)
        settings.pop("threads")
        return {"settings": settings, "trained": self._faiss is not None, "count": len(self)}

    @classmethod
    def _load(cls, directory: Path, config: dict[str, Any], **options: Any) -> "FaissIndex":
        settings = {**config["settings"], **{k: v for k, v in options.items() if v is not None}}
        index = cls(config["model"], int(config["dim"]), filter_columns=config["filter_columns"], **settings)
        build = {f: getattr(index.settings, f) for f in FaissSettings.BUILD_FIELDS}
        saved = {f: config["settings"].get(f) for f in FaissSettings.BUILD_FIELDS}
        if build != saved:
            raise ValueError(f"cannot change build settings when loading ({saved} saved, {build} asked); rebuild")
        if config.get("trained", True):
            index._faiss = faiss.read_index(str(directory / VECTORS_FILE))
            if index.settings.ann == "ivf":
                index._faiss.nprobe = index._nprobe()
            elif index.settings.ann == "hnsw":
                index._faiss.hnsw.efSearch = index.settings.ef_search
        if index._faiss is not None and index._faiss.d != index.dim:
            raise ValueError(f"{directory}: stored vectors are {index._faiss.d}-d, index.json says {index.dim}")
        index._ids = np.load(directory / "ids.npy", allow_pickle=False)
        index._alive = np.load(directory / "alive.npy", allow_pickle=False)
        index._meta = {c: np.load(directory / f"meta-{n}.npy", allow_pickle=False) for n, c in enumerate(index.filter_columns)}
        live = np.flatnonzero(index._alive)
        index._pos = dict(zip(index._ids[live].tolist(), live.tolist()))
        return index

    def _describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ann": self.settings.ann, "exact_method": self.settings.exact_method}
        if self.settings.ann == "hnsw":
            out.update(hnsw_m=self.settings.hnsw_m, ef_construction=self.settings.ef_construction, ef_search=self.settings.ef_search)
        elif self.settings.ann == "ivf" and self._faiss is not None:
            out.update(nlist=int(self._faiss.nlist), nprobe=self._nprobe())
        return out

    # -- build_index support -----------------------------------------------------------------------
    @classmethod
    def _from_embeddings(cls, embeddings, metadata: pd.DataFrame, *, cache_dir: Path, key: str, rebuild: bool, catalog=None, **config):
        settings = FaissSettings.from_config(config)
        scope = catalog.fingerprint() if catalog is not None else ""
        directory = Path(cache_dir) / f"index-faiss-{settings.ann}-{_short_hash(scope + settings.build_key() + ','.join(metadata.columns))}"
        search_settings = {k: v for k, v in asdict(settings).items() if k not in FaissSettings.BUILD_FIELDS}
        if not rebuild and (directory / "index.json").is_file():
            try:
                saved = json.loads((directory / "index.json").read_text())
                if saved.get("info", {}).get("fingerprint") == key:
                    index = cls.load(directory, **search_settings)
                    index.info["reused"] = True
                    return index
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                warnings.warn(f"rebuilding the index in {directory}: the saved one cannot be read ({exc})", stacklevel=3)
        index = cls(embeddings.model, embeddings.dim, filter_columns=list(metadata.columns), **asdict(settings))
        index.add(embeddings.ids, embeddings.vectors, metadata)
        index.info = {"fingerprint": key, "path": str(directory)}
        try:
            index.save(directory)
        except OSError as exc:
            warnings.warn(f"could not save the index to {directory} ({exc}); it will be rebuilt next time", stacklevel=3)
        index.info["reused"] = False
        return index


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _group_by_filter(filters: list[dict[str, str] | None] | None, n: int) -> list[tuple[dict[str, str] | None, np.ndarray]]:
    """Rows of the queries sharing each distinct filter (None: unfiltered)."""
    if filters is None:
        return [(None, np.arange(n))]
    keys = [None if f is None else tuple(sorted(f.items())) for f in filters]
    codes, uniques = pd.factorize(pd.Series(keys, dtype=object), use_na_sentinel=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    groups = []
    for rows in np.split(order, bounds):
        key = keys[rows[0]]
        groups.append((None if key is None else dict(key), rows))
    return groups


def _drop_excluded(ids: np.ndarray, scores: np.ndarray, exclude_ids: list[str | None], k: int):
    """From k+1 results per row drop the excluded id (or, if absent, the last result)."""
    excluded = np.asarray(["" if e is None else e for e in exclude_ids], dtype=str)
    hit = (ids == excluded[:, None]) & (excluded[:, None] != "")
    keep = ~hit
    keep[~hit.any(axis=1), -1] = False
    n = len(ids)
    return ids[keep].reshape(n, k), scores[keep].reshape(n, k)


__all__ = ["ANN_KINDS", "FaissIndex", "FaissSettings", "default_threads", "omp_threads"]
