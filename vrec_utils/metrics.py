"""Ranking metrics as pure array kernels: one row per query, no I/O, no pandas.

Every kernel takes ``rel``, an ``(n_queries, depth)`` matrix with the relevance *grade* of the
item retrieved at each rank (0 = not relevant, also used for padding when fewer than ``depth``
items were retrieved), and returns one float64 value per query. Relevant means grade > 0.
When ``depth < k`` the missing ranks count as non-relevant, so a short list is never rewarded.

Definitions (``rel_i`` the grade at rank i, ``R`` the number of relevant items in the
candidate set, ``[x]`` is 1 when x holds):

* ``dcg@k = sum_{i<=k} g(rel_i) / log2(i + 1)`` with ``g(r) = 2**r - 1`` (``gain="exp2"``,
  Burges et al.; ranx ``ndcg_burges``) or ``g(r) = r`` (``gain="linear"``, Järvelin and
  Kekäläinen; sklearn ``ndcg_score`` and ranx ``ndcg``). For binary relevance the two agree.
* ``ndcg@k = dcg@k / idcg@k`` where ``idcg@k`` is the DCG of the best possible ordering of
  *all* relevant items in the candidate set (not only the retrieved ones). 0 when R = 0.
* ``precision@k = #{i<=k: rel_i>0} / k`` (the denominator stays k when fewer were retrieved).
* ``recall@k = #{i<=k: rel_i>0} / R`` (0 when R = 0).
* ``mrr@k = 1 / (rank of the first relevant item within the top k)``, 0 when there is none;
  plain ``mrr`` uses the whole retrieved list.
* ``map@k``: ``AP@k = sum_{i<=k} P@i * [rel_i>0] / min(k, R)`` (0 when R = 0), the usual
  "mAP@k" normalisation, so a perfect top-k scores 1 even when R > k. ranx's ``map@k`` divides
  by R instead (trec_eval's truncated AP); the two agree whenever R <= k.

Ties: the kernels score the list as given; the retriever breaks score ties (see
:func:`vrec_utils.index.exact.canonical_top_k`). sklearn's ``ndcg_score`` instead averages the gains
of tied scores by default (``ignore_ties=False``); it agrees with these kernels when given
scores that reproduce the list order (tests/test_metrics.py does that, and checks ranx too).

Metric names are strings such as ``"ndcg@5"`` (see :func:`parse_metric`), the same in
notebooks, the CLI and the JSON output.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

GAINS = ("exp2", "linear")
METRIC_NAMES = ("ndcg", "precision", "recall", "mrr", "map")
_ALIASES = {"p": "precision", "r": "recall", "ap": "map", "mr": "mrr"}


@dataclass(frozen=True, order=True)
class Metric:
    """A parsed metric string: ``name`` in :data:`METRIC_NAMES`, ``k`` the cut-off (None: all)."""

    name: str
    k: int | None = None

    def __str__(self) -> str:
        return self.name if self.k is None else f"{self.name}@{self.k}"


def parse_metric(text: str | Metric) -> Metric:
    """``"ndcg@5"`` -> ``Metric("ndcg", 5)``; ``"mrr"`` -> ``Metric("mrr", None)``.

    Only ``mrr`` may omit the cut-off. Raises ValueError naming the valid metrics.
    """
    if isinstance(text, Metric):
        return text
    name, _, k_text = str(text).strip().lower().partition("@")
    name = _ALIASES.get(name, name)
    valid = ", ".join(f"{m}@K" for m in METRIC_NAMES) + ", mrr"
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {text!r}; valid: {valid} (K a positive integer)")
    if not k_text:
        if name != "mrr":
            raise ValueError(f"metric {text!r} needs a cut-off, e.g. {name}@5")
        return Metric(name, None)
    try:
        k = int(k_text)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"metric {text!r}: the cut-off after '@' must be a positive integer")
    return Metric(name, k)


def default_metrics(ks: Iterable[int]) -> list[Metric]:
    """ndcg, precision, recall, mrr and map at each k, in that order (k ascending)."""
    return [Metric(name, int(k)) for k in sorted(set(ks)) for name in METRIC_NAMES]


def check_gain(gain: str) -> str:
    if gain not in GAINS:
        raise ValueError(f"gain must be one of {', '.join(GAINS)}, got {gain!r}")
    return gain


# ------------------------------------------------------------------------------------- helpers


def _top(rel: np.ndarray, k: int) -> np.ndarray:
    """The first k columns as float64, padded with zeros when fewer than k were retrieved."""
    rel = np.asarray(rel, dtype=np.float64)
    if rel.ndim != 2:
        raise ValueError(f"relevance must be a 2-d (n_queries, depth) array, got shape {rel.shape}")
    if rel.shape[1] >= k:
        return rel[:, :k]
    return np.pad(rel, ((0, 0), (0, k - rel.shape[1])))


def _gain(grades: np.ndarray, gain: str) -> np.ndarray:
    return np.exp2(grades) - 1.0 if gain == "exp2" else grades


def discounts(k: int) -> np.ndarray:
    """``1 / log2(i + 1)`` for ranks i = 1..k."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


