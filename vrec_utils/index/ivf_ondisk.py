"""IVF indexes that do not fit in RAM: trained on a sample, filled shard by shard, merged on disk,
searched memory-mapped.

The recipe is FAISS's own (``faiss.contrib.ondisk``): one trained, empty IVF index is copied to
every shard, each shard adds its vectors (in parallel: threads here, Ray tasks on a cluster), and
:func:`faiss.contrib.ondisk.merge_ondisk` concatenates the shards' inverted lists into one
``lists.ivfdata`` file. A search reads the index with ``IO_FLAG_MMAP``: the codes stay on disk and
only the lists a query probes are paged in, so resident memory is the coarse quantizer plus what
the OS keeps cached.

Re-ranking (``refine``, on by default): SQ8/PQ scores are approximate, and among near-duplicate
items (many listings of one product) they misorder the top of the list while every probed list
already holds the right items (recall flat in nprobe: 0.914 at 10M vectors, 0.962 at 2M). So the
build also writes the float32 vectors to ``vectors.f32`` in label order, and a search takes
``refine_factor`` x k candidates from the codes and orders them by their exact inner products,
read from disk by row (``pread``): only the candidates' rows are read (disk: 4 x dim bytes per vector).

Which IVF: :func:`plan_ivf` picks the code from a memory budget the way autofaiss does: SQ8 (one
byte per dimension, recall close to flat) when the codes fit the budget, else PQ with the most
bytes per vector that fit; ``nlist`` ~ 4 sqrt(n) lists (a power of two), with an HNSW coarse
quantizer when the lists are many (a flat one scans every centroid per query).

The registered index backend ``ivf-ondisk`` (:class:`IvfOnDiskIndex`, at the end of this module)
puts this behind the one index interface: ``vrec index --backend ivf-ondisk --memory-budget 4G``
builds it from the embedding cache (saved next to it, with the catalog's fingerprint and the
model's identity; another catalog's index is rebuilt, never served), ``vrec search`` and
``vrec evaluate --backend ivf-ondisk [--sample-queries N]`` search through it.

Layout of an index folder::

    trained.index      the empty trained index (kept: more shards can be filled later)
    shard-NNNNN.index  one shard's lists (removed after the merge unless keep_shards)
    populated.index    the merged index; its lists live in lists.ivfdata
    lists.ivfdata      the inverted lists (codes + int64 labels), memory-mapped
    ids.npy            label -> item id (labels are row numbers over all shards, in shard order)
    vectors.f32        the float32 vectors in label order (with ``refine``), memory-mapped for re-ranking
    ondisk.json        plan, counts, build seconds
    index.json, meta-N.npy   a saved ``ivf-ondisk`` backend: settings, provenance, filter labels
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from faiss.contrib.ondisk import merge_ondisk

from .base import INDEX_CONFIG, IndexBackendError, VectorIndex, register_index
from .exact import neighbour_recall
from .faiss_index import _drop_excluded, _group_by_filter, omp_threads

TRAINED = "trained.index"
POPULATED = "populated.index"
IVFDATA = "lists.ivfdata"
IDS = "ids.npy"
CONFIG = "ondisk.json"
VECTORS = "vectors.f32"
REFINE_FACTOR = 4  # candidates per result re-ranked by exact inner product
HNSW_COARSE_FROM = 16_384  # lists from which a flat coarse quantizer costs more than HNSW's search
ID_BYTES = 8  # every IVF entry stores an int64 label next to its code


@dataclass(frozen=True)
class IvfPlan:
    """What to build: ``factory`` is a FAISS index_factory string (inner product metric)."""

    dim: int
    nlist: int
    code: str  # "SQ8" or "PQ<m>"
    coarse: str  # "flat" or "hnsw32"
    nprobe: int
    bytes_per_vector: int

    @property
    def factory(self) -> str:
        coarse = f"IVF{self.nlist}" if self.coarse == "flat" else f"IVF{self.nlist}_HNSW32"
        return f"{coarse},{self.code}"

    def index_bytes(self, n: int) -> int:
        """Inverted lists for ``n`` vectors plus the centroids."""
        return n * (self.bytes_per_vector + ID_BYTES) + self.nlist * self.dim * 4


def plan_ivf(n: int, dim: int, memory_budget: int, nlist: int | None = None, nprobe: int | None = None) -> IvfPlan:
    """The IVF for ``n`` vectors of ``dim`` whose lists fit ``memory_budget`` bytes: SQ8 if it
    fits, else PQ with the largest number of sub-quantizers (bytes per vector) that fits.
    Raises ValueError naming the budget when not even the smallest PQ code fits."""
    if n < 1 or dim < 1:
        raise ValueError(f"need n >= 1 and dim >= 1, got n={n}, dim={dim}")
    if nlist is None:
        nlist = max(1, min(n // 39 or 1, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))))  # >= 39 training points per list
    coarse = "hnsw32" if nlist >= HNSW_COARSE_FROM else "flat"
    nprobe = min(nprobe, nlist) if nprobe else max(1, min(nlist, nlist // 16 or 1, 256))
    candidates = [("SQ8", dim)] + [(f"PQ{m}", m) for m in sorted((m for m in range(1, dim + 1) if dim % m == 0 and m <= 128), reverse=True)]
    for code, nbytes in candidates:
        plan = IvfPlan(dim, nlist, code, coarse, nprobe, nbytes)
        if plan.index_bytes(n) <= memory_budget:
            return plan
    smallest = IvfPlan(dim, nlist, candidates[-1][0], coarse, nprobe, candidates[-1][1])
    raise ValueError(f"memory budget {memory_budget:,} bytes is below the smallest IVF for {n:,} x {dim} vectors ({smallest.index_bytes(n):,} bytes); raise --memory-budget")


def train(plan: IvfPlan, sample: np.ndarray, directory: str | os.PathLike, seed: int = 0) -> Path:
    """Train ``plan`` on ``sample`` (L2-normalised float32 rows) and save the empty index."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if len(sample) < plan.nlist:
        raise ValueError(f"training sample has {len(sample)} vectors, fewer than the {plan.nlist} lists")
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = seed  # coarse k-means; PQ's own training is seeded by FAISS
    index.train(sample)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TRAINED
    faiss.write_index(index, str(path))
    return path


