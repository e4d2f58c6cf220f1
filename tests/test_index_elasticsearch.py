"""Elasticsearch backend.

Three layers; only the ``es_live`` ones need a server (VREC_ES_URL, or the node that the ``es_url``
fixture starts with scripts/es-test-node.sh; tests/test_index_elasticsearch_live.py has the rest):

1. request bodies built by the pure functions, checked exactly (mapping, bulk actions, kNN);
2. the real ``elasticsearch.Elasticsearch`` client wired to an in-process fake node
   (``node_class=``), so the exact HTTP requests (method, path, JSON/NDJSON bodies) are checked
   after the client serialised them, and the index logic (backfill, retries, failure report,
   deletes, score conversion) runs end to end;
3. scenario tests (same as the FAISS ones: exact neighbours, filters, self-exclusion, persistence)
   run against the fake and against a live server (``es_live``).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest

from vrec_utils.index import (
    BackendUnavailableError,
    IndexBackendError,
    IndexNotFoundError,
    IndexSettingsMismatchError,
    VectorIndex,
    build_index,
    create_index,
)
from vrec_utils.index.elasticsearch import (
    MAX_KNN,
    BulkIndexError,
    ElasticsearchConfig,
    ElasticsearchIndex,
    bulk_remove_vector_actions,
    bulk_upsert_actions,
    connect,
    default_num_candidates,
    dense_vector_mapping,
    ids_with_vector_body,
    index_mapping,
    knn_query,
    knn_search_body,
    load_es_config,
    vector_field,
)

elasticsearch = pytest.importorskip("elasticsearch")
from fake_es import FakeElasticsearch  # noqa: E402

MODEL = "efficientnet-lite0"
N_ITEMS = 300


# ======================================================================================= fixtures


@pytest.fixture
def fake():
    return FakeElasticsearch()


def _calls(server, method=None, suffix=None):
    return [r for r in server.requests if (method is None or r[0] == method) and (suffix is None or r[1].endswith(suffix))]


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ======================================================================================= 1. pure bodies


def test_vector_field_names_are_slugs():
    assert vector_field("efficientnet-lite0") == "emb_efficientnet_lite0"
    assert vector_field("openclip:ViT-B-32:laion2b_s34b_b79k") == "emb_openclip_vit_b_32_laion2b_s34b_b79k"
    assert vector_field("siglip-base") == "emb_siglip_base"


def test_mapping_is_exact_and_sets_index_options_explicitly():
    mapping = index_mapping(
        {"emb_efficientnet_lite0": dense_vector_mapping(1280)},
        ["gender", "articleType"],
        models={"emb_efficientnet_lite0": "efficientnet-lite0"},
    )
    assert mapping == {
        "dynamic": "strict",
        "_meta": {"vrec": {"models": {"emb_efficientnet_lite0": "efficientnet-lite0"}, "label_columns": ["gender", "articleType"]}},
        "properties": {
            "item_id": {"type": "keyword"},
            "gender": {"type": "keyword"},
            "articleType": {"type": "keyword"},
            "emb_efficientnet_lite0": {
                "type": "dense_vector",
                "dims": 1280,
                "element_type": "float",
                "index": True,
                "similarity": "cosine",
                # explicit: ES 9.1+ would otherwise pick bbq quantization for >= 384 dims
                "index_options": {"type": "hnsw", "m": 16, "ef_construction": 100},
            },
        },
    }
    assert dense_vector_mapping(768, index_type="flat")["index_options"] == {"type": "flat"}
    assert dense_vector_mapping(768, index_type="int8_hnsw", m=32, ef_construction=200)["index_options"] == {
        "type": "int8_hnsw", "m": 32, "ef_construction": 200,
    }


@pytest.mark.parametrize("bad", [{"dims": 0}, {"dims": 5000}, {"dims": 8, "index_type": "lsh"}])
def test_mapping_refuses_bad_settings(bad):
    with pytest.raises(ValueError):
        dense_vector_mapping(bad["dims"], index_type=bad.get("index_type", "hnsw"))


def test_mapping_refuses_label_columns_that_are_not_field_names():
    with pytest.raises(ValueError, match="no dots"):
        index_mapping({}, ["a.b"])
    with pytest.raises(ValueError):
        index_mapping({}, ["item_id"])


def test_bulk_upsert_actions_are_exact_and_idempotent():
    vectors = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    actions = list(bulk_upsert_actions("vrec-items", "emb_m", ["15970", "39386"], vectors, {"articleType": ["Shirts", "Jeans"]}))
    assert actions == [
        {
            "_op_type": "update", "_index": "vrec-items", "_id": "15970", "doc_as_upsert": True,
            "doc": {"item_id": "15970", "articleType": "Shirts", "emb_m": [np.float32(0.6).item(), np.float32(0.8).item()]},
        },
        {
            "_op_type": "update", "_index": "vrec-items", "_id": "39386", "doc_as_upsert": True,
            "doc": {"item_id": "39386", "articleType": "Jeans", "emb_m": [1.0, 0.0]},
        },
    ]
    # the same input gives the same actions: document id = item id, so a re-run overwrites
    assert actions == list(bulk_upsert_actions("vrec-items", "emb_m", ["15970", "39386"], vectors, {"articleType": ["Shirts", "Jeans"]}))


def test_remove_vector_actions_only_drop_this_models_field():
    assert list(bulk_remove_vector_actions("vrec-items", "emb_m", ["7"])) == [
        {"_op_type": "update", "_index": "vrec-items", "_id": "7", "doc": {"emb_m": None}}
    ]


def test_knn_query_plain_filtered_and_excluding_the_query_item():
    vector = np.array([0.6, 0.8], dtype=np.float32)
    plain = knn_query("emb_m", vector, 5, 100)
    assert plain == {"field": "emb_m", "query_vector": vector.tolist(), "k": 5, "num_candidates": 100}
    filtered = knn_query("emb_m", vector, 5, 100, filter={"articleType": "Dresses"}, exclude_id="15970")
    assert filtered == {
        "field": "emb_m",
        "query_vector": vector.tolist(),
        "k": 5,
        "num_candidates": 100,
        "filter": {"bool": {"filter": [{"term": {"articleType": "Dresses"}}], "must_not": [{"ids": {"values": ["15970"]}}]}},
    }
    body = knn_search_body("emb_m", vector, 5, 100, filter={"gender": "Women", "articleType": "Dresses"})
    assert body == {
        "knn": {
            "field": "emb_m", "query_vector": vector.tolist(), "k": 5, "num_candidates": 100,
            "filter": {"bool": {"filter": [{"term": {"articleType": "Dresses"}}, {"term": {"gender": "Women"}}]}},
        },
        "size": 5,
        "_source": False,
        "track_total_hits": False,
    }


def test_knn_sizes_over_the_limit_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="k=10001 is over Elasticsearch's limit of 10,000"):
        knn_query("emb_m", [1.0], 10_001, 10_001)
    with pytest.raises(ValueError, match="num_candidates=20000 is over Elasticsearch's limit of 10,000"):
        knn_query("emb_m", [1.0], 10, 20_000)
    with pytest.raises(ValueError, match="must be >= k"):
        knn_query("emb_m", [1.0], 50, 10)
    assert default_num_candidates(5) == 100 and default_num_candidates(50) == 500 and default_num_candidates(5000) == MAX_KNN


def test_ids_with_vector_body():
    assert ids_with_vector_body("emb_m", ["1", "2"]) == {
        "query": {"bool": {"filter": [{"ids": {"values": ["1", "2"]}}, {"exists": {"field": "emb_m"}}]}},
        "size": 2,
        "_source": False,
        "track_total_hits": False,
    }


# ======================================================================================= config


def test_config_from_environment_keeps_secrets_out_of_repr():
    env = {"VREC_ES_URL": "https://es.example:9200", "VREC_ES_API_KEY": "c2VjcmV0", "VREC_ES_VERIFY_CERTS": "false", "VREC_ES_INDEX": "shop"}
    config = load_es_config(environ=env)
    assert (config.url, config.api_key, config.verify_certs, config.index, config.auth) == (
        "https://es.example:9200", "c2VjcmV0", False, "shop", "api_key",
    )
    assert "c2VjcmV0" not in repr(config)


def test_config_file_overrides_environment(tmp_path):
    path = tmp_path / "es.toml"
    path.write_text('[elasticsearch]\nurl = "http://other:9200"\nuser = "elastic"\npassword = "pw"\n')
    path.chmod(0o600)
    config = load_es_config(path, environ={"VREC_ES_URL": "http://env:9200"})
    assert (config.url, config.username, config.password, config.auth) == ("http://other:9200", "elastic", "pw", "basic")
    assert "pw" not in repr(config)
    json_path = tmp_path / "es.json"
    json_path.write_text(json.dumps({"url": "http://j:9200", "index": "x"}))
    assert load_es_config(json_path, environ={}).index == "x"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"VREC_ES_URL": "localhost:9200"}, "http"),
        ({"VREC_ES_API_KEY": "k", "VREC_ES_USER": "u", "VREC_ES_PASSWORD": "p"}, "not both"),
        ({"VREC_ES_USER": "u"}, "both VREC_ES_USER and VREC_ES_PASSWORD"),
        ({"VREC_ES_VERIFY_CERTS": "maybe"}, "true or false"),
        ({"VREC_ES_CA_CERTS": "/nonexistent/ca.pem"}, "VREC_ES_CA_CERTS"),
        ({"VREC_ES_INDEX": "Bad Name"}, "invalid Elasticsearch index name"),
    ],
)
def test_bad_config_is_refused(env, message):
    with pytest.raises(ValueError, match=message):
        load_es_config(environ=env)


def test_unknown_config_file_keys_are_refused(tmp_path):
    path = tmp_path / "es.json"
    path.write_text(json.dumps({"url": "http://x:9200", "hosts": ["a"]}))
    with pytest.raises(ValueError, match="unknown Elasticsearch setting"):
        load_es_config(path, environ={})


def test_unreachable_server_gives_one_clear_fast_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(BackendUnavailableError) as info:
        connect(ElasticsearchConfig(url=f"http://127.0.0.1:{port}"))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert f"cannot reach Elasticsearch at http://127.0.0.1:{port}" in message
    assert "VREC_ES_URL" in message and "docker compose up -d elasticsearch" in message


def test_old_server_is_refused():
    server = FakeElasticsearch(version="7.17.0")
    with pytest.raises(BackendUnavailableError, match="needs 8.x or 9.x"):
        connect(ElasticsearchConfig(), node_class=server.node_class())


# ======================================================================================= 2. client requests


def _small_index(server, **kwargs):
    kwargs.setdefault("bulk_backoff", 0.01)
    return ElasticsearchIndex("m", 4, ["articleType"], client=server.client(), index_name="vrec-test", **kwargs)


def test_creating_the_index_sends_the_mapping(fake):
    _small_index(fake)
    head, put = fake.requests
    assert head[:2] == ("HEAD", "/vrec-test")
    assert put[:2] == ("PUT", "/vrec-test")
    assert put[3] == {"mappings": index_mapping({"emb_m": dense_vector_mapping(4)}, ["articleType"], models={"emb_m": "m"})}


def test_a_second_model_adds_its_field_to_the_existing_index(fake):
    _small_index(fake)
    fake.requests.clear()
    ElasticsearchIndex("other-model", 8, ["articleType"], client=fake.client(), index_name="vrec-test")
    methods = [(m, p) for m, p, _, _ in fake.requests]
    assert methods == [("HEAD", "/vrec-test"), ("GET", "/vrec-test/_mapping"), ("PUT", "/vrec-test/_mapping")]
    body = fake.requests[-1][3]
    assert body["properties"] == {"emb_other_model": dense_vector_mapping(8)}
    assert body["_meta"]["vrec"]["models"] == {"emb_m": "m", "emb_other_model": "other-model"}


def test_dimension_mismatch_with_the_existing_field_is_refused(fake):
    _small_index(fake)
    with pytest.raises(ValueError, match="dimension mismatch: index 'vrec-test' holds 4-d vectors"):
        ElasticsearchIndex("m", 8, ["articleType"], client=fake.client(), index_name="vrec-test")


def test_add_sends_bulk_updates_then_refresh(fake):
    index = _small_index(fake)
    fake.requests.clear()
    vectors = np.array([[1, 0, 0, 0], [0, 2, 0, 0]], dtype=np.float32)  # the second is normalised first
    index.add(["a", "b"], vectors, pd.DataFrame({"articleType": ["Shirts", "Jeans"]}, index=["a", "b"]))
    (bulk,), (refresh,) = _calls(fake, "PUT", "_bulk") or _calls(fake, "POST", "_bulk"), _calls(fake, suffix="_refresh")
    assert bulk[3] == [
        {"update": {"_index": "vrec-test", "_id": "a"}},
        {"doc": {"item_id": "a", "articleType": "Shirts", "emb_m": [1.0, 0.0, 0.0, 0.0]}, "doc_as_upsert": True},
        {"update": {"_index": "vrec-test", "_id": "b"}},
        {"doc": {"item_id": "b", "articleType": "Jeans", "emb_m": [0.0, 1.0, 0.0, 0.0]}, "doc_as_upsert": True},
    ]
    assert refresh[1] == "/vrec-test/_refresh"
    assert len(index) == 2


def test_search_sends_one_msearch_with_filtered_knn_and_converts_scores(fake):
    index = _small_index(fake)
    rng = np.random.default_rng(0)
    vectors = _unit(rng, 6, 4)
    ids = [f"i{n}" for n in range(6)]
    labels = ["A", "A", "A", "B", "B", "B"]
    index.add(ids, vectors, pd.DataFrame({"articleType": labels}, index=ids))
    fake.requests.clear()
    result = index.search(vectors[:2], 2, filters=[{"articleType": "A"}, None], exclude_ids=["i0", "i1"], num_candidates=50)
    (msearch,) = fake.requests
    assert msearch[:2] == ("POST", "/_msearch")
    assert msearch[3] == [
        {"index": "vrec-test"},
        knn_search_body("emb_m", vectors[0], 2, 50, filter={"articleType": "A"}, exclude_id="i0"),
        {"index": "vrec-test"},
        knn_search_body("emb_m", vectors[1], 2, 50, exclude_id="i1"),
    ]
    # cosine scores, not Elasticsearch's (1 + cosine) / 2
    sims = vectors[:2] @ vectors.T
    assert set(result.ids[0]) == {"i1", "i2"}
    assert result.ids[0][0] == ("i1" if sims[0, 1] > sims[0, 2] else "i2")
    expected = np.sort(sims[0, [1, 2]])[::-1]
    np.testing.assert_allclose(result.scores[0], expected, atol=1e-6)
    assert "i1" not in result.ids[1]
    assert result.query_ids == ["i0", "i1"]


def test_k_over_ten_thousand_is_refused_before_any_request(fake):
    index = _small_index(fake)
    fake.requests.clear()
    with pytest.raises(ValueError, match="limit of 10,000"):
        index.search(np.ones(4), 10_001)
    with pytest.raises(ValueError, match="num_candidates=20000 is over"):
        index.search(np.ones(4), 5, num_candidates=20_000)
    assert fake.requests == []


def test_zero_vectors_are_refused_before_elasticsearch_sees_them(fake):
    index = _small_index(fake)
    fake.requests.clear()
    with pytest.raises(ValueError, match="'b'.*all zeros"):
        index.add(["a", "b"], np.array([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32), pd.DataFrame({"articleType": ["x", "y"]}, index=["a", "b"]))
    with pytest.raises(ValueError, match="all zeros"):
        index.search(np.zeros(4), 3)
    assert fake.requests == []


def test_failed_documents_are_reported_and_throttling_is_retried(fake):
    index = _small_index(fake)
    fake.fail_ids = {"b": (400, "document_parsing_exception")}
    fake.throttle_once = {"c"}  # 429 once: streaming_bulk retries it
    ids = ["a", "b", "c"]
    with pytest.raises(BulkIndexError) as info:
        index.add(ids, np.eye(4, dtype=np.float32)[:3], pd.DataFrame({"articleType": ["x"] * 3}, index=ids))
    report = info.value.report
    assert report.n_ok == 2
    assert [(f.id, f.status) for f in report.failed] == [("b", 400)]
    assert "document_parsing_exception" in report.failed[0].error
    assert "1 failed" in str(info.value) and "re-run" in str(info.value)
    assert report.to_frame()["id"].tolist() == ["b"]
    assert sorted(fake.indices["vrec-test"]["docs"]) == ["a", "c"]


def test_delete_removes_only_this_models_vector_and_refuses_unknown_ids(fake):
    index = _small_index(fake)
    ids = ["a", "b"]
    index.add(ids, np.eye(4, dtype=np.float32)[:2], pd.DataFrame({"articleType": ["x", "y"]}, index=ids))
    fake.requests.clear()
    with pytest.raises(KeyError, match="nothing was deleted"):
        index.delete(["a", "zzz"])
    assert not _calls(fake, suffix="_bulk")
    index.delete(["a"])
    (bulk,) = _calls(fake, suffix="_bulk")
    assert bulk[3] == [
        {"update": {"_index": "vrec-test", "_id": "a"}},
        {"doc": {"emb_m": None}},
    ]
    assert len(index) == 1
    assert fake.indices["vrec-test"]["docs"]["a"] == {"item_id": "a", "articleType": "x"}


def test_build_index_backfills_only_missing_documents(fake, real, monkeypatch):
    catalog, workdir, embeddings = real
    monkeypatch.setattr("vrec_utils.index.elasticsearch.connect", lambda config=None, **kw: fake.client())
    monkeypatch.delenv("VREC_ES_INDEX", raising=False)
    fake.fail_ids = {embeddings.ids[7]: (400, "mapper_parsing_exception")}
    with pytest.raises(BulkIndexError, match="299 document"):
        build_index(workdir, catalog, MODEL, backend="elasticsearch", filter_columns=["articleType", "gender"])
    assert len(fake.indices["vrec-fashion-small"]["docs"]) == N_ITEMS - 1
    fake.fail_ids = {}
    fake.requests.clear()
    index = build_index(workdir, catalog, MODEL, backend="elasticsearch", filter_columns=["articleType", "gender"])
    (lookup,) = _calls(fake, suffix="_search")  # which documents already hold the vector
    assert lookup[3] == ids_with_vector_body("emb_efficientnet_lite0", [str(i) for i in embeddings.ids])
    (bulk,) = _calls(fake, suffix="_bulk")
    assert [line["update"]["_id"] for line in bulk[3][::2]] == [str(embeddings.ids[7])]  # only the missing one
    assert index.last_report.n_ok == 1 and index.last_report.n_skipped == N_ITEMS - 1
    fake.requests.clear()
    index = build_index(workdir, catalog, MODEL, backend="elasticsearch", filter_columns=["articleType", "gender"])
    assert not _calls(fake, suffix="_bulk")  # idempotent re-run: nothing to send
    assert not _calls(fake, suffix="_search")  # and, the embeddings being those recorded, no per-id check
    assert len(index) == N_ITEMS


def test_server_down_during_search_is_reported_clearly(fake):
    index = _small_index(fake)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    index.client = elasticsearch.Elasticsearch(f"http://127.0.0.1:{port}", max_retries=0)
    index.config = ElasticsearchConfig(url=f"http://127.0.0.1:{port}")
    with pytest.raises(BackendUnavailableError, match="cannot reach Elasticsearch"):
        index.search(np.ones(4), 3)


# ======================================================================================= 3. scenarios (fake + live)


def _live_config(url):
    return load_es_config(url=url, request_timeout=60)


@pytest.fixture(params=["fake", pytest.param("live", marks=pytest.mark.es_live)])
def es_index_factory(request):
    """Makes ElasticsearchIndex objects on a fresh index of the fake or of a live server."""
    name = f"vrec-test-{uuid.uuid4().hex[:8]}"
    if request.param == "fake":
        server = FakeElasticsearch()
        kwargs = {"client": server.client()}
    else:
        kwargs = {"config": _live_config(request.getfixturevalue("es_url"))}
    made = []

    def make(model, dim, columns, **extra):
        index = ElasticsearchIndex(model, dim, columns, index_name=name, index_type="flat", **kwargs, **extra)
        made.append(index)
        return index

    yield make
    if request.param == "live" and made:
        made[0].client.indices.delete(index=name, ignore_unavailable=True)


def _faiss_reference(embeddings, metadata):
    index = create_index("faiss", model=MODEL, dim=embeddings.dim, filter_columns=list(metadata.columns))
    index.add(embeddings.ids, embeddings.vectors, metadata)
    return index


def _same_neighbours(got, want, atol=1e-4):
    """The same ids rank by rank, except inside a group of scores tied within ``atol``: there the
    order may differ, and the group that reaches the k-th place may hold other tied members
    (Elasticsearch can only re-sort the hits it returned)."""
    np.testing.assert_allclose(got.scores, want.scores, atol=atol)
    for got_ids, want_ids, scores in zip(np.asarray(got.ids), np.asarray(want.ids), np.asarray(want.scores)):
        with np.errstate(invalid="ignore"):  # -inf padding: inf - inf
            group = np.concatenate([[0], np.cumsum(~(np.abs(np.diff(scores)) < atol))])
        for g in np.unique(group):
            at = group == g
            if not at[-1]:
                assert sorted(got_ids[at]) == sorted(want_ids[at]), (list(got_ids), list(want_ids))


def test_scenario_exact_search_matches_faiss(es_index_factory, real):
    catalog, _, embeddings = real
    metadata = catalog.items.loc[embeddings.ids, ["articleType", "gender"]]
    index = es_index_factory(MODEL, embeddings.dim, ["articleType", "gender"])
    index.add(embeddings.ids, embeddings.vectors, metadata)
    assert len(index) == N_ITEMS
    reference = _faiss_reference(embeddings, metadata)
    queries = np.asarray(embeddings.vectors[:40])
    qids = list(embeddings.ids[:40])
    _same_neighbours(index.search(queries, 10, exclude_ids=qids), reference.search(queries, 10, exclude_ids=qids))
    filters = [{"articleType": catalog.items.at[i, "articleType"]} for i in qids]
    got = index.search(queries, 5, filters=filters, exclude_ids=qids)
    _same_neighbours(got, reference.search(queries, 5, filters=filters, exclude_ids=qids))
    labels = catalog.items["articleType"]
    for row, qid in enumerate(qids):
        found = [i for i in got.ids[row] if i]
        assert qid not in found
        assert all(labels[i] == labels[qid] for i in found)
        assert len(found) == min(5, int((labels.loc[embeddings.ids] == labels[qid]).sum()) - 1)


def test_scenario_persistence_reconnects_to_the_same_index(es_index_factory, real, tmp_path):
    catalog, _, embeddings = real
    metadata = catalog.items.loc[embeddings.ids, ["articleType"]]
    index = es_index_factory(MODEL, embeddings.dim, ["articleType"])
    index.add(embeddings.ids[:50], embeddings.vectors[:50], metadata.iloc[:50])
    index.save(tmp_path / "es")
    saved = json.loads((tmp_path / "es" / "index.json").read_text())
    assert saved["backend"] == "elasticsearch" and saved["index_name"] == index.index_name
    assert "api_key" not in json.dumps(saved) and "password" not in json.dumps(saved)
    again = VectorIndex.load(tmp_path / "es", client=index.client)
    assert isinstance(again, ElasticsearchIndex) and len(again) == 50
    q = np.asarray(embeddings.vectors[:3])
    np.testing.assert_array_equal(again.search(q, 5).ids, index.search(q, 5).ids)


# ======================================================================================= 4. error answers (fake)


class _Answering(FakeElasticsearch):
    """A fake whose every request (or only ``GET /``) is answered with ``status``."""

    def __init__(self, status: int, kind: str, only_root: bool = False) -> None:
        super().__init__()
        self.status, self.kind, self.only_root = status, kind, only_root

    def handle(self, method, target, raw):
        if self.only_root and urlsplit(target).path.strip("/"):
            if urlsplit(target).path == "/_cluster/health":
                self.requests.append((method, "/_cluster/health", {}, None))
                return 200, {"status": "green"}
            return super().handle(method, target, raw)
        self.requests.append((method, urlsplit(target).path, {}, None))
        return self.status, {"error": {"type": self.kind, "reason": f"injected {self.status}"}, "status": self.status}


def test_credentials_in_the_url_become_basic_auth_and_never_appear_in_messages():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = load_es_config(environ={"VREC_ES_URL": f"http://elastic:s3cr%40t@127.0.0.1:{port}"})
    assert config.url == f"http://127.0.0.1:{port}" and (config.username, config.password) == ("elastic", "s3cr@t")
    assert "s3cr" not in repr(config)
    with pytest.warns(UserWarning, match="plain http"), pytest.raises(BackendUnavailableError) as info:
        connect(config)
    assert f"http://127.0.0.1:{port}" in str(info.value) and "s3cr" not in str(info.value) and "elastic:" not in str(info.value)
    with pytest.raises(ValueError, match="give them one way") as both:
        load_es_config(environ={"VREC_ES_URL": "http://u:secret@h:9200", "VREC_ES_API_KEY": "k"})
    assert "secret" not in str(both.value)


@pytest.mark.parametrize(
    ("status", "kind", "error", "message"),
    [
        (401, "security_exception", BackendUnavailableError, r"refused the credentials \(401\)"),
        (503, "cluster_block_exception", BackendUnavailableError, r"is not ready \(503: cluster_block_exception: injected 503\).*_cluster/health"),
        (404, "index_not_found_exception", IndexNotFoundError, "has no index 'vrec-test'.*vrec index --backend elasticsearch"),
    ],
)
def test_error_answers_become_the_projects_one_line_exceptions(status, kind, error, message):
    index = _small_index(FakeElasticsearch())
    index.client = _Answering(status, kind).client()
    with pytest.raises(error, match=message) as info:
        index.search(np.ones(4), 3)
    assert index.config.url in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, IndexBackendError)


def test_a_server_without_the_root_endpoint_is_checked_through_cluster_health():
    server = _Answering(405, "method_not_allowed", only_root=True)
    client = connect(ElasticsearchConfig(), node_class=server.node_class())
    assert [r[:2] for r in server.requests] == [("GET", "/"), ("GET", "/_cluster/health")]
    assert client is not None


def test_reopening_a_saved_index_does_not_create_a_missing_one(fake, tmp_path):
    index = _small_index(fake)
    index.save(tmp_path / "es")
    del fake.indices["vrec-test"]
    with pytest.raises(IndexNotFoundError, match="has no index 'vrec-test'"):
        VectorIndex.load(tmp_path / "es", client=fake.client())
    assert "vrec-test" not in fake.indices


def test_an_existing_field_with_other_index_options_is_refused(fake):
    _small_index(fake)
    with pytest.raises(IndexSettingsMismatchError, match=r"index_options.type 'hnsw' \(not 'flat'\)"):
        _small_index(fake, index_type="flat")


def test_hits_with_equal_scores_come_in_catalog_row_order(fake):
    index = _small_index(fake)
    ids = ["z", "a", "m"]  # rows 0, 1, 2; the same vector, so the same score
    index.add(ids, np.tile(np.eye(4, dtype=np.float32)[:1], (3, 1)), pd.DataFrame({"articleType": ["x"] * 3}, index=ids))
    assert index.search(np.eye(4)[0], 3).ids[0].tolist() == ["z", "a", "m"]  # not the server's id order
