"""IVF indexes that do not fit in RAM: trained on a sample, filled shard by shard, merged on disk,
searched memory-mapped.

The recipe is FAISS's own (``faiss.contrib.ondisk``): one trained, empty IVF index is copied to
every shard, each shard adds its vectors (in parallel: threads here, Ray tasks on a cluster), and
:func:`faiss.contrib.ondisk.merge_ondisk` concatenates the shards' inverted lists into one
``lists.ivfdata`` file. A search reads the index with ``IO_FLAG_MMAP``: the codes stay on disk and
only the lists a query probes are paged in, so resident memory is the coarse quantizer plus what
the OS keeps cached.

Which IVF: :func:`plan_ivf` picks the code from a memory budget the way autofaiss does: SQ8 (one
byte per dimension, recall close to flat) when the codes fit the budget, else PQ with the most
bytes per vector that fit; ``nlist`` ~ 4 sqrt(n) lists (a power of two), with an HNSW coarse
quantizer when the lists are many (a flat one scans every centroid per query).

Layout of an index folder::

    trained.index      the empty trained index (kept: more shards can be filled later)
    shard-NNNNN.index  one shard's lists (removed after the merge unless keep_shards)
    populated.index    the merged index; its lists live in lists.ivfdata
    lists.ivfdata      the inverted lists (codes + int64 labels), memory-mapped
    ids.npy            label -> item id (labels are row numbers over all shards, in shard order)
    ondisk.json        plan, counts, build seconds
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from .exact import neighbour_recall

TRAINED = "trained.index"
POPULATED = "populated.index"
IVFDATA = "lists.ivfdata"
IDS = "ids.npy"
CONFIG = "ondisk.json"
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
    nprobe = nprobe or max(1, min(nlist, nlist // 16 or 1, 256))
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
) -> OnDiskIvfIndex:
    """Train on ``sample``, fill one index per shard (``parallel``: ``"threads"`` or ``"ray"``,
    the Ray cluster this process has joined), merge them on disk and open the result. A shard's
    ids may be None: its items are then named by their row number over all shards."""
    start = time.perf_counter()
    directory = Path(directory)
    trained = str(train(plan, sample, directory, seed=seed))
    fill = _ray_filler(trained) if parallel == "ray" else None
    ids: list[np.ndarray] = []
    pending = []
    first = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for n, (shard_ids, vectors) in enumerate(shards):
            out = str(directory / f"shard-{n:05d}.index")
            args = (trained, np.asarray(vectors, dtype=np.float32), first, out)
            pending.append(fill(*args) if fill else pool.submit(fill_shard, *args))
            ids.append(np.arange(first, first + len(vectors)).astype(str) if shard_ids is None else np.asarray(shard_ids, dtype=str))
            first += len(vectors)
        shard_paths = _gather(pending, parallel)
    merge(directory, shard_paths, np.concatenate(ids) if ids else np.asarray([], dtype=str), plan, keep_shards=keep_shards)
    config = json.loads((directory / CONFIG).read_text())
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

    def __init__(self, index: faiss.Index, ids: np.ndarray, config: dict) -> None:
        self.index = index
        self.ids = ids
        self.config = config
        self.nprobe = int(config["plan"]["nprobe"])

    @classmethod
    def open(cls, directory: str | os.PathLike) -> OnDiskIvfIndex:
        directory = Path(directory)
        config = json.loads((directory / CONFIG).read_text())
        # the lists file is named relative to the folder it was written in: open from there
        index = faiss.read_index(str(directory / POPULATED), faiss.IO_FLAG_ONDISK_SAME_DIR)
        return cls(index, np.load(directory / IDS, mmap_mode="r", allow_pickle=False), config)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def name(self) -> str:
        return f"on-disk {self.config['factory']} (nprobe {self.nprobe})"

    def search_labels(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersIVF(nprobe=nprobe or self.nprobe)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids ``(n, k)`` str, '' where fewer than k found; scores ``(n, k)`` float32)."""
        scores, labels = self.search_labels(queries, k, nprobe)
        ids = np.where(labels >= 0, np.asarray(self.ids)[np.clip(labels, 0, None)], "")
        return ids, scores


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k labels that ``found`` (same shape) also returned."""
    return float(neighbour_recall(found, exact).mean())
