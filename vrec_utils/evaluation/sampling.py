"""Sampled queries for large catalogs: a seeded sample, stratified by the relevance label.

Every label keeps its share of the queries (largest-remainder rounding, at least one query per
label while the sample allows), so rare classes are not lost by chance; within a label the
queries are drawn uniformly with ``np.random.default_rng(seed)``. The sampled queries still
search the whole candidate set; the bootstrap over them then shows the sampling uncertainty.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def stratified_sample(positions: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` of ``positions`` (sorted), stratified by ``labels`` (same length); all when ``n``
    is not smaller than the number of positions."""
    positions = np.asarray(positions)
    if n < 1:
        raise ValueError(f"the query sample must be >= 1, got {n}")
    if n >= len(positions):
        return positions
    groups = pd.Series(np.arange(len(positions))).groupby(pd.Series(labels, dtype=str).to_numpy(), sort=True)
    sizes = groups.size()
    quota = sizes / sizes.sum() * n
    take = np.floor(quota).astype(int)
    if n >= len(sizes):
        take = take.clip(lower=1)  # every label represented while the sample allows
    remainder = (quota - np.floor(quota)).sort_values(ascending=False, kind="stable")
    for label in remainder.index:  # largest remainders first, up to n
        if take.sum() >= n:
            break
        if take[label] < min(sizes[label], np.ceil(quota[label])):
            take[label] += 1
    while take.sum() > n:  # the at-least-one rule overshot: trim the largest strata
        take[take.idxmax()] -= 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(members.to_numpy(), size=int(take[label]), replace=False) for label, members in groups]
    return np.sort(positions[np.concatenate(chosen)])


__all__ = ["stratified_sample"]
