"""The Elasticsearch backend against a live node (``es_live``).

The node is VREC_ES_URL when set, else the one the ``es_url`` fixture starts with
scripts/es-test-node.sh (Elastic's integration-test distribution from Maven Central). Each test
uses fresh indices, deleted afterwards. The assertions are those of the FAISS contract tests where
they apply, on real efficientnet-lite0 embeddings of 300 fashion-small items (the ``real`` fixture).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from vrec_utils.index import (
    BackendUnavailableError,
    IndexNotFoundError,
    IndexSettingsMismatchError,
    VectorIndex,
    build_index,
    create_index,
)
from vrec_utils.index.elasticsearch import (
    MAX_KNN,
    BulkIndexError,
    ElasticsearchIndex,
    connect,
    default_num_candidates,
    index_mapping,
    load_es_config,
    mapping_differences,
)

pytestmark = pytest.mark.es_live

MODEL = "efficientnet-lite0"
N_ITEMS = 300


@pytest.fixture
def live(es_url):
    """``live(model, dim, columns, name=None, **settings)``: an ElasticsearchIndex on the live node;
    every index it names is deleted after the test."""
    config = load_es_config(url=es_url, request_timeout=60)
    names: list[str] = []

    def make(model, dim, columns, name=None, **settings):
        name = name or new_name()
        if name not in names:
            names.append(name)
        settings.setdefault("bulk_backoff", 0.01)
        return ElasticsearchIndex(model, dim, columns, config=config, index_name=name, **settings)

    def new_name():
        name = f"vrec-live-{uuid.uuid4().hex[:10]}"
        names.append(name)
        return name

    make.config, make.new_name = config, new_name
    yield make
    client = connect(config)
    for name in names:
        client.indices.delete(index=name, ignore_unavailable=True)


@pytest.fixture(scope="module")
def data(real):
    catalog, workdir, embeddings = real
    ids = np.asarray(embeddings.ids, dtype=str)
    vectors = np.asarray(embeddings.vectors, dtype=np.float32)
    metadata = catalog.items.loc[ids, ["articleType", "gender"]]
    return catalog, workdir, embeddings, ids, vectors, metadata


def _faiss_exact(ids, vectors, metadata):
    index = create_index("faiss", model=MODEL, dim=vectors.shape[1], filter_columns=list(metadata.columns))
    index.add(ids, vectors, metadata)
    return index


def _assert_same_up_to_ties(got, want, tol=1e-6):
    """``got`` (k columns) against the exact answer ``want`` (k + 1 columns, to see ties at the
    cut): scores equal (float tolerance) rank by rank, ids equal rank by rank except within a group
    of tied scores (within ``tol``), which must hold the same items in any order, unless the group
    runs past k (then other members of the tie may fill it)."""
    k = got.k
    np.testing.assert_allclose(got.scores, want.scores[:, :k], atol=1e-5)
    for row in range(len(got)):
        scores = want.scores[row]
        start = 0
        while start < k:
            end = start + 1
            while end < k + 1 and (scores[end] == scores[start] or abs(scores[end] - scores[start]) <= tol):
                end += 1
            if end <= k:
                assert set(got.ids[row, start:end]) == set(want.ids[row, start:end]), (row, start, got.ids[row], want.ids[row])
            start = end


def _recall(got, want) -> float:
    hits = sum(len(set(g[g != ""]) & set(w[w != ""])) for g, w in zip(got.ids, want.ids))
    return hits / max(1, int((want.ids != "").sum()))


# ======================================================================================= mapping


@pytest.mark.parametrize("index_type", ["hnsw", "int8_hnsw", "bbq_hnsw", "flat"])
def test_the_server_mapping_has_the_index_options_asked_for(live, data, index_type):
    _, _, _, ids, vectors, metadata = data
    index = live(MODEL, vectors.shape[1], ["articleType"], index_type=index_type)
    index.add(ids[:60], vectors[:60], metadata[["articleType"]].iloc[:60])
    mappings = index.client.indices.get_mapping(index=index.index_name).body[index.index_name]["mappings"]
    server = mappings["properties"][index.field]
    assert server["type"] == "dense_vector" and server["dims"] == vectors.shape[1] and server["similarity"] == "cosine"
    assert server["index_options"]["type"] == index_type
    assert mapping_differences(server, index.vector_mapping) == []
    assert mappings["properties"]["articleType"] == {"type": "keyword"}
    assert index.describe()["index_options"] == index.vector_mapping["index_options"]
    result = index.search(vectors[:5], 3)
    assert all(ids[i] in result.ids[i] for i in range(5))  # an item is among its own nearest
    if index_type in ("hnsw", "flat"):  # float vectors: exact cosine scores
        np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-5)
    else:  # quantized: approximate scores (no rescoring asked for)
        assert (np.abs(result.scores[:, 0] - 1.0) < 0.1).all()


def test_an_existing_field_with_other_index_options_is_refused_not_ignored(live):
    index = live(MODEL, 16, [], index_type="hnsw")
    name = index.index_name
    with pytest.raises(IndexSettingsMismatchError, match=r"index_options.type 'hnsw' \(not 'int8_hnsw'\)") as info:
        live(MODEL, 16, [], name=name, index_type="int8_hnsw")
    assert name in str(info.value) and "another index name" in str(info.value)
    with pytest.raises(IndexSettingsMismatchError, match=r"index_options.m 16 \(not 32\)"):
        live(MODEL, 16, [], name=name, hnsw_m=32)
    again = live(MODEL, 16, [], name=name, index_type="hnsw")  # the same settings open it
    server = again.client.indices.get_mapping(index=name).body[name]["mappings"]["properties"][again.field]
    assert again.describe()["index_options"] == {k: server["index_options"][k] for k in ("type", "m", "ef_construction")}


# ======================================================================================= indexing


def test_a_failing_document_is_reported_by_id_and_the_others_are_indexed(live, data):
    _, _, _, ids, vectors, metadata = data
    meta = metadata[["articleType"]].iloc[:20].copy()
    meta.iloc[3, 0] = "x" * 40_000  # over Lucene's 32,766-byte limit for a keyword term
    index = live(MODEL, vectors.shape[1], ["articleType"])
    report = index.index_documents(ids[:20], vectors[:20], meta)
    assert report.n_ok == 19
    assert [f.id for f in report.failed] == [ids[3]]
    assert report.failed[0].status == 400 and "failed to parse field [articleType]" in report.failed[0].error
    assert len(index) == 19
    with pytest.raises(BulkIndexError, match="19 document.*1 failed"):
        index.add(ids[:20], vectors[:20], meta)


def test_build_index_backfills_only_what_is_missing_and_a_second_model_gets_its_own_field(live, data):
    catalog, workdir, _, ids, _, _ = data
    name = live.new_name()
    settings = dict(backend="elasticsearch", filter_columns=["articleType", "gender"], index_name=name, config=live.config)
    index = build_index(workdir, catalog, MODEL, **settings)
    assert (index.last_report.n_ok, index.last_report.n_skipped) == (N_ITEMS, 0) and len(index) == N_ITEMS
    again = build_index(workdir, catalog, MODEL, **settings)  # same embeddings: one count, nothing sent
    assert (again.last_report.n_ok, again.last_report.n_skipped) == (0, N_ITEMS)
    index.delete(ids[:5])
    assert len(index) == N_ITEMS - 5
    backfilled = build_index(workdir, catalog, MODEL, **settings)
    assert (backfilled.last_report.n_ok, backfilled.last_report.n_skipped) == (5, N_ITEMS - 5)
    assert len(backfilled) == N_ITEMS

    rng = np.random.default_rng(0)
    other = live("other-model", 8, ["articleType", "gender"], name=name)
    meta = catalog.items.loc[ids[:10], ["articleType", "gender"]]
    other.add(ids[:10], rng.standard_normal((10, 8)).astype(np.float32), meta)
    assert len(other) == 10 and len(index) == N_ITEMS
    source = index.client.get(index=name, id=ids[0])["_source"]  # 9.x leaves vectors out of _source
    assert {"articleType", "gender", "item_id"} <= set(source)
    assert other.ids_with_vector(ids[:12]) == set(ids[:10]) and index.ids_with_vector(ids[:12]) == set(ids[:12])
    assert other.search(rng.standard_normal(8), 20).counts()[0] == 10


# ======================================================================================= search


def test_flat_search_gives_faiss_exact_neighbours_and_scores(live, data):
    catalog, _, _, ids, vectors, metadata = data
    index = live(MODEL, vectors.shape[1], ["articleType", "gender"], index_type="flat")
    index.add(ids, vectors, metadata)
    reference = _faiss_exact(ids, vectors, metadata)
    queries, qids = vectors[:100], list(ids[:100])
    _assert_same_up_to_ties(index.search(queries, 10, exclude_ids=qids), reference.search(queries, 11, exclude_ids=qids))
    filters = [{"articleType": catalog.items.at[q, "articleType"]} for q in qids]
    got = index.search(queries, 5, filters=filters, exclude_ids=qids)
    _assert_same_up_to_ties(got, reference.search(queries, 6, filters=filters, exclude_ids=qids))
    labels = metadata["articleType"]
    for row, qid in enumerate(qids):
        found = [i for i in got.ids[row] if i]
        assert qid not in found and all(labels[i] == labels[qid] for i in found)
        assert len(found) == min(5, int((labels == labels[qid]).sum()) - 1)


def test_hnsw_recall_against_exact_and_filtered_knn_fills_k(live, data):
    _, _, _, ids, vectors, metadata = data
    index = live(MODEL, vectors.shape[1], ["articleType"], index_type="hnsw")
    index.add(ids, vectors, metadata[["articleType"]])
    reference = _faiss_exact(ids, vectors, metadata[["articleType"]])
    qids = list(ids)
    want = reference.search(vectors, 10, exclude_ids=qids)
    recall = {nc: _recall(index.search(vectors, 10, exclude_ids=qids, num_candidates=nc), want) for nc in (10, 40)}
    recall["default"] = _recall(index.search(vectors, 10, exclude_ids=qids), want)
    assert recall["default"] >= 0.99, recall
    assert recall[10] <= recall["default"] + 1e-9, recall
    labels = metadata["articleType"]
    filters = [{"articleType": labels[q]} for q in qids]
    got = index.search(vectors, 5, filters=filters, exclude_ids=qids)
    for row, qid in enumerate(qids):
        found = [i for i in got.ids[row] if i]
        assert qid not in found and all(labels[i] == labels[qid] for i in found)
        assert len(found) == min(5, int((labels == labels[qid]).sum()) - 1)  # k whenever k exist


def test_num_candidates_at_its_limits_and_k_over_the_matching_documents(live, data):
    _, _, _, ids, vectors, metadata = data
    index = live(MODEL, vectors.shape[1], ["articleType"])
    index.add(ids, vectors, metadata[["articleType"]])
    assert (index.search(vectors[:3], 5, num_candidates=5).counts() == 5).all()  # the minimum: k
    everything = index.search(vectors[:1], MAX_KNN, num_candidates=MAX_KNN)  # the maximum
    assert everything.counts()[0] == N_ITEMS and set(everything.ids[0][:N_ITEMS]) == set(ids)
    assert (np.diff(everything.scores[0][:N_ITEMS]) <= 0).all() and np.isneginf(everything.scores[0][N_ITEMS:]).all()
    with pytest.raises(ValueError, match="num_candidates=10001 is over"):
        index.search(vectors[:1], 5, num_candidates=MAX_KNN + 1)
    with pytest.raises(ValueError, match="must be >= k"):
        index.search(vectors[:1], 10, num_candidates=5)
    assert default_num_candidates(10) == 100
    labels = metadata["articleType"]
    counts = labels.value_counts()
    rare = counts[counts >= 2].index[-1]  # a category with few items
    query = labels.index[labels == rare][0]
    k = int(counts[rare]) + 5
    result = index.search(vectors[list(ids).index(query)], k, filters={"articleType": rare}, exclude_ids=[query])
    assert result.counts()[0] == counts[rare] - 1
    assert (result.ids[0][counts[rare] - 1 :] == "").all() and np.isneginf(result.scores[0][counts[rare] - 1 :]).all()


# ======================================================================================= failures


def test_an_index_whose_shards_are_not_ready_is_a_clear_503_error(live):
    name = live.new_name()
    client = connect(live.config)
    client.indices.create(
        index=name,
        settings={"number_of_shards": 1, "number_of_replicas": 0, "index.routing.allocation.require._name": "no-such-node"},
        mappings=index_mapping({}, []),
        wait_for_active_shards="0",
    )
    index = live(MODEL, 4, [], name=name)
    with pytest.raises(BackendUnavailableError, match=r"is not ready \(503") as info:
        index.search(np.ones(4, dtype=np.float32), 3)
    assert live.config.url in str(info.value) and "_cluster/health" in str(info.value)


def test_a_deleted_or_wrong_index_is_a_clear_error(live, data, tmp_path):
    _, _, _, ids, vectors, _ = data
    index = live(MODEL, vectors.shape[1], [])
    index.add(ids[:3], vectors[:3])
    index.save(tmp_path / "es")
    index.client.indices.delete(index=index.index_name)
    with pytest.raises(IndexNotFoundError, match=f"has no index '{index.index_name}'"):
        index.search(vectors[0], 3)
    with pytest.raises(IndexNotFoundError, match=f"has no index '{index.index_name}'"):
        VectorIndex.load(tmp_path / "es", config=live.config)  # reopening does not create an empty one
    with pytest.raises(ValueError, match="invalid Elasticsearch index name"):
        ElasticsearchIndex(MODEL, 4, [], config=live.config, index_name="Items With Spaces")


# ======================================================================================= notebooks


@pytest.mark.slow
def test_notebook_02_indexes_and_compares_on_the_live_node(es_url, tmp_path, monkeypatch):
    """The notebooks' Elasticsearch path once, cheaply: the smoke profile on 60 items."""
    import pandas as pd

    from vrec_utils.report import run_report

    name = f"vrec-live-nb-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("VREC_ES_URL", es_url)
    monkeypatch.setenv("VREC_ES_INDEX", name)
    client = connect(load_es_config(url=es_url))
    try:
        result = run_report("smoke", out=tmp_path / "out", workdir=tmp_path / "work", sample_size=60,
                            notebooks=["01", "02"], progress=False, log=lambda line: None)
        indexes = pd.read_csv(result.tables_dir / "indexes_elasticsearch.csv")
        agreement = pd.read_csv(result.tables_dir / "elasticsearch_agreement.csv")
    finally:
        mapping = client.indices.get_mapping(index=name).body[name]["mappings"] if client.indices.exists(index=name) else {}
        client.indices.delete(index=name, ignore_unavailable=True)
    assert indexes["backend"].tolist() == ["elasticsearch"] * 2 and (indexes["items"] == 60).all()
    assert sorted(p for p in mapping["properties"] if p.startswith("emb_")) == ["emb_tiny_openclip", "emb_tiny_siglip"]
    assert set(agreement["filter"]) == {"none", "subCategory"} and (agreement["queries"] > 0).all()
    assert (agreement["overlap@5"] >= 0.9).all(), agreement  # HNSW on 60 items: (almost) FAISS exact
