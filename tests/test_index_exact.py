"""Exact search through a bf16 first pass (vrec_utils/index/exact.py): same answers as fp32.

The bf16 path runs on any CPU (only its speed needs AMX), so these tests check it everywhere."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pytest

from vrec_utils.index import create_index
from vrec_utils.index import exact
from vrec_utils.index.exact import Bf16Items, bf16_error_bounds, bf16_rescored_knn, exact_knn

K = 10


@pytest.fixture(scope="module")
def vectors(real):
    _, _, embeddings = real
    return np.ascontiguousarray(embeddings.vectors, dtype=np.float32)


def _reference(queries, vectors, k):
    """float64 numpy: (scores, rows) of the k best, best first."""
    sims = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order, sims


def _assert_exact(scores, rows, queries, vectors, k, atol=2e-6):
    """The k best scores rank by rank, and each returned row really has its score (rows may only
    differ from the reference between tied items)."""
    ref_scores, _, sims = _reference(queries, vectors, k)
    np.testing.assert_allclose(scores, ref_scores, atol=atol)
    np.testing.assert_allclose(np.take_along_axis(sims, rows, axis=1), ref_scores, atol=atol)
    assert all(len(set(r)) == k for r in rows.tolist())


def test_bf16_rescored_search_is_exact_on_real_embeddings(vectors):
    stats = {}
    scores, rows = bf16_rescored_knn(vectors, vectors, K, stats=stats)
    _assert_exact(scores, rows, vectors, vectors, K)
    assert stats["uncertified"] < len(vectors) // 2  # the bf16 pass did the work for most queries


def test_unnormalised_queries_and_items_keep_the_answer_exact(vectors):
    rng = np.random.default_rng(0)
    items = vectors * rng.uniform(0.5, 3.0, size=(len(vectors), 1)).astype(np.float32)
    queries = vectors[:50] * np.float32(7.0)
    scores, rows = bf16_rescored_knn(queries, items, K)
    _assert_exact(scores, rows, queries, items, K, atol=1e-4)


def test_near_ties_below_bf16_resolution_are_certified_or_redone():
    """Items whose scores differ by less than a bf16 step: the bf16 pass cannot rank them, so the
    certificate must fail and the fp32 redo must give the exact order."""
    rng = np.random.default_rng(1)
    dim, n = 64, 400
    base = rng.standard_normal(dim).astype(np.float32)
    base /= np.linalg.norm(base)
    noise = rng.standard_normal((n, dim)).astype(np.float32) * 1e-3
    items = base + noise
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[:20].copy()
    stats = {}
    scores, rows = bf16_rescored_knn(queries, items, K, candidates=K + 2, stats=stats)
    assert stats["uncertified"] > 0
    _assert_exact(scores, rows, queries, items, K)


def test_item_blocks_are_merged_without_losing_the_best(vectors, monkeypatch):
    monkeypatch.setattr(exact, "ITEM_BLOCK", 64)  # blocks of 64 items: 4 merges, a short last block
    scores, rows = bf16_rescored_knn(vectors[:40], vectors, K)
    _assert_exact(scores, rows, vectors[:40], vectors, K)


def test_error_bound_holds_for_every_pair(vectors):
    import torch

    items = Bf16Items.from_vectors(vectors)
    queries = vectors[:64]
    q_bf16 = torch.from_numpy(queries).to(torch.bfloat16)
    bf16_scores = (q_bf16 @ items.matrix().T).float().numpy()
    exact_scores = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    rounded = q_bf16.float().numpy()
    bound = bf16_error_bounds(
        np.linalg.norm(rounded, axis=1), np.linalg.norm(queries - rounded, axis=1), items, vectors.shape[1],
        np.abs(bf16_scores).max(axis=1),
    )  # fmt: skip
    error = np.abs(bf16_scores - exact_scores).max(axis=1)
    assert (error <= bound).all()
    assert (error > 0).any() and bound.max() < 0.02  # a real rounding error, and a bound that is useful


def test_exact_knn_dispatch(vectors, monkeypatch):
    with pytest.raises(ValueError, match="exact search method must be one of auto, fp32, bf16-rescored"):
        exact_knn(vectors, vectors, K, method="fp16")
    monkeypatch.setattr(exact, "cpu_has_fast_bf16", lambda: False)
    assert not exact.use_bf16(100_000, 100_000, K)  # no AMX: fp32 whatever the size
    monkeypatch.setattr(exact, "cpu_has_fast_bf16", lambda: True)
    assert exact.use_bf16(4096, 4096, K) and not exact.use_bf16(1, 4096, K) and not exact.use_bf16(10_000, 300, K)
    # more k than the bf16 pass can serve: plain faiss, same answer
    scores, rows = exact_knn(vectors[:5], vectors, len(vectors), method="bf16-rescored")
    expected, _ = faiss.knn(vectors[:5], vectors, len(vectors), metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_flat_index_bf16_path_matches_fp32_after_upserts_and_deletes(real, vectors):
    _, _, embeddings = real
    ids = np.asarray(embeddings.ids, dtype=str)
    indexes = {m: create_index("faiss", model="m", dim=vectors.shape[1], exact_method=m) for m in ("fp32", "bf16-rescored")}
    for index in indexes.values():
        index.add(ids, vectors)
        index.delete(ids[:50])
        index.search(vectors[:3], K)  # the bf16 copy is made here...
        index.add(ids[50:60], vectors[60:70])  # ...and must not outlive an upsert (same count, new rows)
    results = {m: index.search(vectors, K, exclude_ids=list(ids)) for m, index in indexes.items()}
    fp32, bf16 = results["fp32"], results["bf16-rescored"]
    np.testing.assert_array_equal(bf16.scores, fp32.scores)
    assert not np.isin(bf16.ids, ids[:50]).any()
    np.testing.assert_array_equal(bf16.ids, fp32.ids)  # ties too: the same rule on both paths
    index = indexes["bf16-rescored"]
    copy = index._bf16_copy.matrix().float().numpy()  # the copy searched is of the current vectors
    np.testing.assert_allclose(copy, index._stored_vectors(), atol=2**-8)
    assert index.describe()["exact_method"] == "bf16-rescored"
    with pytest.raises(ValueError, match="exact_method must be one of auto, fp32, bf16-rescored, got 'fast'"):
        create_index("faiss", model="m", dim=4, exact_method="fast")


# ---------------------------------------------------------------------------- the tie rule


def _rule_reference(queries, vectors, k):
    """The tie rule written out over every item: float64 scores rounded to float32, best first,
    equal scores by lower row."""
    sims = (queries.astype(np.float64) @ vectors.T.astype(np.float64)).astype(np.float32)
    rows = np.broadcast_to(np.arange(len(vectors)), sims.shape)
    order = np.lexsort((rows, -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.fixture(scope="module")
def duplicated(vectors):
    """Real embeddings where many items are listed several times (the same photo under several
    ids), shuffled so that copies sit far apart: exact ties at and around the k-th place."""
    rng = np.random.default_rng(3)
    copies = np.concatenate([vectors, vectors[:120], vectors[:120], vectors[:40], vectors[:12].repeat(12, axis=0)])
    return np.ascontiguousarray(copies[rng.permutation(len(copies))])


@pytest.mark.parametrize("method", ["fp32", "bf16-rescored"])
def test_exact_search_breaks_ties_by_the_fixed_rule(duplicated, method):
    queries = duplicated[:300]
    scores, rows = exact_knn(queries, duplicated, K, method=method)
    ref_scores, ref_rows = _rule_reference(queries, duplicated, K)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(scores, ref_scores)
    assert (ref_scores[:, :-1] == ref_scores[:, 1:]).any(axis=1).sum() > 30  # the ties are really there


def test_neighbours_do_not_depend_on_amx_or_threads(duplicated, monkeypatch):
    """"auto" takes the bf16 pass on AMX CPUs and fp32 elsewhere; both, in 1 or 2 threads, give the
    same lists (the no-AMX dispatch is forced here, whatever this CPU has)."""
    queries = duplicated[:400]  # >= BF16_MIN_QUERIES: "auto" really switches
    monkeypatch.setattr(exact, "BF16_MIN_ITEMS", 256)  # the 724 test items count as a large index
    results = []
    for amx in (True, False):
        monkeypatch.setattr(exact, "cpu_has_fast_bf16", lambda amx=amx: amx)
        assert exact.use_bf16(len(queries), len(duplicated), K) is amx
        for threads in (1, 2):
            before = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(threads)
            try:
                results.append(exact_knn(queries, duplicated, K, method="auto"))
            finally:
                faiss.omp_set_num_threads(before)
    for scores, rows in results[1:]:
        np.testing.assert_array_equal(rows, results[0][1])
        np.testing.assert_array_equal(scores, results[0][0])


def test_ties_beyond_the_candidate_margin_are_fetched():
    """More copies of one vector than k + TIE_MARGIN: the first candidates cannot hold the whole
    tie, so the query is searched again with more, and the lowest rows win."""
    rng = np.random.default_rng(4)
    others = rng.standard_normal((500, 32)).astype(np.float32)
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    items = np.concatenate([others, np.repeat(others[:1], 3 * (K + exact.TIE_MARGIN), axis=0)])
    items = np.ascontiguousarray(items[::-1])  # the copies get the lowest rows... but not in kernel order
    scores, rows = exact_knn(others[:1], items, K, method="fp32")
    copies = np.flatnonzero((items == others[0]).all(axis=1))
    np.testing.assert_array_equal(rows[0], copies[:K])
    assert (scores[0] == scores[0, 0]).all()


def test_filtered_and_flat_index_searches_follow_the_rule(duplicated):
    ids = np.asarray([f"item-{n}" for n in range(len(duplicated))])
    half = np.where(np.arange(len(duplicated)) % 2 == 0, "even", "odd")
    index = create_index("faiss", model="m", dim=duplicated.shape[1], filter_columns=["half"])
    index.add(ids, duplicated, metadata=pd.DataFrame({"half": half}, index=ids))
    result = index.search(duplicated[:50], K, exclude_ids=list(ids[:50]))
    _, ref = _rule_reference(duplicated[:50], duplicated, K + 1)
    expected = [[i for i in ids[r] if i != own][:K] for r, own in zip(ref, ids[:50])]
    np.testing.assert_array_equal(result.ids, np.asarray(expected))
    filtered = index.search(duplicated[:50], K, filters=[{"half": "odd"}] * 50)
    odd = np.flatnonzero(half == "odd")
    _, ref = _rule_reference(duplicated[:50], duplicated[odd], K)
    np.testing.assert_array_equal(filtered.ids, ids[odd][ref])
