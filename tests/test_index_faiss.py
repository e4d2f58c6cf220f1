"""FAISS backend and the index interface, on real efficientnet-lite0 embeddings of real images."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pytest

from vrec_utils.index import SearchResult, VectorIndex, build_index, create_index, list_index_backends
from vrec_utils.index.faiss_index import FaissIndex, omp_threads
from vrec_utils.store import EmbeddingsNotFoundError

MODEL = "efficientnet-lite0"
N_ITEMS = 300
COLUMNS = ["articleType", "gender", "masterCategory"]


@pytest.fixture(scope="module")
def data(real):
    catalog, _, embeddings = real
    ids = np.asarray(embeddings.ids, dtype=str)
    vectors = np.asarray(embeddings.vectors, dtype=np.float32)
    metadata = catalog.items.loc[ids, COLUMNS]
    return ids, vectors, metadata


def _index(data, **config) -> FaissIndex:
    ids, vectors, metadata = data
    index = create_index("faiss", model=MODEL, dim=vectors.shape[1], filter_columns=COLUMNS, **config)
    index.add(ids, vectors, metadata)
    return index


def _reference(vectors, queries, k, allowed=None, exclude=None):
    """numpy: inner products, masked, sorted -> (positions, scores, all similarities); -1 where none."""
    sims = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    if allowed is not None:
        sims[~allowed] = -np.inf
    if exclude is not None:
        sims[np.arange(len(queries)), exclude] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(sims, order, axis=1)
    return np.where(np.isfinite(scores), order, -1), scores, sims


def _assert_same(result: SearchResult, ids, reference, atol=1e-5):
    """Same answer as the numpy reference: the same scores rank by rank, and every returned id is
    allowed and has that score (so ids can only differ between tied items)."""
    ref_pos, ref_scores, sims = reference
    valid = ref_pos >= 0
    assert ((result.ids != "") == valid).all(), "padding differs from the reference"
    np.testing.assert_allclose(result.scores[valid], ref_scores[valid], atol=atol)
    assert np.isneginf(result.scores[~valid]).all()
    position = {item: n for n, item in enumerate(ids)}
    rows, cols = np.nonzero(valid)
    true = sims[rows, [position[i] for i in result.ids[rows, cols]]]
    np.testing.assert_allclose(true, result.scores[rows, cols], atol=atol)  # finite: allowed, not excluded
    for row in np.unique(rows):  # no item twice (fashion-small has duplicate photos: exact ties)
        found = result.ids[row][result.ids[row] != ""]
        assert len(set(found)) == len(found)


# ---------------------------------------------------------------------------------------- exact search


def test_registry_lists_the_backends():
    frame = list_index_backends()
    assert set(frame["name"]) == {"faiss", "elasticsearch", "ivf-ondisk"}
    assert frame.set_index("name").loc["elasticsearch", "max_k"] == 10_000
    with pytest.raises(KeyError, match="unknown index backend 'annoy'; available: elasticsearch, faiss, ivf-ondisk"):
        create_index("annoy", model=MODEL, dim=4)


def test_exact_search_equals_numpy(data):
    ids, vectors, _ = data
    index = _index(data)
    assert len(index) == N_ITEMS
    result = index.search(vectors, 10)
    _assert_same(result, ids, _reference(vectors, vectors, 10))
    assert (result.scores[:, 0] > 0.9999).all()  # every image is its own nearest neighbour (or a duplicate photo)
    assert (result.ids == ids[:, None]).any(axis=1).all()
    assert result.ids.shape == (N_ITEMS, 10) and result.scores.dtype == np.float32


def test_single_vector_query_and_batched_queries_agree(data):
    ids, vectors, _ = data
    index = _index(data)
    single = index.search(vectors[5], 7)
    assert single.ids.shape == (1, 7)
    batched = index.search(vectors[:20], 7)
    np.testing.assert_array_equal(single.ids[0], batched.ids[5])


def test_exclude_ids_drops_the_query_item_and_still_returns_k(data):
    ids, vectors, _ = data
    index = _index(data)
    result = index.search(vectors, 5, exclude_ids=list(ids))
    assert result.query_ids == list(ids)
    assert not (result.ids == ids[:, None]).any()
    assert (result.counts() == 5).all()
    _assert_same(result, ids, _reference(vectors, vectors, 5, exclude=np.arange(N_ITEMS)))


def test_exclude_ids_with_none_entries(data):
    ids, vectors, _ = data
    index = _index(data)
    result = index.search(vectors[:2], 3, exclude_ids=[ids[0], None])
    assert ids[0] not in result.ids[0]
    assert result.ids[1, 0] == ids[1]
    assert result.query_ids is None


# ---------------------------------------------------------------------------------------- filters


def test_filtered_search_is_exact_search_restricted_to_the_filter(data):
    ids, vectors, metadata = data
    index = _index(data)
    types = metadata["articleType"].to_numpy()
    filters = [{"articleType": t} for t in types]
    result = index.search(vectors, 5, filters=filters, exclude_ids=list(ids))
    allowed = types[:, None] == types[None, :]
    _assert_same(result, ids, _reference(vectors, vectors, 5, allowed=allowed, exclude=np.arange(N_ITEMS)))
    # k results whenever k such items exist (the query itself excluded), fewer (padded) otherwise
    available = allowed.sum(axis=1) - 1
    np.testing.assert_array_equal(result.counts(), np.minimum(5, available))
    assert (available < 5).any() and (available >= 5).any()  # both cases are exercised


def test_one_filter_for_all_queries_with_two_columns(data):
    ids, vectors, metadata = data
    index = _index(data)
    flt = {"gender": "Women", "masterCategory": "Apparel"}
    result = index.search(vectors[:30], 8, filters=flt)
    allowed = ((metadata["gender"] == "Women") & (metadata["masterCategory"] == "Apparel")).to_numpy()
    _assert_same(result, ids, _reference(vectors, vectors[:30], 8, allowed=np.broadcast_to(allowed, (30, N_ITEMS)).copy()))


def test_filter_matching_nothing_returns_padding(data):
    index = _index(data)
    result = index.search(data[1][:2], 3, filters={"articleType": "Spacesuits"})
    assert (result.ids == "").all() and np.isneginf(result.scores).all()
    assert result.to_frame().empty


@pytest.mark.parametrize("ann", ["hnsw", "ivf"])
def test_ann_filtered_search_through_the_id_selector_keeps_filter_and_k(data, ann):
    ids, vectors, metadata = data
    # exact_filter_max=0: every filtered group goes through the ANN index with an IDSelectorBitmap
    index = _index(data, ann=ann, exact_filter_max=0, nlist=8, nprobe=2)
    genders = metadata["gender"].to_numpy()
    result = index.search(vectors, 10, filters=[{"gender": g} for g in genders], exclude_ids=list(ids))
    allowed = genders[:, None] == genders[None, :]
    available = allowed.sum(axis=1) - 1
    np.testing.assert_array_equal(result.counts(), np.minimum(10, available))
    lookup = dict(zip(ids, genders))
    for row in range(N_ITEMS):
        assert all(lookup[i] == genders[row] for i in result.ids[row] if i)
        assert ids[row] not in result.ids[row]
    pos, _, _ = _reference(vectors, vectors, 10, allowed=allowed, exclude=np.arange(N_ITEMS))
    recall = np.mean([len(set(result.ids[r]) & set(ids[pos[r][pos[r] >= 0]])) / max(1, (pos[r] >= 0).sum()) for r in range(N_ITEMS)])
    assert recall > 0.9


@pytest.mark.parametrize("ann", ["hnsw", "ivf"])
def test_ann_defaults_are_close_to_exact(data, ann):
    ids, vectors, _ = data
    index = _index(data, ann=ann)
    result = index.search(vectors, 10, exclude_ids=list(ids))
    pos, _, _ = _reference(vectors, vectors, 10, exclude=np.arange(N_ITEMS))
    recall = np.mean([len(set(result.ids[r]) & set(ids[pos[r]])) / 10 for r in range(N_ITEMS)])
    assert recall >= 0.95
    assert (result.counts() == 10).all()


def test_unknown_filter_column_and_bad_filter_shapes(data):
    index = _index(data)
    q = data[1][:2]
    with pytest.raises(ValueError, match="cannot filter on 'baseColour'"):
        index.search(q, 3, filters={"baseColour": "Red"})
    with pytest.raises(ValueError, match="3 filters for 2 queries"):
        index.search(q, 3, filters=[None, None, None])
    with pytest.raises(ValueError, match="1 exclude_ids for 2 queries"):
        index.search(q, 3, exclude_ids=["x"])


# ---------------------------------------------------------------------------------------- updates


@pytest.mark.parametrize("ann", ["none", "hnsw", "ivf"])
def test_upsert_and_delete(data, ann):
    ids, vectors, metadata = data
    index = _index(data, ann=ann, nlist=8)
    # upsert: item 0 now carries item 1's vector and another label
    index.add([ids[0]], vectors[1:2], pd.DataFrame({c: ["Changed"] for c in COLUMNS}, index=[ids[0]]))
    assert len(index) == N_ITEMS
    hit = index.search(vectors[1], 2)
    assert set(hit.ids[0]) == {ids[0], ids[1]}
    assert index.search(vectors[1], 1, filters={"articleType": "Changed"}).ids[0, 0] == ids[0]
    # delete
    gone = list(ids[:200:2])
    index.delete(gone)
    assert len(index) == N_ITEMS - 100
    result = index.search(vectors, 10)
    assert not np.isin(result.ids, gone).any()
    keep = np.ones(N_ITEMS, bool)
    keep[:200:2] = False
    if ann == "none":
        _assert_same(result, ids[keep], _reference(vectors[keep], vectors, 10))
    # re-adding a deleted id works
    index.add([ids[0]], vectors[:1], metadata.iloc[:1])
    assert index.search(vectors[0], 1).ids[0, 0] == ids[0]


def test_delete_unknown_id_raises_and_deletes_nothing(data):
    index = _index(data)
    with pytest.raises(KeyError, match="nothing was deleted"):
        index.delete([data[0][0], "no-such-item"])
    assert len(index) == N_ITEMS


def test_hnsw_rebuilds_once_mostly_deleted(data):
    ids, vectors, _ = data
    index = _index(data, ann="hnsw")
    index.delete(list(ids[: N_ITEMS // 2 + 10]))
    assert index._n_dead == 0 and index._faiss.ntotal == len(index) == N_ITEMS // 2 - 10
    result = index.search(vectors[-5:], 3)
    assert (result.ids[:, 0] == ids[-5:]).all()


# ---------------------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("ann", ["none", "hnsw", "ivf"])
def test_save_load_round_trip(data, ann, tmp_path):
    ids, vectors, metadata = data
    index = _index(data, ann=ann, nlist=8)
    index.delete([ids[3]])
    path = index.save(tmp_path / "idx")
    loaded = VectorIndex.load(path)
    assert isinstance(loaded, FaissIndex) and loaded.settings.ann == ann
    assert (loaded.model, loaded.dim, loaded.filter_columns, len(loaded)) == (MODEL, index.dim, tuple(COLUMNS), N_ITEMS - 1)
    filters = [{"articleType": t} for t in metadata["articleType"]]
    before = index.search(vectors, 5, filters=filters, exclude_ids=list(ids))
    after = loaded.search(vectors, 5, filters=filters, exclude_ids=list(ids))
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.scores, after.scores)
    assert json.loads((path / "index.json").read_text())["backend"] == "faiss"


def test_load_refuses_a_folder_that_is_not_an_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved index"):
        VectorIndex.load(tmp_path)


def test_build_index_is_saved_next_to_the_cache_and_reloaded(real, monkeypatch):
    catalog, workdir, embeddings = real
    first = build_index(workdir, catalog, MODEL, filter_columns=COLUMNS, rebuild=True)
    assert first.info["reused"] is False
    path = first.info["path"]
    assert "embeddings" in path and "index-faiss-none" in path
    calls = []
    monkeypatch.setattr(FaissIndex, "_add", lambda self, *a: calls.append(1))
    second = build_index(workdir, catalog, MODEL, filter_columns=COLUMNS)
    assert second.info["reused"] is True and calls == []  # loaded, not rebuilt
    assert len(second) == N_ITEMS
    q = np.asarray(embeddings.vectors[:10])
    np.testing.assert_array_equal(first.search(q, 5).ids, second.search(q, 5).ids)
    # other build settings get their own saved index
    monkeypatch.undo()
    hnsw = build_index(workdir, catalog, MODEL, filter_columns=COLUMNS, ann="hnsw")
    assert hnsw.info["path"] != path and hnsw.settings.ann == "hnsw"


def test_build_index_rebuilds_when_the_labels_change(real):
    catalog, workdir, _ = real
    build_index(workdir, catalog, MODEL, filter_columns=["articleType"])
    changed = catalog.subset(catalog.ids)
    object.__setattr__(changed, "items", catalog.items.assign(articleType="Same"))
    again = build_index(workdir, changed, MODEL, filter_columns=["articleType"])
    assert again.info["reused"] is False
    assert set(again._meta["articleType"]) == {"Same"}


def test_build_index_for_a_model_without_cached_embeddings_names_the_command(real):
    catalog, workdir, _ = real
    with pytest.raises(EmbeddingsNotFoundError, match="vrec extract --catalog .* --model resnet50"):
        build_index(workdir, catalog, "resnet50")


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "5"])
def test_bad_k(data, k):
    with pytest.raises(ValueError, match="k must be"):
        _index(data).search(data[1][:1], k)


def test_dimension_mismatch_between_index_and_queries(data):
    index = _index(data)
    with pytest.raises(ValueError, match="dimension mismatch: the index holds 1280-d vectors of model 'efficientnet-lite0' but the query vectors are 768-d"):
        index.search(np.ones((2, 768), np.float32), 3)
    with pytest.raises(ValueError, match="dimension mismatch"):
        index.add(["x"], np.ones((1, 10), np.float32), pd.DataFrame({c: ["a"] for c in COLUMNS}, index=["x"]))


def test_bad_vectors_and_ids_are_refused(data):
    index = create_index("faiss", model=MODEL, dim=4)
    with pytest.raises(ValueError, match="'b'.* all zeros"):
        index.add(["a", "b"], np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.add(["a"], np.array([[np.nan, 0, 0, 1]], np.float32))
    with pytest.raises(ValueError, match="duplicates"):
        index.add(["a", "a"], np.eye(4, dtype=np.float32)[:2])
    with pytest.raises(ValueError, match="expected 2 vectors"):
        index.add(["a", "b"], np.eye(4, dtype=np.float32)[:3])
    assert len(index) == 0
    with_columns = create_index("faiss", model=MODEL, dim=4, filter_columns=["articleType"])
    with pytest.raises(ValueError, match="pass metadata"):
        with_columns.add(["a"], np.eye(4, dtype=np.float32)[:1])
    with pytest.raises(ValueError, match="no row for 1 id"):
        with_columns.add(["a"], np.eye(4, dtype=np.float32)[:1], pd.DataFrame({"articleType": ["x"]}, index=["b"]))


def test_vectors_are_normalised_so_scores_are_cosines():
    index = create_index("faiss", model="m", dim=2)
    index.add(["a", "b"], np.array([[3, 4], [0, 10]], np.float32))
    result = index.search(np.array([6, 8], np.float32), 2)
    assert result.ids[0].tolist() == ["a", "b"]
    np.testing.assert_allclose(result.scores[0], [1.0, 0.8], atol=1e-6)


def test_empty_index_and_more_k_than_items():
    index = create_index("faiss", model="m", dim=2)
    assert index.search(np.array([1, 0], np.float32), 3).counts().tolist() == [0]
    index.add(["a"], np.array([[1, 0]], np.float32))
    result = index.search(np.array([[1, 0], [0, 1]], np.float32), 3)
    assert result.ids.tolist() == [["a", "", ""], ["a", "", ""]]
    assert result.to_frame()["query"].tolist() == [0, 1]


def test_to_frame_joins_catalog_labels_and_drops_padding(real, data):
    catalog, _, _ = real
    ids, vectors, _ = data
    index = _index(data)
    frame = index.search(vectors[:2], 3, exclude_ids=list(ids[:2])).to_frame(catalog)
    assert list(frame.columns[:4]) == ["query_id", "rank", "item_id", "score"]
    assert {"title", "articleType", "gender"} <= set(frame.columns)
    assert frame["rank"].tolist() == [1, 2, 3, 1, 2, 3]
    assert frame["title"].tolist() == catalog.items.loc[frame["item_id"], "title"].tolist()


def test_thread_count_is_restored():
    before = faiss.omp_get_max_threads()
    with omp_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before


def test_unknown_search_option_and_faiss_setting():
    with pytest.raises(TypeError, match="unknown faiss index option"):
        create_index("faiss", model="m", dim=2, efsearch=3)
    with pytest.raises(ValueError, match="ann must be one of"):
        create_index("faiss", model="m", dim=2, ann="lsh")
    index = create_index("faiss", model="m", dim=2)
    index.add(["a"], np.array([[1, 0]], np.float32))
    with pytest.raises(TypeError, match="unknown option"):
        index.search(np.array([1, 0], np.float32), 1, num_candidates=3)
