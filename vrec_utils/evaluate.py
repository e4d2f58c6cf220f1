"""Compatibility facade: evaluation lives in :mod:`vrec_utils.evaluation` (a package: config,
relevance, statistics, result, candidates, retrieval, protocol). This module re-exports its public
names so that ``from vrec_utils.evaluate import evaluate_models`` keeps working; new code imports
from :mod:`vrec_utils.evaluation`."""

from __future__ import annotations

from .evaluation import (
    CI_METHODS,
    DEFAULT_LABEL,
    GAIN_FORMULAS,
    MATRIX,
    UNFILTERED,
    EvalConfig,
    EvaluationResult,
    InteractionRelevance,
    LabelRelevance,
    RowKey,
    bootstrap_ci,
    duplicate_keys,
    evaluate,
    evaluate_embeddings,
    evaluate_models,
    interaction_relevance,
    label_relevance,
    paired_permutation_pvalue,
    read_interactions,
    unit_rows,
    weights_of,
)
from .index.exact import (
    leave_one_out_knn as search_matrix,  # its name before it moved to index/exact.py
)

__all__ = [
    "CI_METHODS", "DEFAULT_LABEL", "GAIN_FORMULAS", "MATRIX", "UNFILTERED", "EvalConfig", "EvaluationResult", "InteractionRelevance",
    "LabelRelevance", "RowKey", "bootstrap_ci", "duplicate_keys", "evaluate", "evaluate_embeddings", "evaluate_models",
    "interaction_relevance", "label_relevance", "paired_permutation_pvalue", "read_interactions", "search_matrix", "unit_rows",
    "weights_of",
]
