"""metrics.py: hand-worked cases for every metric, then agreement with sklearn and ranx at 1e-9.

How the references are called: our kernels score a *list* (the retrieval order), so sklearn's
``ndcg_score`` gets strictly decreasing scores that reproduce that order (its tie averaging,
``ignore_ties=False``, then never applies), plus the relevance of *every* candidate, so its ideal
DCG is over all relevant candidates, like ours. exp2 gain is checked by giving sklearn (linear
gain) ``2**rel - 1`` as relevance. ranx gets the same lists; its ``ndcg`` is the linear gain and
``ndcg_burges`` the exp2 gain; its ``map@k`` divides by R, ours by min(k, R).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from vrec_utils.metrics import (
    Metric,
    average_precision_at_k,
    compute_metrics,
    dcg_at_k,
    default_metrics,
    ideal_from_counts,
    ideal_from_sparse_rows,
    ndcg_at_k,
    parse_metric,
    precision_at_k,
    recall_at_k,
    reciprocal_rank,
)

L2 = math.log2


# ------------------------------------------------------------------------------ hand-worked cases


def test_ndcg_binary_by_hand():
    rel = np.array([[1, 0, 1, 0, 0]])
    ideal = np.array([[1, 1, 0, 0, 0]])  # two relevant candidates in all
    dcg = 1 + 1 / L2(4)
    idcg = 1 + 1 / L2(3)
    assert dcg_at_k(rel, 5)[0] == pytest.approx(dcg, abs=1e-12)
    assert ndcg_at_k(rel, ideal, 5)[0] == pytest.approx(dcg / idcg, abs=1e-12)
    # binary relevance: exp2 and linear gains agree
    assert ndcg_at_k(rel, ideal, 5, "linear")[0] == pytest.approx(dcg / idcg, abs=1e-12)
    # the cut-off matters: at k=1 the first item is relevant
    assert ndcg_at_k(rel, ideal, 1)[0] == 1.0


def test_ndcg_graded_exp2_and_linear_by_hand():
    rel = np.array([[3, 0, 2]])
    ideal = np.array([[3, 2, 2, 1]])  # a second grade-2 item and a grade-1 item exist but were not retrieved
    dcg_exp2 = 7 + 0 + 3 / L2(4)
    idcg_exp2 = 7 + 3 / L2(3) + 3 / L2(4)
    assert ndcg_at_k(rel, ideal, 3, "exp2")[0] == pytest.approx(dcg_exp2 / idcg_exp2, abs=1e-12)
    dcg_lin = 3 + 0 + 2 / L2(4)
    idcg_lin = 3 + 2 / L2(3) + 2 / L2(4)
    assert ndcg_at_k(rel, ideal, 3, "linear")[0] == pytest.approx(dcg_lin / idcg_lin, abs=1e-12)


def test_ideal_dcg_uses_all_relevant_candidates_not_only_retrieved():
    # retrieved one relevant item at rank 1; four relevant candidates exist -> not perfect at k=3
    rel = np.array([[1, 0, 0]])
    assert ndcg_at_k(rel, ideal_from_counts(np.array([[4]]), 3), 3)[0] == pytest.approx(1 / (1 + 1 / L2(3) + 1 / L2(4)))
    # but with exactly one relevant candidate it is perfect
    assert ndcg_at_k(rel, ideal_from_counts(np.array([[1]]), 3), 3)[0] == 1.0


def test_precision_recall_mrr_ap_by_hand():
    rel = np.array([[1, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    n_rel = np.array([2, 10, 3])
    np.testing.assert_allclose(precision_at_k(rel, 5), [2 / 5, 2 / 5, 0])
    np.testing.assert_allclose(precision_at_k(rel, 3), [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(recall_at_k(rel, n_rel, 5), [1.0, 2 / 10, 0])
    np.testing.assert_allclose(reciprocal_rank(rel, 5), [1.0, 1 / 3, 0])
    np.testing.assert_allclose(reciprocal_rank(rel, 2), [1.0, 0.0, 0])
    np.testing.assert_allclose(reciprocal_rank(rel), [1.0, 1 / 3, 0])  # whole list
    # AP@5: row 0: (P@1 + P@3) / min(5, 2); row 1: (P@3 + P@4) / min(5, 10)
    np.testing.assert_allclose(average_precision_at_k(rel, n_rel, 5), [(1 + 2 / 3) / 2, (1 / 3 + 2 / 4) / 5, 0])
    # AP@1 of row 0 is perfect although R = 2 > k = 1 (the min(k, R) normalisation)
    assert average_precision_at_k(rel, n_rel, 1)[0] == 1.0


def test_graded_relevance_counts_as_relevant_above_zero():
    rel = np.array([[0.5, 0, 3]])
    assert precision_at_k(rel, 3)[0] == pytest.approx(2 / 3)
    assert reciprocal_rank(rel, 3)[0] == 1.0


def test_fewer_retrieved_than_k_pads_with_non_relevant():
    rel = np.array([[1, 1]])  # only two candidates existed
    n_rel = np.array([2])
    assert precision_at_k(rel, 5)[0] == pytest.approx(2 / 5)  # denominator stays k
    assert recall_at_k(rel, n_rel, 5)[0] == 1.0
    assert ndcg_at_k(rel, np.array([[1, 1]]), 5)[0] == 1.0
    assert average_precision_at_k(rel, n_rel, 5)[0] == 1.0


def test_no_relevant_items_score_zero():
    rel = np.zeros((2, 5))
    zeros = np.zeros(2)
    np.testing.assert_array_equal(ndcg_at_k(rel, np.zeros((2, 5)), 5), zeros)
    np.testing.assert_array_equal(recall_at_k(rel, np.array([0, 0]), 5), zeros)
    np.testing.assert_array_equal(average_precision_at_k(rel, np.array([0, 0]), 5), zeros)
    np.testing.assert_array_equal(reciprocal_rank(rel, 5), zeros)


def test_ideal_from_counts_orders_grades_descending():
    # 1 item of grade 2 (>= 2: 1), 3 of grade >= 1 -> ideal 2, 1, 1, 0, 0
    np.testing.assert_array_equal(ideal_from_counts(np.array([[3, 1]]), 5), [[2, 1, 1, 0, 0]])
    # a hierarchy of three levels: >=1: 5, >=2: 4, >=3: 2
    np.testing.assert_array_equal(ideal_from_counts(np.array([[5, 4, 2], [0, 0, 0]]), 6), [[3, 3, 2, 2, 1, 0], [0] * 6])


def test_ideal_from_sparse_rows_sorts_each_row():
    indptr = np.array([0, 3, 3, 5])
    data = np.array([1.0, 4.0, 2.0, 0.5, 7.0])
    np.testing.assert_array_equal(ideal_from_sparse_rows(indptr, data, 2), [[4, 2], [0, 0], [7, 0.5]])


def test_compute_metrics_names_and_values():
    rel = np.array([[1, 0, 1]])
    out = compute_metrics(rel, ["ndcg@3", "P@2", "mrr", "map@3", "recall@3"], ideal=np.array([[1, 1, 1]]), n_relevant=np.array([3]))
    assert list(out) == ["ndcg@3", "precision@2", "mrr", "map@3", "recall@3"]
    assert out["precision@2"][0] == 0.5
    assert out["recall@3"][0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="gain"):
        compute_metrics(rel, ["ndcg@3"], ideal=rel, n_relevant=np.array([2]), gain="log")


def test_parse_metric():
    assert parse_metric("ndcg@5") == Metric("ndcg", 5)
    assert parse_metric(" NDCG@10 ") == Metric("ndcg", 10)
    assert parse_metric("mrr") == Metric("mrr", None)
    assert str(parse_metric("p@3")) == "precision@3"
    assert str(parse_metric("map@10")) == "map@10"
    for bad, message in (("foo@5", "unknown metric"), ("ndcg", "needs a cut-off"), ("ndcg@0", "positive"), ("ndcg@x", "positive")):
        with pytest.raises(ValueError, match=message):
            parse_metric(bad)
    assert [str(m) for m in default_metrics([10, 5])][:5] == ["ndcg@5", "precision@5", "recall@5", "mrr@5", "map@5"]


# ------------------------------------------------------------------------------ reference checks


def _random_case(seed: int, n_queries: int = 60, n_candidates: int = 25, with_ties: bool = False):
    """Graded relevance of every candidate (0-3, mostly 0, some rows all 0 or with < k relevant)
    and scores; returns (y_true, order) where order is our ranking (stable sort, ties: lower
    index first)."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 0, 0, 0, 1, 2, 3], size=(n_queries, n_candidates)).astype(np.float64)
    y_true[:5] = 0  # no relevant item at all
    y_true[5:10, 2:] = 0  # fewer than k relevant
    scores = rng.random((n_queries, n_candidates))
    if with_ties:
        scores = np.round(scores * 4) / 4  # many tied scores
    order = np.argsort(-scores, axis=1, kind="stable")
    return y_true, order


