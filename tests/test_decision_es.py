"""The decision report's Elasticsearch rows measured on a server (vrec_utils.decision.es_server).

Request bodies and the whole path are checked on the in-process fake (tests/fake_es.py: exact
cosine, so every measured row must equal exact search); one ``es_live`` test runs the rows on a
live node over 300 real fashion-small items and checks recall against exact search computed
directly from the server's own answers."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_es import FakeElasticsearch  # noqa: E402

from vrec_utils.decision.data import decision_data  # noqa: E402
from vrec_utils.decision.es_server import (  # noqa: E402
    content_key,
    decision_index_name,
    es_index_types,
    sampled,
    server_rows,
    server_table,
)
from vrec_utils.decision.run import DecisionParams, run_decision  # noqa: E402
from vrec_utils.index.elasticsearch import ElasticsearchConfig, check_index_name, dense_vector_mapping  # noqa: E402
from vrec_utils.store import Embeddings  # noqa: E402

FAKE = ElasticsearchConfig(url="http://fake-es:9200")


def fake(catalog, name: str, dim: int, noise: float, seed: int) -> Embeddings:
    rng = np.random.default_rng(seed)
    codes = pd.factorize(catalog.items["articleType"])[0]
    v = rng.normal(size=(codes.max() + 1, dim))[codes] + noise * rng.normal(size=(len(codes), dim))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return Embeddings(np.asarray(catalog.ids), v.astype(np.float32), {"model": name, "identity": {"weights": "fake-test-vectors"}})


@pytest.fixture(scope="module")
def data(small_catalog):
    pair = {"cnn": fake(small_catalog, "cnn", 400, 2.5, 0), "vlm": fake(small_catalog, "vlm", 48, 1.2, 1)}
    return decision_data(small_catalog, pair, n_bootstrap=100, n_permutations=100)


def test_server_default_mapping_leaves_index_options_out():
    assert dense_vector_mapping(48, index_type="default") == {
        "type": "dense_vector", "dims": 48, "element_type": "float", "index": True, "similarity": "cosine"}
    assert dense_vector_mapping(48, index_type="int8_hnsw")["index_options"] == {"type": "int8_hnsw", "m": 16, "ef_construction": 100}
    with pytest.raises(ValueError, match="index_type must be one of"):
        dense_vector_mapping(48, index_type="bbq")


def test_bbq_is_only_asked_for_64_dims_and_more():
    assert es_index_types(48) == ["hnsw", "int8_hnsw", "default"]
    assert es_index_types(64) == ["hnsw", "int8_hnsw", "bbq_hnsw", "default"]


def test_index_names_are_the_reports_own_and_follow_the_content(data):
    x, ids = data.vectors["cnn"], data.ids
    key = content_key("cnn", ids, x, None, "hnsw")
    name = decision_index_name("local:/tmp/My Model", "bbq_hnsw", key)
    assert check_index_name(name) == name and name.startswith("vrec-decision-local-tmp-my-model-bbq-hnsw-")
    assert content_key("cnn", ids, x, None, "hnsw") == key
    changed = x.copy()
    changed[3, 0] += 1e-6
    others = {content_key("cnn", ids, changed, None, "hnsw"), content_key("cnn", ids[::-1], x, None, "hnsw"),
              content_key("cnn", ids, x, np.array(["a"] * len(ids)), "hnsw"), content_key("cnn", ids, x, None, "int8_hnsw"),
              content_key("vlm", ids, x, None, "hnsw")}
    assert key not in others and len(others) == 5


def test_measured_rows_on_the_fake_server_equal_exact_search_and_leave_nothing(data):
    """The fake answers kNN exactly, so every measured row must have recall 1 and the nDCG of exact
    search; the kNN requests carry the swept num_candidates, the filter and the query's own id."""
    es = FakeElasticsearch()
    sample = sampled(data, 40)
    assert sample.n_queries == 40 and set(sample.query_pos) <= set(data.query_pos)
    values, dims, records = server_rows(sample, num_candidates=(5, 50), config=FAKE, client=es.client())
    table = server_table(sample, records, sample.result(values, dims), data.n_queries)
    measured = table[table["source"] == "measured on Elasticsearch 9.1.0"]
    # cnn: hnsw, int8_hnsw, bbq_hnsw, default; vlm (48 dims): no bbq; x 2 num_candidates x filtered or not
    assert len(measured) == (4 + 3) * 2 * 2
    assert (measured["recall@5"] == 1.0).all() and (measured["took_ms_per_query"] == 1.0).all()
    exact = table[table["setting"].str.startswith("exact")].set_index(["model", "filtered"])["ndcg@5"]
    for _, row in measured.iterrows():
        assert row["ndcg@5"] == exact[(row["model"], row["filtered"])]
    defaults = measured[measured["setting"].str.startswith("es default")].groupby("model")["index_type"].first()
    assert defaults.to_dict() == {"cnn": "default=bbq_hnsw + rescore x3", "vlm": "default=int8_hnsw"}
    assert set(table.loc[table["source"] == "emulated", "index_type"]) == {"bbq emulated", "int8 emulated"}
    assert table["queries"].iloc[0] == f"40 of {data.n_queries} queries, drawn with seed 0"

    searches = [body for method, path, _, body in es.requests if path.endswith("_msearch")]
    knn = [b["knn"] for lines in searches for b in lines[1::2]]
    assert {q["num_candidates"] for q in knn} == {5, 50} and {q["k"] for q in knn} == {5}
    own = {str(data.ids[p]) for p in sample.query_pos}
    assert all(q["filter"]["bool"]["must_not"][0]["ids"]["values"][0] in own for q in knn)
    assert any("filter" in q["filter"]["bool"] for q in knn) and any("filter" not in q["filter"]["bool"] for q in knn)
    created = [path.strip("/") for method, path, _, body in es.requests if method == "PUT" and path.count("/") == 1 and not path.startswith("/_")]
    assert len(created) == 7 and all(name.startswith("vrec-decision-") for name in created)
    assert es.indices == {}  # every index the run made is deleted


