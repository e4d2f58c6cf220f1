"""Part 3: how much of each model's quality is the category filter's.

The source article's central claim is that the vision-language model needs no category filter
and the CNN does. Per model: the share of its unfiltered top-k that lies outside the query's
category (a "violation"), nDCG@5 unfiltered and filtered (an oracle filter: the query's own
category), and the gap; then the paired difference of those between the two models, each with a
bootstrap CI over the same resampled queries.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..evaluation import bootstrap_ci, paired_permutation_pvalue
from .data import DecisionData


def violation_share(retrieved: np.ndarray, groups: np.ndarray, query_pos: np.ndarray) -> np.ndarray:
    """Per query: the share of its retrieved items (-1 = none) whose group differs from the query's."""
    valid = retrieved >= 0
    other = (groups[np.maximum(retrieved, 0)] != groups[query_pos][:, None]) & valid
    n = valid.sum(axis=1)
    return np.divide(other.sum(axis=1), n, out=np.zeros(len(n)), where=n > 0)


def filter_rows(data: DecisionData) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """Per-query values of ``(model, "unfiltered")`` and ``(model, "filtered")`` rows, dims, and
    each model's per-query violation share of its unfiltered top-k."""
    if data.category_column is None:
        raise ValueError("part 3 needs a category column; the catalog has none")
    values, dims, violations = {}, {}, {}
    for model in data.models:
        x = data.vectors[model]
        unfiltered = data.search(x, x)
        values[(model, "unfiltered")] = data.score(unfiltered)
        values[(model, "filtered")] = data.score(data.search(x, x, filtered=True))
        dims[(model, "unfiltered")] = dims[(model, "filtered")] = x.shape[1]
        violations[model] = violation_share(unfiltered, data.groups, data.query_pos)
    return values, dims, violations


def _ci(data: DecisionData, per_query: np.ndarray) -> tuple[float, float]:
    low, high = bootstrap_ci(per_query, n_resamples=data.n_bootstrap, method="percentile", seed=data.seed)
    return float(low), float(high)


def filter_table(data: DecisionData, result, violations: dict[str, np.ndarray], metric: str = "ndcg@5") -> pd.DataFrame:
    """Per model: violation share (with CI), nDCG unfiltered, filtered, and the gap (filtered -
    unfiltered, paired CI and p)."""
    rows = []
    for model in data.models:
        gap = result.compare((model, "unfiltered"), (model, "filtered"), [metric]).iloc[0]
        low, high = _ci(data, violations[model])
        rows.append({
            "model": data.labels[model], "category_column": data.category_column, f"violation_share@{data.k}": violations[model].mean(),
            "violation_low": low, "violation_high": high, f"{metric}_unfiltered": gap["mean_a"], f"{metric}_filtered": gap["mean_b"],
            "gap": gap["diff"], "gap_low": gap["diff_ci_low"], "gap_high": gap["diff_ci_high"], "gap_p": gap["p_value"],
            "n_queries": data.n_queries,
        })
    return pd.DataFrame(rows)


def filter_contrast(data: DecisionData, result, violations: dict[str, np.ndarray], metric: str = "ndcg@5") -> pd.DataFrame:
    """The first model against the second: paired differences (first - second) of the violation
    share and of the filter's gain, and the second model unfiltered against the first filtered
    (does the VLM without a filter match the CNN with one?)."""
    if len(data.models) < 2:
        return pd.DataFrame()
    a, b = data.models[:2]
    gap_a = result.values[(a, "filtered")][metric] - result.values[(a, "unfiltered")][metric]
    gap_b = result.values[(b, "filtered")][metric] - result.values[(b, "unfiltered")][metric]
    rows = []
    for what, d in ((f"violation_share@{data.k}: {data.labels[a]} - {data.labels[b]}", violations[a] - violations[b]),
                    (f"filter gain in {metric}: {data.labels[a]} - {data.labels[b]}", gap_a - gap_b)):
        low, high = _ci(data, d)
        p = float(paired_permutation_pvalue(d, n_permutations=data.n_permutations, seed=data.seed))
        rows.append({"quantity": what, "diff": d.mean(), "diff_low": low, "diff_high": high, "p_value": p})
    cross = result.compare((a, "filtered"), (b, "unfiltered"), [metric]).iloc[0]
    rows.append({"quantity": f"{metric}: {data.labels[b]} unfiltered - {data.labels[a]} filtered", "diff": cross["diff"],
                 "diff_low": cross["diff_ci_low"], "diff_high": cross["diff_ci_high"], "p_value": cross["p_value"]})
    frame = pd.DataFrame(rows)
    frame["n_queries"] = data.n_queries
    return frame


__all__ = ["filter_contrast", "filter_rows", "filter_table", "violation_share"]