def _ours(y_true: np.ndarray, order: np.ndarray, depth: int):
    rel = np.take_along_axis(y_true, order, axis=1)[:, :depth]
    ideal = -np.sort(-y_true, axis=1)
    n_rel = (y_true > 0).sum(axis=1)
    return rel, ideal, n_rel


def _strict_scores(order: np.ndarray) -> np.ndarray:
    """Scores whose descending order is exactly ``order`` (no ties)."""
    scores = np.empty(order.shape, dtype=np.float64)
    np.put_along_axis(scores, order, -np.arange(order.shape[1], dtype=np.float64)[None, :].repeat(len(order), 0), axis=1)
    return scores


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_ties", [False, True])
@pytest.mark.parametrize("k", [1, 5, 10, 40])  # 40 > the 25 candidates
def test_ndcg_matches_sklearn(seed, with_ties, k):
    y_true, order = _random_case(seed, with_ties=with_ties)
    rel, ideal, _ = _ours(y_true, order, depth=min(k, y_true.shape[1]))
    strict = _strict_scores(order)
    for gain, reference_true in (("linear", y_true), ("exp2", np.exp2(y_true) - 1)):
        ours = ndcg_at_k(rel, ideal, k, gain)
        expected = np.array([ndcg_score(reference_true[i : i + 1], strict[i : i + 1], k=k) for i in range(len(y_true))])
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-9)
        # sklearn's ignore_ties=True ranks by the same strict scores: same numbers
        fast = np.array([ndcg_score(reference_true[i : i + 1], strict[i : i + 1], k=k, ignore_ties=True) for i in range(len(y_true))])
        np.testing.assert_allclose(ours, fast, rtol=0, atol=1e-9)


