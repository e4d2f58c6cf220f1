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

All queries are retrieved at once, by blocks of the exact similarity matrix (``backend="matrix"``,
the default) or through the serving path, :mod:`vrec_utils.index` (``backend="faiss"`` or any
registered index backend, with ``index_options``). Exact backends give the same lists: the one exact
top-k of the project is :mod:`vrec_utils.index.exact`.

Map (each layer imports only those above it):

* ``config``: :class:`EvalConfig`, the frozen settings (checked when built), and the constants.
* ``relevance``: label / hierarchy / interaction relevance and the queries it allows.
* ``statistics``: bootstrap intervals and paired permutation p-values.
* ``result``: :class:`EvaluationResult` (summaries, comparisons, per-category, JSON).
* ``candidates``: the evaluated items (shared by every model, duplicates out), unit rows, PCA.
* ``retrieval``: one model's top-k lists (matrix or index backend).
* ``protocol``: ``evaluate(catalog, embeddings, EvalConfig(...))``, and the keyword wrappers
  ``evaluate_embeddings`` / ``evaluate_models``.

Usage::

    from vrec_utils.evaluation import EvalConfig, evaluate
    result = evaluate(catalog, {"m": embeddings}, EvalConfig(ks=(5, 10), filter_column="subCategory"))
"""

from __future__ import annotations

from ..index.exact import leave_one_out_knn
from .candidates import duplicate_keys, unit_rows
from .config import (
    CI_METHODS,
    DEFAULT_LABEL,
    GAIN_FORMULAS,
    MATRIX,
    UNFILTERED,
    EvalConfig,
)
from .protocol import evaluate, evaluate_embeddings, evaluate_models, weights_of
from .relevance import (
    InteractionRelevance,
    LabelRelevance,
    interaction_relevance,
    label_relevance,
    read_interactions,
)
from .result import EvaluationResult, RowKey
from .statistics import bootstrap_ci, paired_permutation_pvalue

__all__ = [
    "CI_METHODS", "DEFAULT_LABEL", "GAIN_FORMULAS", "MATRIX", "UNFILTERED", "EvalConfig", "EvaluationResult", "InteractionRelevance",
    "LabelRelevance", "RowKey", "bootstrap_ci", "duplicate_keys", "evaluate", "evaluate_embeddings", "evaluate_models",
    "interaction_relevance", "label_relevance", "leave_one_out_knn", "paired_permutation_pvalue", "read_interactions", "unit_rows",
    "weights_of",
]
