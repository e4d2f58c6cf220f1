"""Part 7's second source of relevance: an interaction log (``query_id,item_id[,weight]``, as
``vrec evaluate --interactions`` reads it). The paired nDCG@5 difference of the two models over
the logged queries, graded by the summed weights, beside the label one, so that the verdict can
say what labels and what users' behaviour each say.

Same search as the label rows (exact, the query never its own result, every candidate
searchable); the queries are the logged query ids with a relevant candidate (all of them: no
``max_queries`` subset); rows of the log that cannot be used are counted in the note.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..evaluation.relevance import interaction_relevance, read_interactions
from .data import DecisionData


def read_log(interactions: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The validated log and its name (read before any work, so a bad file fails first)."""
    name = "interactions frame" if isinstance(interactions, pd.DataFrame) else Path(interactions).name
    return read_interactions(interactions), name


def interaction_quality(data: DecisionData, log: pd.DataFrame, source: str = "interactions", metric: str = "ndcg@5") -> tuple[pd.DataFrame, str]:
    """The paired comparison (second model - first) of ``metric`` against ``log`` (from
    :func:`read_log`), as one row like the label row of the ``quality`` table (``relevance`` says
    where it comes from), and a one-line note on the log's usable rows."""
    relevance, report = interaction_relevance(log, pd.Index(data.ids), data.catalog.items.index, source)
    query_pos = np.flatnonzero(np.diff(relevance.matrix.indptr) > 0)
    view = dataclasses.replace(data, relevance=relevance, query_pos=query_pos)
    a, b = data.models[0], data.models[1]
    values = {(m, "float32"): view.score(view.search(view.vectors[m], view.vectors[m])) for m in (a, b)}
    result = view.result(values, {(m, "float32"): view.dim(m) for m in (a, b)})
    row = result.compare((a, "float32"), (b, "float32"), [metric])
    row["model_a"], row["model_b"] = data.labels[a], data.labels[b]
    row["relevance"] = relevance.description
    row["n_queries"] = len(query_pos)
    note = (f"interactions ({relevance.source}): {report['used_rows']} of {report['rows']} rows used, {len(query_pos)} logged queries "
            f"with a relevant candidate; {report['unknown_id_rows']} with ids not in the catalog, {report['outside_candidates_rows']} "
            f"outside the evaluated items, {report['self_pair_rows']} self pairs, {report['zero_weight_rows']} with weight 0")
    return row, note


__all__ = ["interaction_quality", "read_log"]
