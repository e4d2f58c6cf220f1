"""Part 1: quality against cost. Reduced and quantised variants of each model's cached vectors,
searched leave-one-out, scored with nDCG@5, priced in bytes per item and query latency.

Variants (all fitted on the training vectors of :class:`~vrec_utils.decision.data.DecisionData`):

* ``float32``: the vectors as cached (4 bytes per dimension);
* ``pca<d>``: PCA to d dimensions, re-normalised (:func:`vrec_utils.evaluation.candidates.pca_vectors`,
  sklearn); Mercari's production baseline was the 128-d PCA of a CNN;
* ``trunc<d>``: the first d dimensions, re-normalised, only for models trained to allow it
  (nested / Matryoshka training; none of the registered models is);
* ``int8`` / ``int4``: FAISS scalar quantisers (``IndexScalarQuantizer`` QT_8bit / QT_4bit, one
  range per dimension), the family behind Elasticsearch's ``int8_hnsw`` / ``int4_hnsw``; queries
  stay float (asymmetric search, as both do);
* ``pq``: FAISS product quantisation (``IndexPQ``, d/8 sub-vectors of 8 bits, fewer bits when the
  training set is small);
* ``binary``: one sign bit per dimension after centring on the training mean (as BBQ centres on
  a centroid), searched by Hamming distance like ``IndexBinaryFlat``; ``binary+rerank`` rescores
  its top ``oversample * k`` with the float vectors (the way ``bbq_hnsw`` rescores).

Latency is measured on the FAISS index of each family (a batch of queries, ms per query, this
CPU); it is a measurement and varies between runs, unlike every quality number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd

from ..evaluation.candidates import pca_vectors, unit_rows
from .data import DecisionData, seeded_rows

DEFAULT_PCA_DIMS = (32, 64, 128, 256)
QUANTISERS = ("int8", "int4", "pq", "binary", "binary+rerank")
DEFAULT_OVERSAMPLE = 3  # Elasticsearch's default rescore oversample for bbq (9.1+)
SQ_TYPES = {"int8": faiss.ScalarQuantizer.QT_8bit, "int4": faiss.ScalarQuantizer.QT_4bit}


@dataclass
class Variant:
    """One way of storing a model's vectors: what the queries and the stored side look like."""

    model: str
    name: str  # float32, pca128, int8, binary+rerank, ...
    family: str  # float, pca, truncation, scalar, pq, binary
    dims: int
    bytes_per_item: float
    queries: np.ndarray
    database: np.ndarray
    rerank: np.ndarray | None = None  # float vectors that rescore the top candidates
    oversample: int = 1
    description: str = ""
    trained: object | None = None  # the trained FAISS index (PQ), reused to measure latency


def scalar_quantised(train: np.ndarray, vectors: np.ndarray, kind: str) -> tuple[np.ndarray, int]:
    """Decoded vectors after a FAISS scalar quantiser (``int8``/``int4``) trained on ``train``,
    and its code size in bytes."""
    sq = faiss.ScalarQuantizer(vectors.shape[1], SQ_TYPES[kind])
    sq.train(np.ascontiguousarray(train, dtype=np.float32))
    codes = sq.compute_codes(np.ascontiguousarray(vectors, dtype=np.float32))
    return sq.decode(codes), int(sq.code_size)


PQ_POINTS_PER_CENTROID = 39  # FAISS's k-means warns below 39 training points per centroid