def fill_shard(trained_path: str, vectors: np.ndarray, first_label: int, out_path: str) -> str:
    """One shard: the trained index with ``vectors`` added under labels ``first_label, ...``."""
    index = faiss.read_index(trained_path)
    labels = np.arange(first_label, first_label + len(vectors), dtype=np.int64)
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), labels)
    tmp = f"{out_path}.tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, out_path)
    return out_path


def build(
    plan: IvfPlan,
    shards: Iterable[tuple[Sequence[str] | None, np.ndarray]],
    directory: str | os.PathLike,
    *,
    sample: np.ndarray,
    parallel: str = "threads",
    workers: int = 2,
    keep_shards: bool = False,
    seed: int = 0,
    refine: bool = True,
) -> OnDiskIvfIndex:
    """Train on ``sample``, fill one index per shard (``parallel``: ``"threads"`` or ``"ray"``,
    the Ray cluster this process has joined), merge them on disk and open the result. A shard's
    ids may be None: its items are then named by their row number over all shards. ``refine``:
    keep the float32 vectors on disk for exact re-ranking (see the module)."""
    start = time.perf_counter()
    directory = Path(directory)
    trained = str(train(plan, sample, directory, seed=seed))
    fill = _ray_filler(trained) if parallel == "ray" else None
    ids: list[np.ndarray] = []
    pending = []
    first = 0
    raw = directory / f"{VECTORS}.tmp"
    with ThreadPoolExecutor(max_workers=workers) as pool, (open(raw, "wb") if refine else contextlib.nullcontext()) as raw_file:
        for n, (shard_ids, vectors) in enumerate(shards):
            out = str(directory / f"shard-{n:05d}.index")
            args = (trained, np.ascontiguousarray(vectors, dtype=np.float32), first, out)
            if raw_file is not None:
                raw_file.write(args[1].tobytes())  # label order: shards arrive in label order
            pending.append(fill(*args) if fill else pool.submit(fill_shard, *args))
            ids.append(np.arange(first, first + len(vectors)).astype(str) if shard_ids is None else np.asarray(shard_ids, dtype=str))
            first += len(vectors)
        shard_paths = _gather(pending, parallel)
    merge(directory, shard_paths, np.concatenate(ids) if ids else np.asarray([], dtype=str), plan, keep_shards=keep_shards)
    config = json.loads((directory / CONFIG).read_text())
    (directory / VECTORS).unlink(missing_ok=True)
    if refine:
        os.replace(raw, directory / VECTORS)
        config["refine"] = {"file": VECTORS, "dtype": "float32", "factor": REFINE_FACTOR}
    config["build_seconds"] = round(time.perf_counter() - start, 3)
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return OnDiskIvfIndex.open(directory)