def test_kept_indexes_are_reused_only_while_their_content_matches(data):
    es = FakeElasticsearch()
    sample = sampled(data, 10)
    one = dataclasses.replace(sample, models=["vlm"])
    server_rows(one, index_types=("hnsw",), num_candidates=(5,), config=FAKE, client=es.client(), keep=True)
    assert len(es.indices) == 1
    before = len([r for r in es.requests if r[1].endswith("_bulk")])
    _, _, records = server_rows(one, index_types=("hnsw",), num_candidates=(5,), config=FAKE, client=es.client(), keep=True)
    assert len([r for r in es.requests if r[1].endswith("_bulk")]) == before  # nothing re-sent
    assert [r["build_s"] for r in records if "build_s" in r] == [0.0, 0.0]
    moved = dataclasses.replace(one, vectors={"vlm": np.roll(one.vectors["vlm"], 1, axis=0)})
    server_rows(moved, index_types=("hnsw",), num_candidates=(5,), config=FAKE, client=es.client(), keep=False)
    assert len(es.indices) == 1  # another content, another index (made and deleted); the kept one is untouched


def test_run_decision_with_a_server_adds_the_measured_tables_and_sentence(small_catalog, data):
    pair = {"cnn": fake(small_catalog, "cnn", 400, 2.5, 0), "vlm": fake(small_catalog, "vlm", 48, 1.2, 1)}
    params = DecisionParams(pca_dims=(), quantisers=(), hnsw_ef=(8,), ivf_nprobe=(), n_bootstrap=100, n_permutations=100, latency_queries=16,
                            elasticsearch="on", es_queries=30, es_num_candidates=(5, 100), es_index_types=("hnsw", "default"))
    report = run_decision(small_catalog, pair, params=params, es_client=FakeElasticsearch().client())
    assert {"es", "es_pairs"} <= set(report.tables)
    pairs = report.tables["es_pairs"]
    assert pairs.loc[pairs["source"].str.startswith("measured"), "same_conclusion_as_exact"].all()
    line = next(line for line in report.verdict if line.startswith("**Measured on Elasticsearch 9.1.0**"))
    assert "(30 of" in line and "num_candidates=100" in line and "holds in 8 of 8 server settings" in line
    assert not any("emulated, not measured" in n for n in report.notes)
    with pytest.raises(ValueError, match="es_index_types: unknown bbq"):
        DecisionParams(es_index_types=("bbq",))