def pq_params(dim: int, n_train: int) -> tuple[int, int]:
    """(sub-vectors M, bits per code): the largest M <= d/8 dividing d, and 8 bits unless the
    training set has fewer than 39 points per centroid (then fewer bits: 2**bits centroids)."""
    m = max(x for x in range(1, max(1, dim // 8) + 1) if dim % x == 0)
    nbits = int(min(8, max(1, np.floor(np.log2(max(2, n_train / PQ_POINTS_PER_CENTROID))))))
    return m, nbits


def product_quantised(train: np.ndarray, vectors: np.ndarray, seed: int) -> tuple[np.ndarray, int, str, faiss.IndexPQ]:
    """Decoded vectors after FAISS ``IndexPQ`` trained on ``train``; code size; description; the index."""
    m, nbits = pq_params(vectors.shape[1], len(train))
    index = faiss.IndexPQ(vectors.shape[1], m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.seed = int(seed)
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    codes = index.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))
    return index.sa_decode(codes), int(index.code_size), f"PQ{m}x{nbits}", index


def sign_codes(train: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """+-1 per dimension: the sign of each vector minus the training mean (float32, so that the
    inner product of two codes is d - 2 * Hamming distance, exactly)."""
    centred = vectors - train.mean(axis=0, dtype=np.float64).astype(np.float32)
    return np.where(centred > 0, 1.0, -1.0).astype(np.float32)


def model_variants(data: DecisionData, model: str, pca_dims=DEFAULT_PCA_DIMS, quantisers=QUANTISERS,
                   truncate: bool = False, oversample: int = DEFAULT_OVERSAMPLE) -> list[Variant]:
    """Every variant of ``model`` (dimension choices first, then quantisers of the full vectors)."""
    x, train, d = data.vectors[model], data.train[model], data.dim(model)
    out = [Variant(model, "float32", "float", d, 4.0 * d, x, x, description="vectors as cached, exact search")]
    dims = [p for p in pca_dims if p < d and p <= len(train)]
    if dims:
        for p, reduced in pca_vectors(train, x, dims, data.seed, data.ids).items():
            out.append(Variant(model, f"pca{p}", "pca", p, 4.0 * p, reduced, reduced, description=f"PCA to {p} dims (sklearn), float32"))
    if truncate:
        for p in (p for p in pca_dims if p < d):
            cut = unit_rows(x[:, :p], f"{model}-trunc{p}", data.ids)
            out.append(Variant(model, f"trunc{p}", "truncation", p, 4.0 * p, cut, cut, description=f"first {p} dims, float32"))
    for kind in quantisers:
        if kind in SQ_TYPES:
            decoded, size = scalar_quantised(train, x, kind)
            out.append(Variant(model, kind, "scalar", d, size, x, decoded, description=f"FAISS ScalarQuantizer QT_{kind[3:]}bit, float queries"))
        elif kind == "pq":
            decoded, size, what, trained = product_quantised(train, x, data.seed)
            out.append(Variant(model, "pq", "pq", d, size, x, decoded, description=f"FAISS IndexPQ {what}, float queries", trained=trained))
        elif kind in ("binary", "binary+rerank"):
            codes = sign_codes(train, x)
            rerank = kind == "binary+rerank"
            out.append(Variant(model, kind, "binary", d, d / 8.0, codes, codes, rerank=x if rerank else None,
                               oversample=oversample if rerank else 1,
                               description="centred sign bits, Hamming distance" + (f", top {oversample}k rescored in float32" if rerank else "")))
        else:
            raise ValueError(f"unknown quantiser {kind!r}; known: {', '.join(QUANTISERS)}")
    return out


def search_variant(data: DecisionData, variant: Variant, filtered: bool = False, k: int | None = None) -> np.ndarray:
    """Leave-one-out top-k positions of ``variant`` (the query never its own result)."""
    k = k or data.k
    rerank = (variant.rerank, variant.oversample * k) if variant.rerank is not None else None
    return data.search(variant.queries, variant.database, k, filtered=filtered, rerank=rerank)


def measure_latency(variant: Variant, train: np.ndarray, n_queries: int = 256, k: int = 10, seed: int = 0, repeats: int = 3) -> float:
    """Milliseconds per query of a batch of ``n_queries`` searched on the FAISS index of the
    variant's family (best of ``repeats``; this CPU, its current load)."""
    rows = seeded_rows(len(variant.database), n_queries, seed, "latency")
    d = variant.database.shape[1]
    if variant.family == "binary":
        index = faiss.IndexBinaryFlat(d)
        index.add(np.packbits(variant.database > 0, axis=1))
        q = np.packbits(variant.queries[rows] > 0, axis=1)
    else:
        if variant.family == "scalar":
            index = faiss.IndexScalarQuantizer(d, SQ_TYPES[variant.name], faiss.METRIC_INNER_PRODUCT)
        elif variant.family == "pq":
            index = faiss.clone_index(variant.trained)
        else:
            index = faiss.IndexFlatIP(d)
        source = np.ascontiguousarray(variant.queries if variant.family in ("scalar", "pq") else variant.database, dtype=np.float32)
        if not index.is_trained:
            index.train(np.ascontiguousarray(train if variant.family in ("scalar", "pq") else source, dtype=np.float32))
        index.add(source)
        q = np.ascontiguousarray(variant.queries[rows], dtype=np.float32)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        _, found = index.search(q, variant.oversample * k)
        if variant.rerank is not None:  # rescore the candidates in float32
            cand = variant.rerank[np.maximum(found, 0)]
            np.einsum("qcd,qd->qc", cand, variant.rerank[rows])
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best / len(rows)


def frontier_rows(data: DecisionData, variants: list[Variant]) -> tuple[dict, dict]:
    """Per-query metric values and dims of every variant, as (model, variant) rows."""
    values, dims = {}, {}
    for v in variants:
        values[(v.model, v.name)] = data.score(search_variant(data, v))
        dims[(v.model, v.name)] = v.dims
    return values, dims


def pareto_front(frame: pd.DataFrame, cost: str = "bytes_per_item", quality: str = "ndcg@5") -> np.ndarray:
    """True for rows no other row beats: at most the cost and at least the quality, one strictly."""
    c, q = frame[cost].to_numpy(float), frame[quality].to_numpy(float)
    dominated = ((c[None, :] <= c[:, None]) & (q[None, :] >= q[:, None]) & ((c[None, :] < c[:, None]) | (q[None, :] > q[:, None]))).any(axis=1)
    return ~dominated


def frontier_table(data: DecisionData, variants: list[Variant], result, latency: dict | None = None,
                   throughput: dict | None = None, metric: str = "ndcg@5") -> pd.DataFrame:
    """One row per (model, variant): quality with CI, bytes per item, latency, embedding
    throughput, whether it is on the Pareto front (bytes vs quality, over every model)."""
    summary = result.summary().set_index(["model", "setting", "metric"])
    rows = []
    for v in variants:
        s = summary.loc[(v.model, v.name, metric)]
        rows.append({
            "model": data.labels[v.model], "variant": v.name, "family": v.family, "dims": v.dims,
            "bytes_per_item": v.bytes_per_item, metric: s["mean"], f"{metric}_low": s["ci_low"], f"{metric}_high": s["ci_high"],
            "latency_ms_per_query": (latency or {}).get((v.model, v.name), np.nan),
            "images_per_s": (throughput or {}).get(v.model, np.nan), "n_queries": data.n_queries, "description": v.description,
        })
    frame = pd.DataFrame(rows)
    frame["pareto"] = pareto_front(frame, quality=metric)
    frame["mercari_baseline"] = (frame["variant"] == "pca128") & (frame["model"] == data.labels[data.models[0]])
    return frame


__all__ = [
    "DEFAULT_OVERSAMPLE", "DEFAULT_PCA_DIMS", "QUANTISERS", "Variant", "frontier_rows", "frontier_table",
    "measure_latency", "model_variants", "pareto_front", "pq_params", "product_quantised", "scalar_quantised", "search_variant",
    "sign_codes",
]