def test_tied_scores_within_equal_relevance_match_sklearn_tie_averaging():
    """sklearn (ignore_ties=False) averages the gains of tied items; when every tie block holds
    items of equal relevance, averaging changes nothing and our list order gives the same nDCG."""
    y_true = np.array([[3, 3, 0, 0, 1, 2, 2, 0]], dtype=np.float64)
    scores = np.array([[0.9, 0.9, 0.1, 0.1, 0.5, 0.7, 0.7, 0.1]])  # ties only among equal grades
    order = np.argsort(-scores, axis=1, kind="stable")
    rel, ideal, _ = _ours(y_true, order, 8)
    for k in (1, 2, 3, 5, 8):
        assert ndcg_at_k(rel, ideal, k, "linear")[0] == pytest.approx(ndcg_score(y_true, scores, k=k), abs=1e-9)


@pytest.fixture(scope="module")
def ranx_evaluate():
    ranx = pytest.importorskip("ranx")
    warnings.filterwarnings("ignore", message=".*unsafe cast.*")  # numba, inside ranx
    return ranx


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [3, 5, 10])
def test_metrics_match_ranx(ranx_evaluate, seed, k):
    ranx = ranx_evaluate
    y_true, order = _random_case(seed, with_ties=True)
    has_rel = (y_true > 0).any(axis=1)  # ranx needs at least one judged-relevant item per query
    y_true, order = y_true[has_rel], order[has_rel]
    depth = 15
    rel, ideal, n_rel = _ours(y_true, order, depth)
    qids = [f"q{i:04d}" for i in range(len(y_true))]
    qrels = ranx.Qrels({q: {f"d{j}": int(g) for j, g in enumerate(row) if g > 0} for q, row in zip(qids, y_true)})
    run = ranx.Run({q: {f"d{j}": float(depth - r) for r, j in enumerate(row[:depth])} for q, row in zip(qids, order)})
    names = [f"ndcg@{k}", f"ndcg_burges@{k}", f"precision@{k}", f"recall@{k}", f"mrr@{k}", f"map@{k}"]
    ref = ranx.evaluate(qrels, run, names, return_mean=False, save_results_in_run=False)
    np.testing.assert_allclose(ndcg_at_k(rel, ideal, k, "linear"), ref[f"ndcg@{k}"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ndcg_at_k(rel, ideal, k, "exp2"), ref[f"ndcg_burges@{k}"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(precision_at_k(rel, k), ref[f"precision@{k}"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(recall_at_k(rel, n_rel, k), ref[f"recall@{k}"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(reciprocal_rank(rel, k), ref[f"mrr@{k}"], rtol=0, atol=1e-9)
    # ranx's AP@k divides by R; ours by min(k, R): equal when R <= k, else rescaled
    ours_ap = average_precision_at_k(rel, n_rel, k)
    np.testing.assert_allclose(ours_ap * np.minimum(k, n_rel) / n_rel, ref[f"map@{k}"], rtol=0, atol=1e-9)
    small = n_rel <= k
    assert small.any()
    np.testing.assert_allclose(ours_ap[small], ref[f"map@{k}"][small], rtol=0, atol=1e-9)