def _ray_filler(trained: str) -> Callable:
    import ray  # optional extra: only a Ray build needs it

    remote = ray.remote(num_cpus=1)(fill_shard)
    return lambda *args: remote.remote(*args)


def _gather(pending: list, parallel: str) -> list[str]:
    if parallel == "ray":
        import ray  # optional extra: only a Ray build needs it

        return list(ray.get(pending))
    return [f.result() for f in pending]


def merge(directory: Path, shard_paths: list[str], ids: np.ndarray, plan: IvfPlan, *, keep_shards: bool = False) -> None:
    """Merge the shards' lists into ``lists.ivfdata`` and write ``populated.index``."""
    index = faiss.read_index(str(directory / TRAINED))
    ivfdata = directory / IVFDATA
    ivfdata.unlink(missing_ok=True)
    merge_ondisk(index, shard_paths, str(ivfdata))
    if index.ntotal != len(ids):
        raise RuntimeError(f"merged {index.ntotal} vectors for {len(ids)} ids")
    faiss.write_index(index, str(directory / POPULATED))
    np.save(directory / IDS, ids, allow_pickle=False)
    config = {"plan": asdict(plan), "factory": plan.factory, "count": int(index.ntotal), "shards": len(shard_paths)}
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    if not keep_shards:
        for path in shard_paths:
            Path(path).unlink(missing_ok=True)


class OnDiskIvfIndex:
    """A merged on-disk IVF, memory-mapped: ``search`` gives item ids and inner products."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, config: dict, vectors: RowFile | np.ndarray | None = None) -> None:
        self.index = index
        self.ids = ids
        self.config = config
        self.nprobe = int(config["plan"]["nprobe"])
        self.vectors = vectors  # float32 rows in label order (read from disk) when built with refine
        self.refine_factor = int(config["refine"]["factor"]) if vectors is not None else 1

    @classmethod
    def open(cls, directory: str | os.PathLike) -> OnDiskIvfIndex:
        directory = Path(directory)
        config = json.loads((directory / CONFIG).read_text())
        # the lists file is named relative to the folder it was written in: open from there
        index = faiss.read_index(str(directory / POPULATED), faiss.IO_FLAG_ONDISK_SAME_DIR)
        vectors = None
        if config.get("refine"):
            path = directory / config["refine"]["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the index was built with refine; rebuild it (vrec index --rebuild)")
            vectors = RowFile(path, int(config["count"]), index.d)
        return cls(index, np.load(directory / IDS, mmap_mode="r", allow_pickle=False), config, vectors)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def name(self) -> str:
        refined = f", re-ranked x{self.refine_factor} exact" if self.vectors is not None else ""
        return f"on-disk {self.config['factory']} (nprobe {self.nprobe}{refined})"

    def search_labels(
        self, queries: np.ndarray, k: int, nprobe: int | None = None, selector: faiss.IDSelector | None = None,
        refine_factor: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(scores, labels) of the ``k`` best; ``selector`` keeps only the labels it selects. With
        the vectors on disk, ``refine_factor`` x k candidates are re-ranked by exact inner product
        (default: the build's factor; 1 turns it off)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = faiss.SearchParametersIVF(nprobe=min(nprobe or self.nprobe, self.nlist))
        if selector is not None:
            params.sel = selector
        factor = self.refine_factor if refine_factor is None else int(refine_factor)
        if self.vectors is None or factor <= 1:
            return self.index.search(queries, k, params=params)
        _, labels = self.index.search(queries, k * factor, params=params)
        return rerank(queries, labels, self.vectors, k)

    @property
    def nlist(self) -> int:
        return int(self.config["plan"]["nlist"])

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids ``(n, k)`` str, '' where fewer than k found; scores ``(n, k)`` float32)."""
        scores, labels = self.search_labels(queries, k, nprobe)
        ids = np.where(labels >= 0, np.asarray(self.ids)[np.clip(labels, 0, None)], "")
        return ids, scores


