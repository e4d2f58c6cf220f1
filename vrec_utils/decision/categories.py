"""Part 4: where each model wins. Per category, the paired difference of nDCG@5 (second model -
first) over that category's queries, its bootstrap CI and sign-flip permutation p-value, and the
p-values adjusted for the number of categories tested (Holm's step-down, which controls the
family-wise error rate, or Benjamini-Hochberg, which controls the false discovery rate;
``statsmodels.stats.multitest.multipletests``). A model "wins" a category when the adjusted
p-value is below ``alpha``; each such category names one example query (the one with the largest
difference in the winner's favour) for a recommendation grid.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

from ..evaluation import bootstrap_ci, paired_permutation_pvalue
from .data import DecisionData

CORRECTIONS = {"holm": "Holm step-down (family-wise error rate)", "fdr_bh": "Benjamini-Hochberg (false discovery rate)"}


def adjust_pvalues(p: np.ndarray, method: str = "holm", alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(reject, adjusted p) for ``method`` in :data:`CORRECTIONS` (statsmodels' multipletests)."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {method!r}")
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 0:
        return np.zeros(0, dtype=bool), np.zeros(0)
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method=method)
    return reject, adjusted


def category_table(data: DecisionData, result, metric: str = "ndcg@5", setting: str = "unfiltered", min_queries: int = 5,
                   correction: str = "holm", alpha: float = 0.05) -> pd.DataFrame:
    """One row per category with at least ``min_queries`` queries, sorted by the difference."""
    if data.category_column is None:
        raise ValueError("part 4 needs a category column; the catalog has none")
    if len(data.models) < 2:
        return pd.DataFrame()
    a, b = data.models[:2]
    d = result.values[(b, setting)][metric] - result.values[(a, setting)][metric]
    categories = data.catalog.items.loc[data.ids[data.query_pos], data.category_column].astype(str).to_numpy()
    rows = []
    for category in sorted(set(categories)):
        members = np.flatnonzero(categories == category)
        if len(members) < min_queries:
            continue
        part = d[members]
        low, high = bootstrap_ci(part, n_resamples=data.n_bootstrap, method="percentile", seed=data.seed)
        p = float(paired_permutation_pvalue(part, n_permutations=data.n_permutations, seed=data.seed))
        best = members[np.argmax(part)] if part.mean() >= 0 else members[np.argmin(part)]
        rows.append({data.category_column: category, "n_queries": len(members),
                     f"{metric} {data.labels[a]}": result.values[(a, setting)][metric][members].mean(),
                     f"{metric} {data.labels[b]}": result.values[(b, setting)][metric][members].mean(),
                     "diff": part.mean(), "diff_low": float(low), "diff_high": float(high), "p_value": p,
                     "example_query": str(data.ids[data.query_pos[best]])})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    reject, adjusted = adjust_pvalues(frame["p_value"].to_numpy(), correction, alpha)
    frame["p_adjusted"] = adjusted
    frame["correction"] = correction
    frame["winner"] = np.where(reject & (frame["diff"] > 0), data.labels[b], np.where(reject & (frame["diff"] < 0), data.labels[a], "no clear winner"))
    return frame.sort_values(["diff", data.category_column], ascending=[False, True], kind="stable", ignore_index=True)


def winners(frame: pd.DataFrame, model_label: str) -> pd.DataFrame:
    """The categories ``model_label`` wins (after the correction)."""
    return frame[frame["winner"] == model_label] if len(frame) else frame


__all__ = ["CORRECTIONS", "adjust_pvalues", "category_table", "winners"]
