"""What every part of the decision report works on: the cached embeddings of the compared models
over one shared set of items, the label relevance of those items, and the leave-one-out search
that turns (query vectors, database vectors) into nDCG@k per query.

Items and queries follow :mod:`vrec_utils.evaluation` (candidates every model has a vector for,
copies of one image counted once, queries = candidates with a relevant candidate); the query is
never its own result. ``max_queries`` keeps a seeded subset of the queries (every candidate
stays searchable) to bound the time on large catalogs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..catalog import Catalog, Split, hash_unit_interval
from ..evaluation import EvaluationResult, unit_rows, weights_of
from ..evaluation.candidates import select_candidates
from ..evaluation.relevance import LabelRelevance, label_queries
from ..index.exact import canonical_top_k, exact_knn, leave_one_out_knn
from ..metrics import compute_metrics
from ..profiles import display_name
from ..store import Embeddings, load_embeddings

DEFAULT_METRICS = ("ndcg@5", "precision@5")


@dataclass
class DecisionData:
    """Unit vectors of every model over the shared candidates, relevance and queries.

    ``vectors[model]`` rows follow ``ids``; ``train[model]`` are the vectors PCA and the
    quantisers are fitted on (the split's train items, else the candidates themselves);
    ``groups`` are integer codes of the category column (None without one)."""

    catalog: Catalog
    models: list[str]
    labels: dict[str, str]  # model -> name shown in tables and figures
    ids: np.ndarray
    vectors: dict[str, np.ndarray]
    train: dict[str, np.ndarray]
    relevance: LabelRelevance
    query_pos: np.ndarray
    category_column: str | None
    groups: np.ndarray | None
    label_column: str
    seed: int = 0
    n_bootstrap: int = 1000
    n_permutations: int = 5000
    metrics: tuple[str, ...] = DEFAULT_METRICS
    notes: list[str] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return max(int(m.split("@")[1]) for m in self.metrics)

    @property
    def n_queries(self) -> int:
        return len(self.query_pos)

    def dim(self, model: str) -> int:
        return int(self.vectors[model].shape[1])

    # -- search and scoring ---------------------------------------------------------------
    def search(self, queries: np.ndarray, database: np.ndarray, k: int | None = None, *, filtered: bool = False,
               rerank: tuple[np.ndarray, int] | None = None) -> np.ndarray:
        """Top-k candidate positions (n_queries, k) for the queries, the query itself excluded.

        ``queries`` are all candidates' query-side vectors (rows follow ``ids``), ``database`` the
        stored side (decoded codes, or the same vectors). ``filtered`` searches only the query's
        category. ``rerank=(float vectors, c)``: take the top c by ``queries . database``, then
        rescore those with the float vectors (same tie rule as exact search)."""
        return loo_search(queries, database, self.query_pos, k or self.k, self.groups if filtered else None, rerank)

    def score(self, retrieved: np.ndarray) -> dict[str, np.ndarray]:
        """Per-query values of ``metrics`` for retrieved candidate positions."""
        q = self.query_pos
        rel = self.relevance.grades(q, retrieved)
        n_rel = self.relevance.n_relevant(q)
        return compute_metrics(rel, list(self.metrics), ideal=self.relevance.ideal(q, self.k), n_relevant=n_rel)

    def result(self, values: Mapping[tuple[str, str], dict[str, np.ndarray]], dims: Mapping[tuple[str, str], int]) -> EvaluationResult:
        """An :class:`EvaluationResult` of these rows: bootstrap CIs and paired comparisons that
        resample the same queries for every row."""
        config = {"n_bootstrap": self.n_bootstrap, "n_permutations": self.n_permutations, "seed": self.seed,
                  "ci_method": "percentile", "confidence": 0.95}
        items = self.catalog.items.loc[self.ids[self.query_pos]].reset_index(drop=True)
        return EvaluationResult(
            query_ids=self.ids[self.query_pos], candidate_ids=self.ids, query_items=items, values=dict(values),
            metrics=list(self.metrics), dims=dict(dims), config=config, report={}, category_column=self.label_column,
        )


def loo_search(queries: np.ndarray, database: np.ndarray, query_pos: np.ndarray, k: int,
               groups: np.ndarray | None = None, rerank: tuple[np.ndarray, int] | None = None) -> np.ndarray:
    """Leave-one-out top-k (see :meth:`DecisionData.search`); -1 where fewer than k exist."""
    query_pos = np.asarray(query_pos, dtype=np.int64)
    out = np.full((len(query_pos), k), -1, dtype=np.int64)
    if groups is None:
        jobs = [(np.arange(len(query_pos)), np.arange(len(database)))]
    else:
        codes = groups[query_pos]
        jobs = [(np.flatnonzero(codes == g), np.flatnonzero(groups == g)) for g in np.unique(codes)]
    for rows, members in jobs:
        local_q = np.searchsorted(members, query_pos[rows])
        wanted = rerank[1] if rerank is not None else k
        if queries is database and rerank is None:  # symmetric: the evaluation's exact kernel
            found = leave_one_out_knn(database[members], local_q, k)
        else:
            found = _drop_self(exact_knn(queries[members][local_q], database[members], min(wanted + 1, len(members)))[1], local_q, wanted)
            if rerank is not None:
                floats = rerank[0][members]
                found = canonical_top_k(floats[local_q], floats, found, k, complete=True)[1]
        found = found[:, :k]
        found = np.pad(found, ((0, 0), (0, k - found.shape[1])), constant_values=-1)
        out[rows] = np.where(found >= 0, members[np.maximum(found, 0)], -1)
    return out


def _drop_self(found: np.ndarray, self_pos: np.ndarray, k: int) -> np.ndarray:
    """Each row without its own query position, the first k kept (-1 padded)."""
    keep = found != self_pos[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in their order
    out = np.where(np.take_along_axis(keep, order, axis=1), np.take_along_axis(found, order, axis=1), -1)[:, :k]
    return np.pad(out, ((0, 0), (0, max(0, k - out.shape[1]))), constant_values=-1)


def model_label(model: str, embeddings: Embeddings) -> str:
    """The name shown for a model: its display name, marked when its weights are random."""
    name = display_name(model)
    return f"{name} (random weights: test only)" if "random weights" in weights_of(embeddings) else name


def load_decision_data(
    catalog: Catalog, workdir, models: Sequence[str], **options: Any
) -> DecisionData:
    """:func:`decision_data` over the cached embeddings of ``models``. A model without a cache
    raises EmbeddingsNotFoundError naming the ``vrec extract`` command that makes it."""
    embeddings = {m: load_embeddings(workdir, catalog, m) for m in dict.fromkeys(models)}
    return decision_data(catalog, embeddings, **options)


def decision_data(
    catalog: Catalog,
    embeddings: Mapping[str, Embeddings],
    *,
    label: str = "articleType",
    category_column: str | None = "subCategory",
    split: Split | None = None,
    max_queries: int | None = None,
    seed: int = 0,
    n_bootstrap: int = 1000,
    n_permutations: int = 5000,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> DecisionData:
    """Shared candidates, queries and vectors of ``embeddings`` (at least one model).

    ``category_column`` is the filter of parts 2-4 (None, or a column the catalog lacks, turns
    them off with a note). ``split``: fit PCA and quantisers on its train items and query its
    eval items; without one they are fitted on the candidates (noted)."""
    if not embeddings:
        raise ValueError("the decision report needs at least one model")
    catalog.require_column(label)
    notes: list[str] = []
    if category_column is not None and category_column not in catalog.items.columns:
        notes.append(f"the catalog has no {category_column!r} column: the filter and per-category parts (3-4) are skipped")
        category_column = None
    ids, _ = select_candidates(catalog, embeddings, split, exclude_duplicates=True)
    cand = catalog.items.loc[ids]
    relevance, query_pos, _ = label_queries(cand, [label])
    if max_queries is not None and len(query_pos) > max_queries:
        keys = hash_unit_interval(ids[query_pos], f"decision-queries-{seed}")
        query_pos = np.sort(query_pos[np.argsort(keys, kind="stable")[:max_queries]])
        notes.append(f"{max_queries} of the queries drawn with seed {seed} (every item stays a candidate)")
    ids_arr = ids.to_numpy(dtype=str)
    vectors = {m: unit_rows(e.vectors_for(ids_arr), m, ids_arr) for m, e in embeddings.items()}
    if split is not None:
        train = {}
        for m, e in embeddings.items():
            part = e.restrict(split.train)
            train[m] = unit_rows(part.vectors, m, np.asarray(part.ids))
        notes.append("PCA and quantisers fitted on the split's train items")
    else:
        train = vectors
        notes.append("PCA and quantisers fitted on the evaluated items themselves (no split given)")
    groups = pd.factorize(cand[category_column].astype(str))[0] if category_column else None
    return DecisionData(
        catalog=catalog, models=list(embeddings), labels={m: model_label(m, e) for m, e in embeddings.items()}, ids=ids_arr,
        vectors=vectors, train=train, relevance=relevance, query_pos=np.asarray(query_pos, dtype=np.int64),
        category_column=category_column, groups=groups, label_column=label, seed=seed, n_bootstrap=n_bootstrap,
        n_permutations=n_permutations, metrics=tuple(metrics), notes=notes,
        weights={m: weights_of(e) for m, e in embeddings.items()},
    )


def seeded_rows(n: int, size: int, seed: int, salt: str) -> np.ndarray:
    """``size`` of ``range(n)`` drawn with ``seed`` (sorted)."""
    rng = np.random.default_rng([seed, sum(map(ord, salt))])
    return np.sort(rng.choice(n, size=min(n, size), replace=False))


__all__ = ["DEFAULT_METRICS", "DecisionData", "decision_data", "load_decision_data", "loo_search", "model_label", "seeded_rows"]
