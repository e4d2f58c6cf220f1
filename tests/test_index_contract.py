"""The VectorIndex contract, run on every registered backend (FAISS, and Elasticsearch on the
in-process fake node; the live node has its own scenario tests). A backend added to the registry
fails here until it is given a way to be built in this file.
"""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest

from fake_es import FakeElasticsearch
from vrec_utils.index import IndexBackendError, SearchResult, create_index, list_index_backends
from vrec_utils.index.elasticsearch import ElasticsearchIndex

MODEL = "efficientnet-lite0"
COLUMNS = ["articleType", "gender"]
N = 120


def _faiss(dim: int):
    return create_index("faiss", model=MODEL, dim=dim, filter_columns=COLUMNS)


def _elasticsearch(dim: int):
    client = FakeElasticsearch().client()
    return ElasticsearchIndex(MODEL, dim, COLUMNS, index_name=f"vrec-contract-{uuid.uuid4().hex[:8]}", index_type="flat", client=client)


def _ivf_ondisk(dim: int):
    # every list probed: the answer is exact search over the SQ8 codes (scores to ~1e-3)
    return create_index("ivf-ondisk", model=MODEL, dim=dim, filter_columns=COLUMNS, nprobe=10**6)


BUILDERS = {"faiss": _faiss, "elasticsearch": _elasticsearch, "ivf-ondisk": _ivf_ondisk}
#: backends whose scores come from compressed codes: score tolerance, and the share of the exact
#: top-k ids they must return (near-ties may swap)
APPROXIMATE = {"ivf-ondisk": (0.01, 0.9)}


def test_every_registered_backend_is_under_contract():
    assert set(list_index_backends()["name"]) == set(BUILDERS)


@pytest.fixture(scope="module")
def data(real):
    catalog, _, embeddings = real
    ids = np.asarray(embeddings.ids[:N], dtype=str)
    vectors = np.ascontiguousarray(embeddings.vectors[:N], dtype=np.float32)
    return ids, vectors, catalog.items.loc[ids, COLUMNS]


@pytest.fixture(params=sorted(BUILDERS))
def index(request, data):
    ids, vectors, metadata = data
    built = BUILDERS[request.param](vectors.shape[1])
    built.add(ids, vectors, metadata)
    return built


def _rule(queries, vectors, allowed=None, exclude=None):
    """The tie rule written out: float64 scores rounded to float32, best first, equal by row."""
    sims = (queries.astype(np.float64) @ vectors.T.astype(np.float64)).astype(np.float32)
    if allowed is not None:
        sims[:, ~allowed] = -np.inf
    if exclude is not None:
        sims[np.arange(len(queries)), exclude] = -np.inf
    rows = np.broadcast_to(np.arange(len(vectors)), sims.shape)
    order = np.lexsort((rows, -sims), axis=1)
    return order, np.take_along_axis(sims, order, axis=1)


def _assert_answer(index, result: SearchResult, ids, order, scores, k):
    """The reference's ids rank by rank (padding where it has fewer than k), scores to float error.
    FAISS computes the rule's own scores, so its lists are equal outright; a server scores in its
    own arithmetic, so there ids may differ inside groups of scores equal to float error (and the
    group reaching the k-th place may hold other tied members)."""
    want_scores = scores[:, :k]
    valid = np.isfinite(want_scores)
    assert ((result.ids != "") == valid).all(), "padding differs"
    want_ids = np.where(valid, ids[order[:, :k]], "")
    if index.backend in APPROXIMATE:
        atol, share = APPROXIMATE[index.backend]
        np.testing.assert_allclose(result.scores[valid], want_scores[valid], atol=atol)
        shared = [len(set(g[g != ""]) & set(w[w != ""])) / max(1, (w != "").sum()) for g, w in zip(result.ids, want_ids)]
        assert np.mean(shared) >= share, np.mean(shared)
        return
    np.testing.assert_allclose(result.scores[valid], want_scores[valid], atol=2e-5)
    if not isinstance(index, ElasticsearchIndex):
        np.testing.assert_array_equal(result.ids, want_ids)
        return
    for got_row, want_row, row_scores in zip(result.ids, want_ids, want_scores):
        with np.errstate(invalid="ignore"):  # -inf padding
            group = np.concatenate([[0], np.cumsum(~(np.abs(np.diff(row_scores)) < 2e-5))])
        for g in np.unique(group):
            at = group == g
            if not at[-1]:
                assert sorted(got_row[at]) == sorted(want_row[at]), (list(got_row), list(want_row))


