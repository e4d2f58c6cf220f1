"""Relevance: which candidates are relevant to a query, and how much (graded).

From labels (:class:`LabelRelevance`: binary on one column, or graded along a hierarchy) or from
an interaction log (:class:`InteractionRelevance`); :func:`label_queries` and
:func:`interaction_queries` also pick the queries (candidates with a relevant candidate).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from ..metrics import ideal_from_counts, ideal_from_sparse_rows


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
        "rows": len(log),
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
        "logged_queries_without_relevant": len(np.setdiff1d(q_pos[q_pos >= 0], q_pos[use])),
    }
    if not use.any():
        raise ValueError(
            f"no usable interaction in {source}: {report['rows']} row(s), {report['unknown_id_rows']} with ids not in "
            f"the catalog (e.g. {', '.join(unknown_ids[:5]) or '-'}), {report['outside_candidates_rows']} outside the "
            f"evaluated items, {report['self_pair_rows']} self pairs, {report['zero_weight_rows']} with weight 0"
        )
    return InteractionRelevance(matrix, source), report


def label_queries(cand_items: pd.DataFrame, columns: list[str]) -> tuple[LabelRelevance, np.ndarray, dict[str, Any]]:
    """Label relevance; queries are the candidates with another member of their class."""
    relevance = label_relevance(cand_items, columns)
    n_rel = relevance.n_relevant(np.arange(len(cand_items)))
    lonely = cand_items.iloc[np.flatnonzero(n_rel == 0)][columns].astype(str).replace("", "(empty)")
    classes = lonely.agg(" > ".join, axis=1).value_counts().sort_index()
    report = {
        "count": len(lonely),
        "classes": {str(k): int(v) for k, v in classes.items()},
        "note": "items with no other member of their class among the candidates: left out of the means, kept as candidates",
    }
    return relevance, np.flatnonzero(n_rel > 0), report


def interaction_queries(
    interactions: str | os.PathLike | pd.DataFrame, ids: pd.Index, catalog_ids: pd.Index
) -> tuple[InteractionRelevance, np.ndarray, dict[str, Any]]:
    """Interaction relevance; queries are the logged query ids with a relevant candidate."""
    name = "interactions frame" if isinstance(interactions, pd.DataFrame) else Path(interactions).name
    relevance, report = interaction_relevance(read_interactions(interactions), ids, catalog_ids, name)
    return relevance, np.flatnonzero(np.diff(relevance.matrix.indptr) > 0), report


__all__ = [
    "InteractionRelevance", "LabelRelevance", "interaction_queries", "interaction_relevance", "label_queries", "label_relevance",
    "read_interactions",
]