# ------------------------------------------------------------------- live node


@pytest.mark.es_live
def test_measured_rows_on_a_live_node_match_recall_computed_from_its_answers(real, es_url):
    """300 real fashion-small items, efficientnet-lite0 at 1280 dims and cut to 128 (re-normalised):
    the server's defaults (bbq_hnsw from 384 dims, int8_hnsw below) and, for a few settings, recall
    recomputed from the server's own answers to plain kNN requests against numpy's exact top-5."""
    from vrec_utils.index.elasticsearch import connect, knn_search_body, load_es_config, vector_field

    catalog, _, embeddings = real
    cut = Embeddings(embeddings.ids, np.ascontiguousarray(embeddings.vectors[:, :128]), {**embeddings.manifest, "model": "lite0-128"})
    data = decision_data(catalog, {"efficientnet-lite0": embeddings, "lite0-128": cut}, n_bootstrap=100, n_permutations=100)
    sample = sampled(data, 60)
    config = load_es_config(url=es_url, request_timeout=60)
    client = connect(config)
    values, dims, records = server_rows(sample, num_candidates=(5, 300), config=config, keep=True)
    table = server_table(sample, records, sample.result(values, dims), data.n_queries)
    names = set(table["index_name"].dropna())
    try:
        measured = table[table["source"].str.startswith("measured on Elasticsearch 9.")]
        assert len(measured) == 2 * 4 * 2 * 2
        defaults = measured[measured["setting"].str.startswith("es default")].groupby("model")["index_type"].first()
        assert defaults["efficientnet-lite0"].startswith("default=bbq_hnsw") and defaults["lite0-128"].startswith("default=int8_hnsw")
        full = measured[measured["setting"].isin(["es hnsw nc=300", "es hnsw nc=300 +filter"])]
        assert (full["recall@5"] >= 0.99).all()
        assert (measured["took_ms_per_query"] >= 0).all() and (measured["wall_ms_per_query"] > 0).all()
        column = data.category_column
        for model, setting in (("efficientnet-lite0", "es bbq_hnsw nc=5"), ("lite0-128", "es default nc=5 +filter")):
            row = measured[(measured["model"] == model) & (measured["setting"] == setting)].iloc[0]
            x = data.vectors[model]
            recalls = []
            for q in sample.query_pos:
                sims = x @ x[q]
                sims[q] = -np.inf
                if row["filtered"]:
                    sims[data.groups != data.groups[q]] = -np.inf
                top = np.argsort(-sims, kind="stable")[:5]
                exact = set(data.ids[top[np.isfinite(sims[top])]])  # a small category may hold fewer than 5 others
                where = {column: catalog.items.loc[data.ids[q], column]} if row["filtered"] else None
                body = knn_search_body(vector_field(model), x[q], 5, int(row["num_candidates"]), filter=where, exclude_id=data.ids[q])
                hits = client.search(index=row["index_name"], **body)["hits"]["hits"]
                recalls.append(len(exact & {h["_id"] for h in hits}) / len(exact) if exact else 1.0)
            assert row["recall@5"] == pytest.approx(np.mean(recalls), abs=1e-12), (model, setting)
    finally:
        for name in names:
            client.indices.delete(index=name, ignore_unavailable=True)