class RowFile:
    """Float32 rows of a file on disk, read with ``pread`` by row number: re-ranking reads scattered
    rows, and a memory map would count every page it faults in (plus the kernel's fault-around,
    16 pages each) as the process's resident memory: 5.6 GB after 1,000 queries at 10M vectors with
    ``MADV_RANDOM``, against 3.4 GB for the codes alone. Read pages stay in the OS page cache."""

    def __init__(self, path: Path, count: int, dim: int) -> None:
        self.path, self.shape = Path(path), (count, dim)
        expected = count * dim * 4
        if self.path.stat().st_size != expected:
            raise ValueError(f"{self.path} holds {self.path.stat().st_size:,} bytes, not {count:,} x {dim} float32 ({expected:,}); rebuild the index")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        row_bytes = self.shape[1] * 4
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for n, row in enumerate(rows.tolist()):
                out[n] = np.frombuffer(os.pread(fd, row_bytes, row * row_bytes), dtype=np.float32)
        finally:
            os.close(fd)
        return out


def rerank(queries: np.ndarray, labels: np.ndarray, vectors: RowFile | np.ndarray, k: int, chunk_bytes: int = 64 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` of each row's candidate ``labels`` (-1: none) with the highest exact inner product
    with its query, read from ``vectors`` (rows by label): (scores, labels), best first. Queries go
    in chunks whose gathered candidate rows stay under ``chunk_bytes``."""
    n, width = labels.shape
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    found = np.full((n, k), -1, dtype=np.int64)
    step = max(1, chunk_bytes // max(1, width * vectors.shape[1] * 4))
    for begin in range(0, n, step):
        cand = labels[begin : begin + step]
        valid = cand >= 0
        unique, inverse = np.unique(cand[valid], return_inverse=True)  # sorted: the file is read in order
        rows = np.zeros(cand.shape + (vectors.shape[1],), dtype=np.float32)
        rows[valid] = np.asarray(vectors[unique])[inverse]
        exact = np.einsum("nkd,nd->nk", rows, queries[begin : begin + step])
        exact[~valid] = -np.inf
        best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(exact, best, axis=1)
        scores[begin : begin + step, : top.shape[1]] = top
        found[begin : begin + step, : top.shape[1]] = np.where(np.isfinite(top), np.take_along_axis(cand, best, axis=1), -1)
    return scores, found


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k labels that ``found`` (same shape) also returned."""
    return float(neighbour_recall(found, exact).mean())


# ================================================================================ the index backend
DEFAULT_MEMORY_BUDGET = 4 * 2**30  # bytes of inverted lists (codes + labels); `vrec index --memory-budget`
SHARD_ROWS = 250_000  # vectors per shard: one shard's float32 copy is at most ~1 GB at 1024-d
TRAIN_PER_LIST = 64  # k-means training points per list (faiss warns under 39)
TRAIN_MIN = 20_000  # PQ trains 256 centroids per sub-quantizer: a floor for small nlist


@register_index("ivf-ondisk")
class IvfOnDiskIndex(VectorIndex):
    """On-disk IVF (SQ8 or PQ, sized by a memory budget), searched memory-mapped: caches over RAM.

    Built once, from every vector at once (:meth:`add` on an empty index): trained on a seeded
    sample, filled in shards of ``shard_rows`` (threads, or Ray tasks with ``parallel="ray"``),
    merged on disk in ``directory`` (a temporary folder, removed with the index, when None).
    Adding to or deleting from a built index is refused: rebuild it (``vrec index --rebuild``).

    Filters run inside FAISS: an ``IDSelectorBitmap`` over the labels of the allowed items makes
    the IVF scan skip the others, so the ``k`` results are the best allowed items of the probed
    lists; a row that finds fewer than ``k`` there (a rare label) is searched again over every
    list, so it gets ``k`` results whenever ``k`` allowed items exist. ``exclude_ids``: k + 1
    results, the excluded one dropped. Scores are exact inner products (candidates re-ranked from the
    float32 vectors kept on disk, ``refine=True``, the default) or the codes' approximate ones.
    """

    supports_filters = True
    search_options = ("nprobe",)
    read_only = True
    #: ``vrec evaluate`` searches the index ``vrec index`` saved (when it matches) instead of building one
    evaluation_reuses_saved = True
    SETTINGS = ("memory_budget", "nlist", "nprobe", "shard_rows", "workers", "parallel", "seed", "threads", "refine")
    BUILD_SETTINGS = ("memory_budget", "nlist", "seed", "refine")

    def __init__(
        self, model: str, dim: int, filter_columns=None, *, memory_budget: int = DEFAULT_MEMORY_BUDGET,
        nlist: int | None = None, nprobe: int | None = None, shard_rows: int = SHARD_ROWS, workers: int = 2,
        parallel: str = "threads", seed: int = 0, threads: int | None = None, directory: str | os.PathLike | None = None,
        refine: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(model, dim, filter_columns)
        for name, value in (("memory_budget", memory_budget), ("shard_rows", shard_rows), ("workers", workers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("nlist", nlist), ("nprobe", nprobe), ("threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if parallel not in ("threads", "ray"):
            raise ValueError(f"parallel must be 'threads' or 'ray', got {parallel!r}")
        self.settings = {"memory_budget": int(memory_budget), "nlist": nlist, "nprobe": nprobe, "shard_rows": int(shard_rows),
                         "workers": int(workers), "parallel": parallel, "seed": int(seed), "threads": threads,
                         "refine": bool(refine)}  # fmt: skip
        self.directory = Path(directory) if directory is not None else None
        self._ondisk: OnDiskIvfIndex | None = None
        self._meta: dict[str, np.ndarray] = {}
        self._allowed: np.ndarray | None = None  # label mask set by restrict_to

    # -- build -------------------------------------------------------------------------------------
    def _add(self, ids: np.ndarray, vectors: np.ndarray, metadata: dict[str, np.ndarray]) -> None:
        if self._ondisk is not None:
            raise IndexBackendError(
                f"the ivf-ondisk index of {self.model} is built once from every vector; adding items means "
                "rebuilding it (vrec index --backend ivf-ondisk --rebuild)"
            )
        s = self.settings
        plan = plan_ivf(len(ids), self.dim, s["memory_budget"], s["nlist"], s["nprobe"])
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="vrec-ivf-ondisk-"))
            weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        rows = min(len(ids), max(TRAIN_MIN, TRAIN_PER_LIST * plan.nlist))
        picked = np.sort(np.random.default_rng(s["seed"]).choice(len(ids), rows, replace=False))
        step = s["shard_rows"]
        shards = ((ids[b : b + step], vectors[b : b + step]) for b in range(0, len(ids), step))
        with omp_threads(s["threads"]):
            self._ondisk = build(plan, shards, self.directory, sample=np.asarray(vectors[picked]), parallel=s["parallel"], workers=s["workers"], seed=s["seed"], refine=s["refine"])
        self._meta = {c: np.asarray(metadata[c], dtype=str) for c in self.filter_columns}

    def restrict_to(self, ids) -> None:
        """Answer every later search from ``ids`` only (e.g. the candidates of an evaluation
        searched against a saved index that holds more items); ``None`` lifts it. KeyError naming
        ids the index does not hold."""
        if ids is None:
            self._allowed = None
            return
        if self._ondisk is None:
            raise IndexBackendError("an empty ivf-ondisk index cannot be restricted; add the vectors first")
        positions = pd.Index(np.asarray(self._ondisk.ids)).get_indexer(np.asarray(ids, dtype=str))
        if (positions < 0).any():
            missing = np.asarray(ids, dtype=str)[positions < 0]
            raise KeyError(f"{len(missing)} id(s) not in the ivf-ondisk index of {self.model}, e.g. {', '.join(missing[:5])}")
        allowed = np.zeros(len(self._ondisk), dtype=bool)
        allowed[positions] = True
        self._allowed = allowed

    def _delete(self, ids: np.ndarray) -> None:
        raise IndexBackendError(f"the ivf-ondisk index of {self.model} is read-only once built; rebuild it without those items")

    def _count(self) -> int:
        return 0 if self._ondisk is None else len(self._ondisk)

    # -- search ------------------------------------------------------------------------------------
    def _search(self, queries, k, filters, exclude_ids, *, nprobe=None):
        n = len(queries)
        kk = k + (1 if exclude_ids is not None else 0)
        labels = np.full((n, kk), -1, dtype=np.int64)
        scores = np.full((n, kk), -np.inf, dtype=np.float32)
        if self._ondisk is not None:
            with omp_threads(self.settings["threads"]):
                for flt, rows in _group_by_filter(filters, n):
                    scores[rows], labels[rows] = self._search_group(queries[rows], kk, flt, nprobe)
        ids = np.where(labels >= 0, np.asarray(self._ondisk.ids)[np.maximum(labels, 0)] if self._ondisk is not None else "", "")
        scores[labels < 0] = -np.inf
        if exclude_ids is not None:
            ids, scores = _drop_excluded(ids, scores, exclude_ids, k)
        return ids, scores

    def _search_group(self, q, kk, flt, nprobe):
        ondisk, selector, bits = self._ondisk, None, None
        available = len(ondisk)
        mask = None if self._allowed is None else self._allowed.copy()
        if flt is not None:
            mask = np.ones(available, dtype=bool) if mask is None else mask
            for column, value in flt.items():
                mask &= self._meta[column] == value
        if mask is not None:
            available = int(mask.sum())
            if available == 0:
                return np.full((len(q), kk), -np.inf, np.float32), np.full((len(q), kk), -1, np.int64)
            bits = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
        d, i = ondisk.search_labels(q, kk, nprobe, selector)
        short = (i >= 0).sum(axis=1) < min(kk, available)
        if short.any():  # too few (allowed) items in the probed lists: probe every list
            d[short], i[short] = ondisk.search_labels(q[short], kk, ondisk.nlist, selector)
        del selector, bits
        return d, i

    # -- persistence -------------------------------------------------------------------------------
    def _save(self, directory: Path) -> dict:
        if self._ondisk is None:
            raise IndexBackendError("an empty ivf-ondisk index has nothing to save; add the vectors first")
        for name in (TRAINED, POPULATED, IVFDATA, IDS, CONFIG, VECTORS):
            if name != VECTORS or (self.directory / name).is_file():
                _link_or_copy(self.directory / name, directory / name)  # a hard link: lists.ivfdata may be GBs
        for n, column in enumerate(self.filter_columns):
            np.save(directory / f"meta-{n}.npy", self._meta[column], allow_pickle=False)
        settings = {k: v for k, v in self.settings.items() if k != "threads"}
        return {"settings": settings, "count": len(self), "ondisk": self._ondisk.config}

    @classmethod
    def _load(cls, directory: Path, config: dict, **options) -> IvfOnDiskIndex:
        unknown = sorted(set(options) - {"nprobe", "threads"})
        if unknown:
            raise ValueError(f"a saved ivf-ondisk index takes only search settings (nprobe, threads) when loaded, not {', '.join(unknown)}; rebuild to change the others")
        settings = {**config["settings"], **{k: v for k, v in options.items() if v is not None}}
        index = cls(config["model"], int(config["dim"]), filter_columns=config["filter_columns"], directory=directory, **settings)
        index._ondisk = OnDiskIvfIndex.open(directory)
        if index.settings["nprobe"]:
            index._ondisk.nprobe = min(int(index.settings["nprobe"]), index._ondisk.nlist)
        if index._ondisk.index.d != index.dim:
            raise ValueError(f"{directory}: the index holds {index._ondisk.index.d}-d vectors, index.json says {index.dim}")
        index._meta = {c: np.load(directory / f"meta-{n}.npy", allow_pickle=False) for n, c in enumerate(index.filter_columns)}
        return index

    def _describe(self) -> dict:
        out = {"memory_budget": self.settings["memory_budget"]}
        if self._ondisk is not None:
            plan = self._ondisk.config["plan"]
            out.update(factory=self._ondisk.config["factory"], nlist=plan["nlist"], nprobe=self._ondisk.nprobe,
                       code=plan["code"], coarse=plan["coarse"], lists_bytes=IvfPlan(**plan).index_bytes(len(self)),
                       build_seconds=self._ondisk.config.get("build_seconds"),
                       refine_factor=self._ondisk.refine_factor if self._ondisk.vectors is not None else None)  # fmt: skip
        return out

    # -- build_index support -----------------------------------------------------------------------
    @classmethod
    def _from_embeddings(cls, embeddings, metadata, *, cache_dir: Path, key: str, rebuild: bool, catalog=None, **config):
        """Saved next to the embedding cache, named by the catalog's fingerprint and the build
        settings; reused only while its fingerprint (model identity, ids, vectors, labels) is the
        embeddings' own: an index of another catalog or model is rebuilt, never served."""
        probe = cls(embeddings.model, embeddings.dim, filter_columns=list(metadata.columns), **config)
        scope = catalog.fingerprint() if catalog is not None else ""
        build_key = json.dumps({k: probe.settings[k] for k in cls.BUILD_SETTINGS}, sort_keys=True)
        digest = hashlib.sha256((scope + build_key + ",".join(metadata.columns)).encode()).hexdigest()[:10]
        directory = Path(cache_dir) / f"index-ivf-ondisk-{digest}"
        search = {k: config[k] for k in ("nprobe", "threads") if config.get(k) is not None}
        if not rebuild and (directory / INDEX_CONFIG).is_file():
            try:
                saved = json.loads((directory / INDEX_CONFIG).read_text())
                if saved.get("info", {}).get("fingerprint") == key and saved.get("info", {}).get("catalog") == scope:
                    index = cls.load(directory, **search)
                    index.info["reused"] = True
                    return index
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                warnings.warn(f"rebuilding the index in {directory}: the saved one cannot be read ({exc})", stacklevel=3)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        workspace = Path(tempfile.mkdtemp(prefix=".ivf-build-", dir=cache_dir))  # same disk as the index: hard links
        try:
            building = cls(embeddings.model, embeddings.dim, filter_columns=list(metadata.columns), directory=workspace, **config)
            building.add(embeddings.ids, embeddings.vectors, metadata)
            building.info = {"fingerprint": key, "catalog": scope, "model": embeddings.model,
                             "identity": embeddings.manifest.get("identity"), "path": str(directory)}  # fmt: skip
            building.save(directory)
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        index = cls.load(directory, **search)
        index.info["reused"] = False
        return index


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