def test_exact_search(index, data):
    ids, vectors, _ = data
    order, scores = _rule(vectors[:30], vectors)
    _assert_answer(index, index.search(vectors[:30], 10), ids, order, scores, 10)


def test_the_query_item_is_excluded_and_k_still_returned(index, data):
    ids, vectors, _ = data
    result = index.search(vectors[:30], 5, exclude_ids=list(ids[:30]))
    assert not (result.ids == ids[:30, None]).any() and (result.counts() == 5).all()
    order, scores = _rule(vectors[:30], vectors, exclude=np.arange(30))
    _assert_answer(index, result, ids, order, scores, 5)


def test_filtered_search_is_exact_search_restricted_to_the_filter(index, data):
    ids, vectors, metadata = data
    value = metadata["articleType"].value_counts().index[0]
    allowed = (metadata["articleType"] == value).to_numpy()
    result = index.search(vectors[:20], 5, filters=[{"articleType": value}] * 20)
    order, scores = _rule(vectors[:20], vectors, allowed=allowed)
    _assert_answer(index, result, ids, order, scores, 5)
    assert set(metadata.loc[result.ids[result.ids != ""], "articleType"]) == {value}


def test_k_larger_than_the_matching_items_pads(index, data):
    ids, vectors, metadata = data
    rare = metadata["articleType"].value_counts()
    value = rare.index[-1]
    n_matching = int(rare.iloc[-1])
    result = index.search(vectors[:2], n_matching + 3, filters=[{"articleType": value}] * 2)
    assert (result.counts() == n_matching).all()
    assert (result.ids[:, n_matching:] == "").all() and np.isneginf(result.scores[:, n_matching:]).all()


def test_upsert_replaces_and_delete_removes(index, data):
    ids, vectors, metadata = data
    if index.read_only:
        with pytest.raises(IndexBackendError, match="rebuild"):
            index.add(ids[:1], vectors[50:51], metadata.iloc[:1])
        with pytest.raises(IndexBackendError, match="rebuild"):
            index.delete(ids[:5])
        assert len(index) == N
        return
    index.add(ids[:1], vectors[50:51], metadata.iloc[:1])  # item 0 now holds item 50's vector
    top = index.search(vectors[50:51], 2).ids[0]
    assert set(top) == {ids[0], ids[50]}
    index.delete(ids[:5])
    assert len(index) == N - 5
    assert not np.isin(index.search(vectors[:10], 10).ids, ids[:5]).any()
    with pytest.raises(KeyError):
        index.delete(["no-such-item"])


def test_bad_queries_are_refused(index, data):
    _, vectors, _ = data
    with pytest.raises(ValueError, match="dim"):
        index.search(np.ones((1, vectors.shape[1] + 1), dtype=np.float32), 3)
    with pytest.raises(ValueError):
        index.search(vectors[:1], 0)
    with pytest.raises(ValueError):
        index.search(np.zeros((1, vectors.shape[1]), dtype=np.float32), 3)
    with pytest.raises((KeyError, ValueError), match="nope"):
        index.search(vectors[:1], 3, filters=[{"nope": "x"}])


def test_metadata_must_carry_the_filter_columns(index, data):
    ids, vectors, _ = data
    with pytest.raises(ValueError, match="metadata"):
        index.add(["extra"], vectors[:1], None)
    with pytest.raises((KeyError, ValueError)):
        index.add(["extra"], vectors[:1], pd.DataFrame({"articleType": ["x"]}, index=["extra"]))