# -------------------------------------------------------------------------------- ideal lists


def ideal_from_counts(n_at_least: np.ndarray, k: int) -> np.ndarray:
    """Ideal top-k grades from counts: ``n_at_least[q, g-1]`` = how many candidates of query q
    have grade >= g (g = 1..G, so each row is non-increasing). Returns ``(n_queries, k)``.

    The ideal list puts the ``n_at_least[:, G-1]`` items of grade G first, then grade G-1, and
    so on; rank j (0-based) therefore has grade ``#{g: j < n_at_least[g-1]}``. This is how label
    relevance gets its ideal DCG without materialising the full relevance matrix.
    """
    counts = np.asarray(n_at_least, dtype=np.int64)
    if counts.ndim == 1:
        counts = counts[:, None]
    ranks = np.arange(k, dtype=np.int64)
    return (ranks[None, None, :] < counts[:, :, None]).sum(axis=1).astype(np.float64)


def ideal_from_sparse_rows(indptr: np.ndarray, data: np.ndarray, k: int) -> np.ndarray:
    """Ideal top-k grades for CSR-style rows (``data[indptr[q]:indptr[q+1]]`` are the grades of
    query q's relevant candidates, in any order): each row's k largest, descending, 0-padded."""
    indptr = np.asarray(indptr, dtype=np.int64)
    data = np.asarray(data, dtype=np.float64)
    n = len(indptr) - 1
    out = np.zeros((n, k), dtype=np.float64)
    if len(data) == 0:
        return out
    row = np.repeat(np.arange(n), np.diff(indptr))
    order = np.lexsort((-data, row))  # by row, then grade descending
    rank = np.arange(len(data)) - indptr[row[order]]
    keep = rank < k
    out[row[order][keep], rank[keep]] = data[order][keep]
    return out


# ------------------------------------------------------------------------------------ kernels


def dcg_at_k(rel: np.ndarray, k: int, gain: str = "exp2") -> np.ndarray:
    """Discounted cumulative gain of the first k ranks (see the module docstring)."""
    return _gain(_top(rel, k), gain) @ discounts(k)


def ndcg_at_k(rel: np.ndarray, ideal: np.ndarray, k: int, gain: str = "exp2") -> np.ndarray:
    """``dcg@k(rel) / dcg@k(ideal)``; ``ideal`` holds each query's best possible grades sorted
    descending (any width: extra columns are ignored, missing ones count as 0). 0 where the
    ideal DCG is 0 (no relevant candidate), as sklearn and ranx do."""
    return _safe_divide(dcg_at_k(rel, k, gain), dcg_at_k(ideal, k, gain))


def hits_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    return (_top(rel, k) > 0).sum(axis=1).astype(np.float64)


def precision_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    return hits_at_k(rel, k) / k


def recall_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    return _safe_divide(hits_at_k(rel, k), n_relevant)


def reciprocal_rank(rel: np.ndarray, k: int | None = None) -> np.ndarray:
    """1 / rank of the first relevant item in the top k (whole list when k is None), else 0."""
    top = _top(rel, np.asarray(rel).shape[1] if k is None else k) > 0
    first = np.argmax(top, axis=1)
    found = top[np.arange(len(top)), first] if len(top) else np.zeros(0, dtype=bool)
    return np.where(found, 1.0 / (first + 1.0), 0.0)


def average_precision_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """``AP@k = sum_{i<=k} P@i * [rel_i > 0] / min(k, R)``; 0 when R = 0."""
    hit = (_top(rel, k) > 0).astype(np.float64)
    precision_at_i = np.cumsum(hit, axis=1) / np.arange(1, k + 1)
    return _safe_divide((precision_at_i * hit).sum(axis=1), np.minimum(k, np.asarray(n_relevant)))


def compute_metrics(
    rel: np.ndarray,
    metrics: Iterable[str | Metric],
    *,
    ideal: np.ndarray,
    n_relevant: np.ndarray,
    gain: str = "exp2",
) -> dict[str, np.ndarray]:
    """Per-query values of each metric: ``{"ndcg@5": array(n_queries), ...}``.

    ``rel`` are the retrieved grades, ``ideal`` the ideal grades (sorted descending, at least
    as wide as the largest k used by ndcg), ``n_relevant`` the number of candidates with grade
    > 0 per query.
    """
    check_gain(gain)
    n_relevant = np.asarray(n_relevant)
    out: dict[str, np.ndarray] = {}
    for metric in map(parse_metric, metrics):
        k = metric.k
        if metric.name == "ndcg":
            values = ndcg_at_k(rel, ideal, k, gain)
        elif metric.name == "precision":
            values = precision_at_k(rel, k)
        elif metric.name == "recall":
            values = recall_at_k(rel, n_relevant, k)
        elif metric.name == "mrr":
            values = reciprocal_rank(rel, k)
        else:
            values = average_precision_at_k(rel, n_relevant, k)
        out[str(metric)] = values
    return out
