"""Offline evaluation of "similar items" retrieval: nDCG@k and friends, with uncertainty.

Protocol (leave-one-out over the evaluation items):

* **Candidates** are the evaluation items (``split.eval`` when a split is given, else the whole
  catalog) that have a cached vector for *every* model compared, so that all rows are scored on
  the same queries and can be compared pairwise. With ``exclude_duplicates`` (default) only the
  first item of each group of byte-identical images is kept (``image_meta.csv`` beside the
  catalog when it has ``dup_group_first_id``, else the sha256 of each image file), because a
  copy of the query is a free rank-1 hit.
* **Queries** are the candidates that have at least one relevant candidate other than
  themselves. The others (singleton classes, unlabelled items, items without logged
  interactions) are reported, stay in the candidate pool as distractors, and are left out of
  every mean. The query itself is never a candidate.
* **Relevance** comes from labels, binary on one column (``label``) or graded along a
  hierarchy (``hierarchy=[coarse, ..., fine]``: grade = number of leading levels that match, so
  3 when the whole path to the finest level matches, then 2, 1, 0), or from an interaction log
  (``query_id,item_id[,weight]``; graded by the summed weight, directed query -> item).
  An empty label never matches anything. The ideal DCG is taken over all relevant candidates.
* **Settings** (one row each): every model ``unfiltered``; with ``filter_column``, also
  ``filtered:<column>``, which keeps only candidates sharing the query's value of that column
  (an *oracle* category filter: the article's filtered kNN used a predicted category); with
  ``pca_dims``, ``pca<d>`` rows (PCA fitted on the split's train items when a split is given,
  else on the candidates, then re-normalised); with ``fusions``, ``m1+m2`` models whose
  similarity is the mean of the members' cosine similarities.
* **Uncertainty**: percentile or BCa (default) bootstrap intervals of each mean, resampling
  queries with ``np.random.default_rng(seed)`` exactly as ``scipy.stats.bootstrap`` does, but
  computing every column's resampled mean in one matrix product; the same resamples serve every
  row, so paired differences use them too. Paired comparisons report the difference of means
  (b - a), its bootstrap interval, a two-sided paired sign-flip permutation p-value and the
  relative improvement ``100 * (b - a) / a`` in % (the way the Mercari paper reports +9.1%
  nDCG@5) with its own bootstrap interval.

All queries are retrieved at once: by blocks of the exact similarity matrix (``backend="matrix"``,
the default: each pair of blocks is multiplied once, the matrix being symmetric in leave-one-out),
or through the serving path, :mod:`vrec_utils.index` (``backend="faiss"`` or any registered index
backend, with ``index_options`` such as ``{"ann": "hnsw"}`` to measure what approximate search
costs). Exact backends give the same lists (ties aside).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import ndtr, ndtri

from .catalog import Catalog, Split, load_catalog
from .index.exact import TIE_MARGIN, canonical_top_k
from .metrics import check_gain, compute_metrics, default_metrics, ideal_from_counts, ideal_from_sparse_rows, parse_metric
from .store import Embeddings, load_embeddings

UNFILTERED = "unfiltered"
CI_METHODS = ("bca", "percentile")
MATRIX = "matrix"
GAIN_FORMULAS = {"exp2": "gain = 2**rel - 1 (Burges)", "linear": "gain = rel (Jarvelin-Kekalainen)"}
DEFAULT_LABEL = "articleType"
_SEARCH_BLOCK = 4096  # rows per block of the similarity matrix


# ============================================================================ relevance


@dataclass(frozen=True)
class LabelRelevance:
    """Label relevance over a candidate array: ``codes[l, i]`` is candidate i's class at level l
    (the path ``columns[:l+1]``), -1 when unlabelled. Grade = number of matching levels.
    Queries are candidates themselves (leave-one-out): class counts exclude the query once."""

    columns: tuple[str, ...]
    codes: np.ndarray  # (levels, n_candidates) int64

    @property
    def description(self) -> str:
        if len(self.columns) == 1:
            return f"labels: binary, same {self.columns[0]}"
        return f"labels: graded 0-{len(self.columns)} along {' > '.join(self.columns)} (grade = matching levels)"

    def n_at_least(self, query_pos: np.ndarray) -> np.ndarray:
        """(n_queries, levels): how many other candidates have grade >= 1, 2, ..."""
        out = np.zeros((len(query_pos), len(self.codes)), dtype=np.int64)
        for level, codes in enumerate(self.codes):
            counts = np.bincount(codes[codes >= 0], minlength=max(int(codes.max()) + 1, 1))
            q = codes[query_pos]
            out[:, level] = np.where(q >= 0, counts[np.maximum(q, 0)] - 1, 0)
        return out

    def n_relevant(self, query_pos: np.ndarray) -> np.ndarray:
        return self.n_at_least(query_pos)[:, 0]

    def ideal(self, query_pos: np.ndarray, k: int) -> np.ndarray:
        return ideal_from_counts(self.n_at_least(query_pos), k)

    def grades(self, query_pos: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
        valid = retrieved >= 0
        safe = np.where(valid, retrieved, 0)
        out = np.zeros(retrieved.shape, dtype=np.float64)
        for codes in self.codes:
            q = codes[query_pos][:, None]
            out += (codes[safe] == q) & (q >= 0) & valid
        return out


@dataclass(frozen=True)
class InteractionRelevance:
    """Graded relevance from a log: ``matrix[q, i]`` = summed weight of query q -> item i,
    positions in the candidate array (self pairs removed, only positive weights stored)."""

    matrix: sparse.csr_array
    source: str

    @property
    def description(self) -> str:
        return f"interactions: {self.source} (graded by summed weight, directed query -> item)"

    def n_relevant(self, query_pos: np.ndarray) -> np.ndarray:
        return np.diff(self.matrix.indptr)[query_pos]

    def ideal(self, query_pos: np.ndarray, k: int) -> np.ndarray:
        rows = self.matrix[query_pos]
        return ideal_from_sparse_rows(rows.indptr, rows.data, k)

    def grades(self, query_pos: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
        valid = retrieved >= 0
        rows = np.broadcast_to(query_pos[:, None], retrieved.shape)[valid]
        out = np.zeros(retrieved.shape, dtype=np.float64)
        if valid.any():
            out[valid] = np.asarray(self.matrix[rows, retrieved[valid]]).ravel()
        return out


def label_relevance(items: pd.DataFrame, columns: Sequence[str]) -> LabelRelevance:
    """Codes of each prefix path of ``columns`` (coarse to fine) for the rows of ``items``."""
    if not columns:
        raise ValueError("relevance from labels needs at least one column")
    codes = np.full((len(columns), len(items)), -1, dtype=np.int64)
    path = pd.Series("", index=items.index, dtype=object)
    known = np.ones(len(items), dtype=bool)
    for level, column in enumerate(columns):
        values = items[column].astype(str)
        known &= (values.str.strip() != "").to_numpy()
        path = path + "\x1f" + values
        level_codes, _ = pd.factorize(path, sort=True)
        codes[level] = np.where(known, level_codes, -1)
    return LabelRelevance(tuple(columns), codes)


def read_interactions(path: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """Read and validate an interaction log: columns ``query_id,item_id`` and optional
    ``weight`` (default 1). Returns ``query_id, item_id`` (str) and ``weight`` (float)."""
    if isinstance(path, pd.DataFrame):
        frame = path.astype(str)
        where = "interactions frame"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"interactions file {str(path)!r} does not exist")
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        where = str(path)
    missing = [c for c in ("query_id", "item_id") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{where} lacks column(s) {', '.join(missing)}; an interaction log needs query_id,item_id[,weight] "
            f"(found: {', '.join(frame.columns)})"
        )
    out = pd.DataFrame({"query_id": frame["query_id"].str.strip(), "item_id": frame["item_id"].str.strip()})
    if "weight" in frame.columns:
        weight = pd.to_numeric(frame["weight"], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(weight) | (weight < 0)
        if bad.any():
            lines = (np.flatnonzero(bad) + 2).tolist()
            raise ValueError(f"{where}: weight must be a finite number >= 0; bad value(s) on line(s) {lines[:10]}")
        out["weight"] = weight
    else:
        out["weight"] = 1.0
    return out


def interaction_relevance(
    log: pd.DataFrame, candidate_ids: pd.Index, catalog_ids: pd.Index, source: str = "interactions"
) -> tuple[InteractionRelevance, dict[str, Any]]:
    """Relevance matrix over ``candidate_ids`` from a log read by :func:`read_interactions`,
    with a report counting every row that could not be used and why."""
    q_known = log["query_id"].isin(catalog_ids).to_numpy()
    i_known = log["item_id"].isin(catalog_ids).to_numpy()
    q_pos = candidate_ids.get_indexer(log["query_id"])
    i_pos = candidate_ids.get_indexer(log["item_id"])
    weight = log["weight"].to_numpy()
    unknown = ~(q_known & i_known)
    outside = ~unknown & ((q_pos < 0) | (i_pos < 0))
    self_pair = ~unknown & ~outside & (q_pos == i_pos)
    zero = ~unknown & ~outside & ~self_pair & (weight == 0)
    use = ~(unknown | outside | self_pair | zero)
    n = len(candidate_ids)
    coo = sparse.coo_array((weight[use], (q_pos[use], i_pos[use])), shape=(n, n))
    matrix = coo.tocsr()  # sums repeated (query, item) pairs
    matrix.sum_duplicates()
    matrix.sort_indices()
    unknown_ids = sorted(set(log.loc[~q_known, "query_id"]) | set(log.loc[~i_known, "item_id"]))
    report = {
        "rows": int(len(log)),
        "used_rows": int(use.sum()),
        "relevant_pairs": int(matrix.nnz),
        "merged_repeated_pairs": int(use.sum() - matrix.nnz),
        "unknown_id_rows": int(unknown.sum()),
        "unknown_query_ids": int(log.loc[~q_known, "query_id"].nunique()),
        "unknown_item_ids": int(log.loc[~i_known, "item_id"].nunique()),
        "unknown_id_examples": unknown_ids[:10],
        "outside_candidates_rows": int(outside.sum()),
        "self_pair_rows": int(self_pair.sum()),
        "zero_weight_rows": int(zero.sum()),
        "logged_queries_without_relevant": int(len(np.setdiff1d(q_pos[q_pos >= 0], q_pos[use]))),
    }
    if not use.any():
        raise ValueError(
            f"no usable interaction in {source}: {report['rows']} row(s), {report['unknown_id_rows']} with ids not in "
            f"the catalog (e.g. {', '.join(unknown_ids[:5]) or '-'}), {report['outside_candidates_rows']} outside the "
            f"evaluated items, {report['self_pair_rows']} self pairs, {report['zero_weight_rows']} with weight 0"
        )
    return InteractionRelevance(matrix, source), report


# ============================================================================ duplicates


def duplicate_keys(catalog: Catalog, ids: Sequence[str]) -> pd.Series:
    """A key per id, equal for byte-identical images: ``dup_group_first_id`` from
    ``image_meta.csv`` beside the catalog where it lists the id, else the sha256 of the image
    file (an unreadable file gets a key of its own)."""
    groups: dict[str, str] = {}
    meta_path = catalog.root / "image_meta.csv"
    if meta_path.is_file():
        meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
        if {"id", "dup_group_first_id"} <= set(meta.columns):
            groups = dict(zip(meta["id"], meta["dup_group_first_id"]))
    keys = []
    for item_id in ids:
        if item_id in groups:
            keys.append(f"meta:{groups[item_id]}")
            continue
        try:
            keys.append("sha256:" + hashlib.sha256(Path(catalog.items.at[item_id, "image"]).read_bytes()).hexdigest())
        except OSError:
            keys.append(f"id:{item_id}")
    return pd.Series(keys, index=list(ids), name="dup_key")


# ============================================================================ retrieval


def _index_layer():
    try:
        from .index import create_index
    except ImportError:
        return None
    return create_index


def _top_k(sims: np.ndarray, k: int, labels: np.ndarray | None = None, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Labels (default: column numbers) and values of each row's k largest entries, best first,
    ties broken by the lower label.

    Wide rows are pruned first: split the columns into groups of ``chunk`` (group c holds
    columns c, c + G, c + 2G, ... for G groups, so the maxima are a fast reduction over the
    middle axis); the k largest entries lie in the k groups with the largest maxima, so only
    those ``k * chunk`` columns are partitioned. An entry tied with the k-th largest group
    maximum may be dropped for an equal one elsewhere."""
    n_rows, n_cols = sims.shape
    k = min(k, n_cols)
    if labels is None and n_cols % chunk == 0 and n_cols >= 4 * k * chunk:
        n_groups = n_cols // chunk
        maxima = sims.reshape(n_rows, chunk, n_groups).max(axis=1)
        best = np.argpartition(maxima, -k, axis=1)[:, -k:]
        cols = (best[:, :, None] + np.arange(chunk) * n_groups).reshape(n_rows, -1)
        vals = np.take_along_axis(sims, cols, axis=1)
    else:
        cols = np.broadcast_to(np.arange(n_cols), sims.shape) if labels is None else labels
        vals = sims
    if k < vals.shape[1]:
        part = np.argpartition(vals, -k, axis=1)[:, -k:]
        cols = np.take_along_axis(cols, part, axis=1)
        vals = np.take_along_axis(vals, part, axis=1)
    order = np.lexsort((cols, -vals), axis=1)
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _top_k_of_columns(sims: np.ndarray, k: int, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_top_k` of ``sims.T`` without transposing the whole block: rows are grouped the
    same way (group g holds rows g, g + G, ...), the group maxima are a reduction over the
    leading axis, and only the k best groups' rows are gathered and transposed."""
    n_rows, n_cols = sims.shape
    k = min(k, n_rows)
    if n_rows % chunk or n_rows < 4 * k * chunk:
        return _top_k(np.ascontiguousarray(sims.T), k)
    n_groups = n_rows // chunk
    maxima = sims.reshape(chunk, n_groups, n_cols).max(axis=0)
    best = np.argpartition(maxima, -k, axis=0)[-k:]
    rows = (best[None, :, :] + (np.arange(chunk) * n_groups)[:, None, None]).reshape(-1, n_cols)
    vals = sims[rows, np.arange(n_cols)[None, :]]
    return _top_k(np.ascontiguousarray(vals.T), k, labels=np.ascontiguousarray(rows.T))


def _pool_top_k(pool: np.ndarray, rows: np.ndarray, k: int, block: int) -> np.ndarray:
    """Top-k positions within ``pool`` for its rows ``rows``, each row's own position excluded;
    -1 where fewer exist.

    When most rows are queries (leave-one-out), the similarity matrix is symmetric: each pair
    of row blocks is multiplied once and serves both blocks (half the arithmetic). Otherwise
    the query rows are multiplied by the whole pool, block by block."""
    n = len(pool)
    if 2 * len(rows) <= n:
        out_cols, out_vals = [], []
        for start in range(0, len(rows), block):
            r = rows[start : start + block]
            sims = pool[r] @ pool.T
            sims[np.arange(len(r)), r] = -np.inf
            c, v = _top_k(sims, k)
            out_cols.append(c)
            out_vals.append(v)
        cols, vals = np.vstack(out_cols), np.vstack(out_vals)
    else:
        starts = list(range(0, n, block))
        parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in starts]
        for bi, i0 in enumerate(starts):
            left = pool[i0 : i0 + block]
            for bj in range(bi, len(starts)):
                j0 = starts[bj]
                sims = left @ pool[j0 : j0 + block].T
                if bi == bj:
                    np.fill_diagonal(sims, -np.inf)
                c, v = _top_k(sims, k)
                parts[bi].append((c + j0, v))
                if bi != bj:
                    c, v = _top_k_of_columns(sims, k)
                    parts[bj].append((c + i0, v))
        merged = [_top_k(np.hstack([v for _, v in p]), k, labels=np.hstack([c for c, _ in p])) for p in parts]
        cols = np.vstack([c for c, _ in merged])[rows]
        vals = np.vstack([v for _, v in merged])[rows]
    found = np.where(np.isfinite(vals), cols, -1)
    if found.shape[1] < k:
        found = np.pad(found, ((0, 0), (0, k - found.shape[1])), constant_values=-1)
    return found


def search_matrix(
    vectors: np.ndarray, query_pos: np.ndarray, k: int, groups: np.ndarray | None = None, block: int = _SEARCH_BLOCK
) -> np.ndarray:
    """Exact inner-product top-k over ``vectors`` for the rows ``query_pos``, by blocks of the
    similarity matrix. The query itself is excluded; with ``groups`` (an int code per
    candidate) only candidates of the query's group are searched, group by group. Returns
    candidate positions (n, k), -1 where fewer exist, best first, with the project's tie rule
    (:func:`vrec_utils.index.exact.canonical_top_k`: equal scores by lower position), so the
    lists equal those of the index layer's exact search on any CPU."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    query_pos = np.asarray(query_pos, dtype=np.int64)
    out = np.full((len(query_pos), k), -1, dtype=np.int64)
    if groups is None:
        jobs = [(np.arange(len(query_pos)), np.arange(len(vectors)))]
    else:
        order = np.argsort(groups[query_pos], kind="stable")
        bounds = np.flatnonzero(np.diff(groups[query_pos][order])) + 1
        jobs = [(rows, np.flatnonzero(groups == groups[query_pos[rows[0]]])) for rows in np.split(order, bounds) if len(rows)]
    for rows, members in jobs:
        pool = vectors[members]
        local = np.searchsorted(members, query_pos[rows])  # the queries' positions within the pool
        todo, wanted = np.arange(len(rows)), min(len(pool), k + TIE_MARGIN)
        while len(todo):
            found = _pool_top_k(pool, local[todo], wanted, block)
            _, best, unresolved = canonical_top_k(pool[local[todo]], pool, found, k, complete=wanted >= len(pool) - 1)
            done = todo[~unresolved]
            out[rows[done]] = np.where(best[~unresolved] >= 0, members[np.maximum(best[~unresolved], 0)], -1)
            todo, wanted = todo[unresolved], min(len(pool), 4 * wanted)
    return out


class _Retriever:
    """All-queries-at-once top-k over one model's candidate vectors: through the index layer
    (one index per model, filter column attached) or through blocks of the similarity matrix."""

    def __init__(
        self, backend: str, name: str, ids: np.ndarray, vectors: np.ndarray, metadata: pd.DataFrame | None,
        index_options: Mapping[str, Any],
    ):
        self.ids, self.vectors, self.metadata = ids, vectors, metadata
        self.index = None
        if backend != MATRIX:
            columns = list(metadata.columns) if metadata is not None else []
            self.index = _index_layer()(backend, model=name, dim=vectors.shape[1], filter_columns=columns, **index_options)
            self.index.add(ids, vectors, metadata=metadata)

    def search(self, query_pos: np.ndarray, k: int, column: str | None) -> np.ndarray:
        """Candidate positions (n, k), -1 padded; the query is excluded, ``column`` filters."""
        if self.index is None:
            groups = pd.factorize(self.metadata[column])[0] if column else None
            return search_matrix(self.vectors, query_pos, k, groups)
        filters = None
        if column is not None:
            filters = [{column: v} for v in self.metadata[column].to_numpy(dtype=str)[query_pos]]
        result = self.index.search(self.vectors[query_pos], k, filters=filters, exclude_ids=list(self.ids[query_pos]))
        found = np.asarray(result.ids, dtype=str)
        return pd.Index(self.ids).get_indexer(found.ravel()).reshape(found.shape)


# ============================================================================ statistics


def _resample_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator, chunk: int = 250) -> np.ndarray:
    """Bootstrap means of each column of ``values`` (n, m) -> (n_resamples, m).

    Draws ``rng.integers(0, n, (n_resamples, n))`` row indices, the stream scipy.stats.bootstrap
    draws with the same generator (drawn by chunks of whole rows, which leaves it unchanged),
    and turns each row into counts so that all columns are averaged in one matrix product."""
    n = len(values)
    out = np.empty((n_resamples, values.shape[1]), dtype=np.float64)
    chunk += chunk % 2  # an even number of draws per chunk keeps the stream identical to one call
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, (b, n))
        counts = np.bincount((idx + (np.arange(b) * n)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        out[start : start + b] = counts @ values / n
    return out


def _col_sum(x: np.ndarray) -> np.ndarray:
    """Column sums computed row by row of the transpose: each column's sum is the same bits as
    ``np.sum`` of that column alone, whatever the other columns (axis-0 sums of a 2-d array
    are not), so a number does not change with the set of rows it is computed beside."""
    return np.ascontiguousarray(x.T).sum(axis=1)


def _col_mean(x: np.ndarray) -> np.ndarray:
    return _col_sum(x) / len(x)


def _jackknife_acceleration(jackknife: np.ndarray) -> np.ndarray:
    """BCa acceleration from leave-one-out statistics (n, m), as scipy computes it."""
    u = _col_mean(jackknife) - jackknife
    num = _col_sum(u**3)
    den = 6.0 * _col_sum(u**2) ** 1.5
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _mean_jackknife(values: np.ndarray) -> np.ndarray:
    n = len(values)
    return (_col_sum(values) - values) / (n - 1)


def _interval(
    theta_hat: np.ndarray, theta_b: np.ndarray, accel: np.ndarray | None, confidence: float, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile or BCa interval per column; BCa falls back to percentile where the bias
    correction is infinite (the estimate lies outside every resample)."""
    alpha = (1.0 - confidence) / 2.0
    m = theta_b.shape[1]
    lo_q = np.full(m, alpha)
    hi_q = np.full(m, 1.0 - alpha)
    if method == "bca":
        b = len(theta_b)
        pct = ((theta_b < theta_hat).sum(axis=0) + (theta_b <= theta_hat).sum(axis=0)) / (2.0 * b)
        z0 = ndtri(pct)
        z = ndtri(alpha)
        with np.errstate(invalid="ignore", divide="ignore"):
            n1, n2 = z0 + z, z0 - z
            a1 = ndtr(z0 + n1 / (1 - accel * n1))
            a2 = ndtr(z0 + n2 / (1 - accel * n2))
        ok = np.isfinite(a1) & np.isfinite(a2)
        lo_q = np.where(ok, a1, lo_q)
        hi_q = np.where(ok, a2, hi_q)
    low = np.array([np.quantile(theta_b[:, j], lo_q[j]) for j in range(m)])
    high = np.array([np.quantile(theta_b[:, j], hi_q[j]) for j in range(m)])
    return low, high


def bootstrap_ci(
    values: np.ndarray,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    method: str = "bca",
    seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap confidence interval of the mean of each column of ``values`` ((n,) or (n, m)).

    Matches ``scipy.stats.bootstrap(values.T, np.mean, method=..., n_resamples=...,
    rng=np.random.default_rng(seed))`` up to floating-point summation order, much faster for
    many columns. Returns ``(low, high)`` arrays (scalars for 1-d input)."""
    values = np.asarray(values, dtype=np.float64)
    one = values.ndim == 1
    values = values[:, None] if one else values
    if method not in CI_METHODS:
        raise ValueError(f"ci method must be one of {', '.join(CI_METHODS)}, got {method!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    theta_b = _resample_means(values, n_resamples, rng)
    accel = _jackknife_acceleration(_mean_jackknife(values)) if method == "bca" else None
    low, high = _interval(_col_mean(values), theta_b, accel, confidence, method)
    return (low[0], high[0]) if one else (low, high)


def paired_permutation_pvalue(
    differences: np.ndarray, *, n_permutations: int = 10000, seed: int | np.random.Generator = 0, chunk: int = 500
) -> np.ndarray:
    """Two-sided paired sign-flip test of mean(differences) = 0, per column of ``differences``
    ((n,) or (n, m)). Exact (all 2**n sign patterns) when 2**n <= n_permutations, else
    ``(1 + #{|mean of flipped| >= |observed|}) / (1 + n_permutations)`` with random flips
    shared by all columns."""
    d = np.asarray(differences, dtype=np.float64)
    one = d.ndim == 1
    d = d[:, None] if one else d
    n = len(d)
    observed = np.abs(_col_mean(d))
    threshold = observed - 1e-12 * np.maximum(observed, 1e-300)
    exact = n <= 30 and 2**n <= n_permutations
    count = np.zeros(d.shape[1], dtype=np.int64)
    if exact:
        total = 2**n
        for start in range(0, total, chunk):
            codes = np.arange(start, min(total, start + chunk))
            signs = 1.0 - 2.0 * ((codes[:, None] >> np.arange(n)) & 1)
            count += (np.abs(signs @ d / n) >= threshold).sum(axis=0)
        p = count / total
    else:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        total = _col_sum(d)
        for start in range(0, n_permutations, chunk):
            b = min(chunk, n_permutations - start)
            # one random bit per (permutation, query): flipped where 1; sum(s*d) = total - 2*sum(flipped d)
            flips = np.unpackbits(rng.integers(0, 256, (b, (n + 7) // 8), dtype=np.uint8), axis=1, count=n)
            count += (np.abs((total - 2.0 * (flips.astype(np.float64) @ d)) / n) >= threshold).sum(axis=0)
        p = (count + 1) / (n_permutations + 1)
    return p[0] if one else p


# ============================================================================ results


RowKey = tuple[str, str]  # (model, setting)


@dataclass
class EvaluationResult:
    """Per-query metric values for every (model, setting) row, and everything derived from them.

    ``values[(model, setting)][metric]`` is an array aligned with ``query_ids``;
    ``candidate_ids`` are the items every query was searched among.
    """

    query_ids: np.ndarray
    candidate_ids: np.ndarray
    query_items: pd.DataFrame  # the catalog rows of the queries (labels, for per-category views)
    values: dict[RowKey, dict[str, np.ndarray]]
    metrics: list[str]
    dims: dict[RowKey, int]
    config: dict[str, Any]
    report: dict[str, Any]
    category_column: str | None = None
    _boot: np.ndarray | None = field(default=None, repr=False)

    # -- basics ---------------------------------------------------------------------------
    @property
    def rows(self) -> list[RowKey]:
        return list(self.values)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.values))

    @property
    def settings(self) -> list[str]:
        return list(dict.fromkeys(s for _, s in self.values))

    @property
    def n_queries(self) -> int:
        return len(self.query_ids)

    @property
    def per_query(self) -> pd.DataFrame:
        """Long frame: query_id, model, setting, metric, value."""
        frames = [
            pd.DataFrame({"query_id": self.query_ids, "model": m, "setting": s, "metric": metric, "value": v})
            for (m, s), per_metric in self.values.items()
            for metric, v in per_metric.items()
        ]
        return pd.concat(frames, ignore_index=True)

    def _matrix(self) -> tuple[np.ndarray, list[tuple[RowKey, str]]]:
        columns = [(row, metric) for row in self.values for metric in self.metrics]
        return np.column_stack([self.values[row][metric] for row, metric in columns]), columns

    def _resampled(self) -> np.ndarray:
        """Bootstrap means (n_bootstrap, rows * metrics), one shared set of resamples."""
        if self._boot is None:
            matrix, _ = self._matrix()
            self._boot = _resample_means(matrix, self.config["n_bootstrap"], np.random.default_rng(self.config["seed"]))
        return self._boot

    def _column(self, row: RowKey, metric: str) -> int:
        if row not in self.values:
            raise KeyError(f"no row {row}; rows: {', '.join(map(str, self.values))}")
        if metric not in self.metrics:
            raise KeyError(f"metric {metric!r} was not computed; computed: {', '.join(self.metrics)}")
        return list(self.values).index(row) * len(self.metrics) + self.metrics.index(metric)

    def _resolve(self, row: RowKey | str) -> RowKey:
        key = (row, UNFILTERED) if isinstance(row, str) else tuple(row)
        if key not in self.values:
            raise KeyError(f"no row {key}; rows: {', '.join(map(str, self.values))}")
        return key

    # -- summaries --------------------------------------------------------------------------
    def summary(self) -> pd.DataFrame:
        """model, setting, metric, mean, ci_low, ci_high, n_queries (one row per metric)."""
        matrix, columns = self._matrix()
        theta_b = self._resampled()
        method = self.config["ci_method"]
        accel = _jackknife_acceleration(_mean_jackknife(matrix)) if method == "bca" else None
        low, high = _interval(_col_mean(matrix), theta_b, accel, self.config["confidence"], method)
        return pd.DataFrame(
            {
                "model": [r[0] for r, _ in columns],
                "setting": [r[1] for r, _ in columns],
                "metric": [m for _, m in columns],
                "mean": _col_mean(matrix),
                "ci_low": low,
                "ci_high": high,
                "n_queries": self.n_queries,
            }
        )

    def table(self) -> pd.DataFrame:
        """Wide summary, one row per (model, setting) grouped by model: ``model, setting, dims,
        n_queries``, then per metric its mean (``ndcg@5``) and CI (``ndcg@5_low``, ``ndcg@5_high``)."""
        summary = self.summary().set_index(["model", "setting", "metric"])
        records = []
        for model in self.models:
            for setting in (s for s in self.settings if (model, s) in self.values):
                record: dict[str, Any] = {"model": model, "setting": setting, "dims": self.dims[(model, setting)], "n_queries": self.n_queries}
                for metric in self.metrics:
                    row = summary.loc[(model, setting, metric)]
                    record.update({metric: row["mean"], f"{metric}_low": row["ci_low"], f"{metric}_high": row["ci_high"]})
                records.append(record)
        return pd.DataFrame(records)

    def compare(self, a: RowKey | str, b: RowKey | str, metrics: Sequence[str] | None = None) -> pd.DataFrame:
        """Paired comparison of row b against row a (a model name means its unfiltered row)."""
        return self._compare_pairs([(self._resolve(a), self._resolve(b))], metrics)

    def default_pairs(self) -> list[tuple[RowKey, RowKey]]:
        """Every pair of models (earlier-listed first, as the baseline) in each non-PCA setting;
        with a filter, each earlier model *filtered* against each later model *unfiltered* (the
        article's "ResNet + filtered kNN" vs "SigLIP unfiltered"), and each model unfiltered
        against itself filtered (what the filter buys)."""
        models = self.models
        settings = [s for s in self.settings if not s.startswith("pca")]
        pairs = [((a, s), (b, s)) for s in settings for a, b in itertools.combinations(models, 2)]
        for s in (s for s in settings if s.startswith("filtered:")):
            pairs += [((a, s), (b, UNFILTERED)) for a, b in itertools.combinations(models, 2)]
            pairs += [((m, UNFILTERED), (m, s)) for m in models]
        return [(a, b) for a, b in pairs if a in self.values and b in self.values]

    def comparisons(self, metrics: Sequence[str] | None = None) -> pd.DataFrame:
        """:meth:`compare` for every pair of :meth:`default_pairs`."""
        return self._compare_pairs(self.default_pairs(), metrics)

    def _compare_pairs(self, pairs: list[tuple[RowKey, RowKey]], metrics: Sequence[str] | None) -> pd.DataFrame:
        metrics = [str(parse_metric(m)) for m in (metrics or self.metrics)]
        columns = [
            "model_a", "setting_a", "model_b", "setting_b", "metric", "mean_a", "mean_b", "diff",
            "diff_ci_low", "diff_ci_high", "p_value", "rel_improvement_pct", "rel_ci_low", "rel_ci_high", "n_queries",
        ]  # fmt: skip
        if not pairs:
            return pd.DataFrame(columns=columns)
        theta_b = self._resampled()
        conf, method = self.config["confidence"], self.config["ci_method"]
        cols_a = [self._column(a, m) for a, b in pairs for m in metrics]
        cols_b = [self._column(b, m) for a, b in pairs for m in metrics]
        va = np.column_stack([self.values[a][m] for a, b in pairs for m in metrics])
        vb = np.column_stack([self.values[b][m] for a, b in pairs for m in metrics])
        mean_a, mean_b = _col_mean(va), _col_mean(vb)
        d = vb - va
        boot_a, boot_b = theta_b[:, cols_a], theta_b[:, cols_b]
        d_acc = _jackknife_acceleration(_mean_jackknife(d)) if method == "bca" else None
        d_low, d_high = _interval(_col_mean(d), boot_b - boot_a, d_acc, conf, method)
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = 100.0 * (mean_b / mean_a - 1.0)
            rel_b = 100.0 * (boot_b / boot_a - 1.0)
            rel_jack = 100.0 * (_mean_jackknife(vb) / _mean_jackknife(va) - 1.0)
        ok = np.isfinite(rel) & np.isfinite(rel_b).all(axis=0) & np.isfinite(rel_jack).all(axis=0)
        r_low, r_high = np.full(len(rel), np.nan), np.full(len(rel), np.nan)
        if ok.any():
            r_acc = _jackknife_acceleration(rel_jack[:, ok]) if method == "bca" else None
            r_low[ok], r_high[ok] = _interval(rel[ok], rel_b[:, ok], r_acc, conf, method)
        p = paired_permutation_pvalue(
            d, n_permutations=self.config["n_permutations"], seed=np.random.default_rng([self.config["seed"], 1])
        )
        rows = []
        for j, ((a, b), metric) in enumerate((pair, m) for pair in pairs for m in metrics):
            rows.append(
                [a[0], a[1], b[0], b[1], metric, mean_a[j], mean_b[j], mean_b[j] - mean_a[j], d_low[j], d_high[j],
                 p[j], rel[j] if np.isfinite(rel[j]) else np.nan, r_low[j], r_high[j], self.n_queries]
            )  # fmt: skip
        return pd.DataFrame(rows, columns=columns)

    def per_category(
        self, column: str | None = None, metric: str = "ndcg@5", setting: str = UNFILTERED, baseline: str | None = None
    ) -> pd.DataFrame:
        """Mean ``metric`` per value of ``column`` (default: the relevance's finest label column):
        ``<column>, n_queries, <model>..., "<model> - <baseline>"...``, sorted by the first
        difference (largest gain first). ``baseline`` defaults to the first model."""
        column = column or self.category_column
        if column is None:
            raise ValueError("per_category needs a column (relevance from interactions has no default)")
        if column not in self.query_items.columns:
            available = ", ".join(c for c in self.query_items.columns)
            raise ValueError(f"column {column!r} is not in the catalog; available: {available}")
        metric = str(parse_metric(metric))
        models = [m for m in self.models if (m, setting) in self.values]
        if not models:
            raise KeyError(f"no rows with setting {setting!r}; settings: {', '.join(self.settings)}")
        baseline = baseline or models[0]
        frame = pd.DataFrame({column: self.query_items[column].to_numpy()})
        for m in models:
            frame[m] = self.values[(m, setting)][metric]
        grouped = frame.groupby(column, sort=True)
        out = grouped[models].mean()
        out.insert(0, "n_queries", grouped.size())
        diffs = [f"{m} - {baseline}" for m in models if m != baseline]
        for m, name in zip([m for m in models if m != baseline], diffs):
            out[name] = out[m] - out[baseline]
        out = out.reset_index()
        sort_by = [diffs[0], column] if diffs else ["n_queries", column]
        ascending = [False, True]
        return out.sort_values(sort_by, ascending=ascending, kind="stable", ignore_index=True)

    def dims_curve(self, metric: str = "ndcg@5") -> pd.DataFrame:
        """``metric`` against embedding dimensions: every pca row plus the full-dimension
        unfiltered row of each model (fusions have no pca rows). Columns model, dims, setting,
        ``<metric>`` (the mean), ci_low, ci_high, n_queries: ready for plots.ndcg_vs_dims."""
        metric = str(parse_metric(metric))
        summary = self.summary()
        keep = (summary["metric"] == metric) & summary["setting"].map(lambda s: s == UNFILTERED or s.startswith("pca"))
        summary = summary[keep].rename(columns={"mean": metric})
        summary = summary.assign(dims=[self.dims[(m, s)] for m, s in zip(summary["model"], summary["setting"])])
        return summary[["model", "dims", "setting", metric, "ci_low", "ci_high", "n_queries"]].sort_values(
            ["model", "dims"], kind="stable", ignore_index=True
        )

    # -- export ---------------------------------------------------------------------------
    def to_json(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Everything but the per-query values, as a JSON-ready dict (written to ``path`` if given).

        ``results``: one entry per (model, setting) with each metric's mean, ``ci95`` (a dict
        metric -> [low, high]) and ``n_queries``; ``comparisons``: the default paired comparisons."""
        summary = self.summary()
        results = []
        for (m, s), group in summary.groupby(["model", "setting"], sort=False):
            entry: dict[str, Any] = {"model": m, "setting": s, "dims": self.dims[(m, s)], "n_queries": self.n_queries}
            entry.update({metric: _num(v) for metric, v in zip(group["metric"], group["mean"])})
            entry["ci95" if self.config["confidence"] == 0.95 else "ci"] = {
                metric: [_num(lo), _num(hi)] for metric, lo, hi in zip(group["metric"], group["ci_low"], group["ci_high"])
            }
            results.append(entry)
        comparisons = [
            {key: (_num(v) if isinstance(v, float) else v) for key, v in row.items()}
            for row in self.comparisons().to_dict(orient="records")
        ]
        payload = {"config": self.config, "report": self.report, "results": results, "comparisons": comparisons}
        payload = json.loads(json.dumps(payload, default=_json_default))
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False))
        return payload


def weights_of(embeddings: Embeddings) -> str:
    """The weights identity recorded in an embedding cache's manifest, flagged when random."""
    weights = str((embeddings.manifest.get("identity") or {}).get("weights") or "unknown")
    return f"{weights} (random weights: test only)" if weights.startswith("random-init") else weights


def _num(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return _num(value)
    if isinstance(value, (np.ndarray, tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ============================================================================ evaluation


def _check_ks(ks: Iterable[int]) -> list[int]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise ValueError(f"k must be positive integers, got {list(ks)}")
    return out


def unit_rows(x: np.ndarray, name: str, ids: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (similarity = cosine), left as they are when already unit
    length to 1e-4, the rule the index layer applies, so both backends see the same vectors."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    zero = norms <= 1e-12
    if zero.any():
        raise ValueError(f"{name}: {int(zero.sum())} zero vector(s), e.g. ids {ids[zero][:5].tolist()}; cosine similarity is undefined for them")
    if np.all(np.abs(norms - 1.0) < 1e-4):
        return x
    return np.ascontiguousarray(x / norms[:, None], dtype=np.float32)


def _pca_vectors(train: np.ndarray, vectors: np.ndarray, dims: list[int], seed: int, ids: np.ndarray) -> dict[int, np.ndarray]:
    """Project ``vectors`` onto the first d principal components of ``train`` (fitted once with
    the largest d: exact solvers give nested components), then re-normalise."""
    from sklearn.decomposition import PCA

    top = max(dims)
    solver = "covariance_eigh" if len(train) >= train.shape[1] else "full"
    pca = PCA(n_components=top, svd_solver=solver, random_state=seed).fit(train)
    projected = (vectors - pca.mean_) @ pca.components_.T
    return {d: unit_rows(projected[:, :d], f"pca{d}", ids) for d in dims}


def _candidates(
    catalog: Catalog, embeddings: Mapping[str, Embeddings], split: Split | None, exclude_duplicates: bool
) -> tuple[pd.Index, dict[str, Any]]:
    """Eval items with a vector for every model, minus the copies of duplicate images."""
    items = catalog.items
    if split is not None:
        not_in_catalog = [i for i in split.eval if i not in items.index]
        if not_in_catalog:
            raise ValueError(f"{len(not_in_catalog)} eval id(s) of the split are not in catalog {catalog.name!r}, e.g. {not_in_catalog[:5]}")
        eval_ids = pd.Index(split.eval)
    else:
        eval_ids = items.index
    missing: dict[str, int] = {}
    keep = np.ones(len(eval_ids), dtype=bool)
    for name, emb in embeddings.items():
        has = eval_ids.isin(pd.Index(emb.ids.astype(str)))
        missing[name] = int((~has).sum())
        keep &= has
    ids = eval_ids[keep]
    duplicates = 0
    if exclude_duplicates:
        first = ~duplicate_keys(catalog, list(ids)).duplicated(keep="first").to_numpy()
        duplicates = int((~first).sum())
        ids = ids[first]
    if len(ids) < 2:
        raise ValueError(f"only {len(ids)} evaluable item(s) (eval items with vectors for every model); need at least 2")
    report = {"eval_items": int(len(eval_ids)), "missing_embeddings": missing, "duplicates_excluded": duplicates, "candidates": int(len(ids))}
    return ids, report


def _label_queries(cand_items: pd.DataFrame, columns: list[str]) -> tuple[LabelRelevance, np.ndarray, dict[str, Any]]:
    """Label relevance; queries are the candidates with another member of their class."""
    relevance = label_relevance(cand_items, columns)
    n_rel = relevance.n_relevant(np.arange(len(cand_items)))
    lonely = cand_items.iloc[np.flatnonzero(n_rel == 0)][columns].astype(str).replace("", "(empty)")
    classes = lonely.agg(" > ".join, axis=1).value_counts().sort_index()
    report = {
        "count": int(len(lonely)),
        "classes": {str(k): int(v) for k, v in classes.items()},
        "note": "items with no other member of their class among the candidates: left out of the means, kept as candidates",
    }
    return relevance, np.flatnonzero(n_rel > 0), report


def _interaction_queries(
    interactions: str | os.PathLike | pd.DataFrame, ids: pd.Index, catalog_ids: pd.Index
) -> tuple[InteractionRelevance, np.ndarray, dict[str, Any]]:
    """Interaction relevance; queries are the logged query ids with a relevant candidate."""
    name = "interactions frame" if isinstance(interactions, pd.DataFrame) else Path(interactions).name
    relevance, report = interaction_relevance(read_interactions(interactions), ids, catalog_ids, name)
    return relevance, np.flatnonzero(np.diff(relevance.matrix.indptr) > 0), report


def evaluate_embeddings(
    catalog: Catalog,
    embeddings: Mapping[str, Embeddings],
    *,
    label: str | None = None,
    hierarchy: Sequence[str] | None = None,
    interactions: str | os.PathLike | pd.DataFrame | None = None,
    ks: Iterable[int] = (5, 10),
    metrics: Sequence[str] | None = None,
    split: Split | None = None,
    filter_column: str | None = None,
    exclude_duplicates: bool = True,
    gain: str = "exp2",
    pca_dims: Sequence[int] = (),
    fusions: Sequence[Sequence[str]] = (),
    n_bootstrap: int = 2000,
    n_permutations: int = 10000,
    ci_method: str = "bca",
    confidence: float = 0.95,
    seed: int = 0,
    backend: str = MATRIX,
    index_options: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Evaluate already-loaded embeddings (``{model name: Embeddings}``); see the module
    docstring for the protocol and :func:`evaluate_models` for the arguments."""
    # -- validate the arguments ------------------------------------------------------------
    check_gain(gain)
    ks = _check_ks(ks)
    metric_list = [str(parse_metric(m)) for m in metrics] if metrics else [str(m) for m in default_metrics(ks)]
    depth = max([ks[-1]] + [parse_metric(m).k or ks[-1] for m in metric_list])
    if ci_method not in CI_METHODS:
        raise ValueError(f"ci_method must be one of {', '.join(CI_METHODS)}, got {ci_method!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 2 or n_permutations < 1:
        raise ValueError("n_bootstrap must be >= 2 and n_permutations >= 1")
    if not embeddings:
        raise ValueError("no models to evaluate")
    sources = [x is not None for x in (label, hierarchy, interactions)]
    if sum(sources) > 1:
        raise ValueError("give one relevance source: label, hierarchy or interactions")
    if sum(sources) == 0:
        label = DEFAULT_LABEL
    columns = [label] if label is not None else list(hierarchy or [])
    if hierarchy is not None and not columns:
        raise ValueError("hierarchy needs at least one column, coarse to fine")
    for column in columns + ([filter_column] if filter_column else []):
        catalog.require_column(column)
    for members in fusions:
        unknown = [m for m in members if m not in embeddings]
        if len(members) < 2 or unknown:
            raise ValueError(f"a fusion needs two or more evaluated models; got {list(members)} (models: {', '.join(embeddings)})")
    pca_dims = sorted({int(d) for d in pca_dims})
    if pca_dims and pca_dims[0] < 1:
        raise ValueError(f"pca dims must be positive, got {pca_dims}")
    notes: list[str] = []
    if backend != MATRIX:
        if _index_layer() is None:
            raise ValueError(f"backend {backend!r} needs vrec_utils.index, which cannot be imported; use backend='matrix'")
        from .index import get_index_class

        get_index_class(backend)  # KeyError listing the registered backends
    elif index_options:
        raise ValueError("index_options apply to index backends (e.g. backend='faiss'), not to 'matrix'")

    # -- candidates, relevance, queries ----------------------------------------------------------
    ids, report = _candidates(catalog, embeddings, split, exclude_duplicates)
    n_cand = len(ids)
    if depth > n_cand - 1:
        raise ValueError(
            f"k={depth} is larger than the candidate set: {n_cand} items, so at most {n_cand - 1} candidates per query "
            f"once the query itself is excluded; use k <= {n_cand - 1}"
        )
    cand_items = catalog.items.loc[ids]
    if interactions is not None:
        relevance, query_pos, report["interactions"] = _interaction_queries(interactions, ids, catalog.items.index)
        report["no_relevant"] = {
            "count": report["interactions"]["logged_queries_without_relevant"],
            "classes": {},
            "note": "evaluated items logged as queries whose logged items are all outside the candidates (or themselves)",
        }
        category_column = filter_column
    else:
        relevance, query_pos, report["no_relevant"] = _label_queries(cand_items, columns)
        category_column = columns[-1]
    if len(query_pos) == 0:
        raise ValueError("no query has a relevant candidate; nothing to evaluate")
    n_rel = relevance.n_relevant(query_pos)
    report["queries"] = int(len(query_pos))
    ideal = relevance.ideal(query_pos, depth)

    # -- vectors per model (and fused / reduced variants) ------------------------------------------
    id_array = ids.to_numpy(dtype=str)
    variants = {name: unit_rows(emb.vectors_for(ids), name, id_array) for name, emb in embeddings.items()}
    for members in fusions:
        variants["+".join(members)] = np.hstack([variants[m] for m in members]) / np.float32(np.sqrt(len(members)))
    settings: list[tuple[str, str | None]] = [(UNFILTERED, None)]
    if filter_column:
        settings.append((f"filtered:{filter_column}", filter_column))
    metadata = cand_items[[filter_column]] if filter_column else None
    values: dict[RowKey, dict[str, np.ndarray]] = {}
    dims: dict[RowKey, int] = {}

    def score(name: str, setting_list: list[tuple[str, str | None]], variant: str, vectors: np.ndarray) -> None:
        retriever = _Retriever(backend, variant, id_array, vectors, metadata, index_options or {})
        for setting, column in setting_list:
            rel = relevance.grades(query_pos, retriever.search(query_pos, depth, column))
            values[(name, setting)] = compute_metrics(rel, metric_list, ideal=ideal, n_relevant=n_rel, gain=gain)
            dims[(name, setting)] = vectors.shape[1]

    for name, vectors in variants.items():
        score(name, settings, name, vectors)
    if pca_dims:
        if split is not None:
            notes.append("PCA fitted on the split's train items")
        else:
            notes.append("PCA fitted on the evaluated items themselves (no split given)")
        for name, emb in embeddings.items():
            usable = [d for d in pca_dims if d < emb.dim]
            if len(usable) < len(pca_dims):
                notes.append(f"pca dims >= {emb.dim} skipped for {name} (it has {emb.dim} dimensions)")
            if not usable:
                continue
            if split is not None:
                train = emb.restrict(split.train).vectors.astype(np.float32)
            else:
                train = variants[name]
            usable = [d for d in usable if d <= len(train)]
            if not usable:
                notes.append(f"pca skipped for {name}: only {len(train)} training vectors")
                continue
            for d, reduced in _pca_vectors(train, variants[name], usable, seed, id_array).items():
                score(name, [(f"pca{d}", None)], f"{name}-pca{d}", reduced)

    if filter_column:
        notes.append(f"filtered:{filter_column} keeps candidates with the query's own {filter_column} (an oracle filter)")
        if interactions is None and filter_column == columns[-1]:
            notes.append(
                f"the filter column {filter_column} is the relevance label: every filtered result is relevant by construction; "
                "filter on a coarser column (e.g. subCategory for articleType relevance) to compare fairly"
            )
    config = {
        "relevance": relevance.description,
        "gain": gain,
        "gain_formula": GAIN_FORMULAS[gain],
        "discount": "1 / log2(rank + 1)",
        "ideal_dcg": "over all relevant items among the candidates",
        "map": "AP@k = sum_{i<=k} P@i * rel_i / min(k, n_relevant)",
        "ks": ks,
        "metrics": metric_list,
        "ci_method": ci_method,
        "confidence": confidence,
        "n_bootstrap": int(n_bootstrap),
        "n_permutations": int(n_permutations),
        "pvalue": "two-sided paired sign-flip permutation test of the mean difference",
        "seed": int(seed),
        "backend": backend,
        "index_options": dict(index_options or {}),
        "catalog": catalog.name,
        # which weights made each model's numbers (a digest; "random-init" marks test-only models)
        "weights": {name: weights_of(emb) for name, emb in embeddings.items()},
        "split": None if split is None else {"seed": split.seed, "eval_fraction": split.eval_fraction},
        "exclude_duplicates": bool(exclude_duplicates),
        "filter_column": filter_column,
        "pca_dims": pca_dims,
        "fusions": ["+".join(f) for f in fusions],
        "notes": notes,
    }
    query_ids = id_array[query_pos]
    label_cols = [c for c in catalog.items.columns if c not in ("image", "title")]
    return EvaluationResult(
        query_ids=query_ids,
        candidate_ids=id_array,
        query_items=cand_items.iloc[query_pos][label_cols].reset_index(drop=True),
        values=values,
        metrics=metric_list,
        dims=dims,
        config=config,
        report=report,
        category_column=category_column,
    )


def evaluate_models(
    catalog: Catalog | str | os.PathLike,
    workdir: str | os.PathLike,
    models: Sequence[str],
    *,
    allow_partial: bool = False,
    **options: Any,
) -> EvaluationResult:
    """Evaluate the cached embeddings of ``models`` (loaded with :func:`load_embeddings`).

    Relevance: ``label="articleType"`` (default), ``hierarchy=["masterCategory",
    "subCategory", "articleType"]`` or ``interactions="log.csv"``. Other options:
    ``ks=(5, 10)``, ``metrics`` (default: ndcg, precision, recall, mrr, map at each k),
    ``split`` (evaluate on ``split.eval`` only), ``filter_column``, ``exclude_duplicates=True``,
    ``gain="exp2"`` or ``"linear"``, ``pca_dims=[32, 64, 128]``, ``fusions=[("m1", "m2")]``,
    ``n_bootstrap=2000``, ``n_permutations=10000``, ``ci_method="bca"`` or ``"percentile"``,
    ``confidence=0.95``, ``seed=0``, ``backend="matrix"`` (exact similarity-matrix blocks) or
    an index backend such as ``"faiss"`` (through vrec_utils.index, with ``index_options``). Raises EmbeddingsNotFoundError for a model with no cache, CatalogError for a
    label column that does not exist, and PartialCacheError when catalog items lack a vector
    unless ``allow_partial`` (then items without a vector for every model are left out).
    """
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog)
    names = list(dict.fromkeys(models))
    if not names:
        raise ValueError("no models to evaluate")
    embeddings = {name: load_embeddings(workdir, catalog, name, allow_partial=allow_partial) for name in names}
    return evaluate_embeddings(catalog, embeddings, **options)


__all__ = [
    "EvaluationResult",
    "InteractionRelevance",
    "LabelRelevance",
    "bootstrap_ci",
    "duplicate_keys",
    "evaluate_embeddings",
    "evaluate_models",
    "interaction_relevance",
    "label_relevance",
    "paired_permutation_pvalue",
    "read_interactions",
    "search_matrix",
    "unit_rows",
]
