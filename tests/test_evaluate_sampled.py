"""`vrec evaluate --sample-queries N`: a seeded, label-stratified sample of queries searched
against every candidate; reproducible, and the output says how many queries and which index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_evaluate import DUP_GROUPS, FAST, catalog, workdir, write_fake_model  # noqa: F401 - module fixtures reused

from vrec_utils.cli import main
from vrec_utils.cli.evaluate_cmd import print_result
from vrec_utils.evaluation import evaluate_models
from vrec_utils.evaluation.sampling import stratified_sample
from vrec_utils.index import build_index
from vrec_utils.index.ivf_ondisk import IvfOnDiskIndex

MODELS = ["fake-cnn", "fake-vlm"]


def test_sampled_evaluation_is_reproducible_and_stratified(catalog, workdir):  # noqa: F811
    full = evaluate_models(catalog, workdir, MODELS, **FAST)
    a = evaluate_models(catalog, workdir, MODELS, sample_queries=60, seed=3, **FAST)
    b = evaluate_models(catalog, workdir, MODELS, sample_queries=60, seed=3, **FAST)
    assert json.dumps(a.to_json()) == json.dumps(b.to_json())
    assert a.n_queries == 60 and a.report["query_sample"] == {**a.report["query_sample"], "queries": 60, "of": full.n_queries, "seed": 3}
    other = evaluate_models(catalog, workdir, MODELS, sample_queries=60, seed=4, **FAST)
    assert set(other.query_ids) != set(a.query_ids)
    # stratified: every label present, none above its share (rounded up), the largest the most
    labels = catalog.items["articleType"]
    share = labels.loc[full.query_ids].value_counts() / full.n_queries * 60
    got = labels.loc[a.query_ids].value_counts().reindex(share.index, fill_value=0)
    assert (got >= 1).all() and (got <= np.maximum(1, np.ceil(share))).all()
    assert got.idxmax() == share.idxmax() and got.sum() == 60
    # a sampled query searches every candidate: its numbers are those of the full evaluation
    pq, fq = a.per_query, full.per_query.set_index(["query_id", "model", "setting", "metric"])["value"]
    np.testing.assert_allclose(pq["value"].to_numpy(), fq.loc[pd.MultiIndex.from_frame(pq[["query_id", "model", "setting", "metric"]])].to_numpy())


def test_stratified_sample_takes_all_when_asked_for_more_and_refuses_zero():
    positions = np.arange(10, 20)
    labels = np.array(list("aaaaaaabbc"))
    assert stratified_sample(positions, labels, 50, seed=0).tolist() == positions.tolist()
    picked = stratified_sample(positions, labels, 4, seed=0)
    assert len(picked) == 4 and set(labels[picked - 10]) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="must be >= 1"):
        stratified_sample(positions, labels, 0, seed=0)


def test_output_says_how_many_queries_and_which_index_answered(catalog, workdir, capsys, tmp_path):  # noqa: F811
    result = evaluate_models(catalog, workdir, ["fake-cnn"], sample_queries=40, seed=7, backend="faiss", **FAST)
    print_result(result)
    out = capsys.readouterr().out
    assert f"queries: a sample of 40 of {result.report['query_sample']['of']} (seed 7, stratified by articleType)" in out
    assert "answered by: faiss index (ann=none)" in out
    result.to_json(tmp_path / "eval.json")
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["report"]["query_sample"]["queries"] == 40 and saved["config"]["answered_by"] == "faiss index (ann=none)"


def test_cli_refuses_a_zero_sample(capsys, sample_dir, tmp_path):
    code = main(["evaluate", "--catalog", str(sample_dir), "--workdir", str(tmp_path), "--models", "m", "--sample-queries", "0"])
    assert code == 2 and "--sample-queries" in capsys.readouterr().err


def test_sampled_queries_answered_by_the_ondisk_ivf_name_it_and_its_settings(catalog, workdir, capsys):  # noqa: F811
    exact = evaluate_models(catalog, workdir, ["fake-cnn"], sample_queries=40, seed=7, **FAST)
    everything = evaluate_models(catalog, workdir, ["fake-cnn"], sample_queries=40, seed=7, backend="ivf-ondisk", index_options={"nprobe": 10**6}, **FAST)
    settings = everything.config["index_settings"]["fake-cnn"]
    assert settings["nprobe"] == settings["nlist"] and settings["factory"].endswith(",SQ8")  # every list probed
    # every list probed, SQ8 codes: the same queries, and scores close to the exact ones
    assert everything.query_ids.tolist() == exact.query_ids.tolist()
    for metric in ("ndcg@5", "ndcg@10"):
        assert abs(everything.table().set_index("model").at["fake-cnn", metric] - exact.table().set_index("model").at["fake-cnn", metric]) < 0.03
    default = evaluate_models(catalog, workdir, ["fake-cnn"], sample_queries=40, seed=7, backend="ivf-ondisk", **FAST)
    described = default.config["index_settings"]["fake-cnn"]
    assert described["nprobe"] < described["nlist"]  # the plan's own nprobe
    print_result(default)
    out = capsys.readouterr().out
    assert f"answered by: ivf-ondisk index (factory={described['factory']}, nlist={described['nlist']}, nprobe={described['nprobe']}, memory_budget={4 * 2**30})" in out


def test_evaluate_searches_the_ondisk_index_vrec_index_saved(catalog, tmp_path, monkeypatch, capsys):  # noqa: F811
    write_fake_model(tmp_path, catalog, "fake-cnn", 16, noise=0.9, seed=1)
    saved = build_index(tmp_path, catalog, "fake-cnn", backend="ivf-ondisk")  # what `vrec index --backend ivf-ondisk` does
    lists = Path(saved.info["path"]) / "lists.ivfdata"
    stamp = lists.stat().st_mtime_ns
    monkeypatch.setattr(IvfOnDiskIndex, "_add", lambda *a, **k: pytest.fail("evaluate built an index instead of reusing the saved one"))
    exact = evaluate_models(catalog, tmp_path, ["fake-cnn"], sample_queries=40, seed=7, **FAST)
    reused = evaluate_models(catalog, tmp_path, ["fake-cnn"], sample_queries=40, seed=7, backend="ivf-ondisk", index_options={"nprobe": 10**6}, **FAST)
    settings = reused.config["index_settings"]["fake-cnn"]
    assert settings["reused"] is True and settings["saved_index"] == saved.info["path"] and lists.stat().st_mtime_ns == stamp
    assert settings["nprobe"] == settings["nlist"]  # this run's search setting, on the saved lists
    # the saved index holds the excluded byte-identical copies too; they never come back as candidates
    assert settings["size"] == len(catalog) > reused.report["candidates"]
    for metric in ("ndcg@5", "ndcg@10"):
        assert abs(reused.table().set_index("model").at["fake-cnn", metric] - exact.table().set_index("model").at["fake-cnn", metric]) < 0.03
    print_result(reused)
    assert f"note: fake-cnn: searched the saved ivf-ondisk index {saved.info['path']}" in capsys.readouterr().out


def test_evaluate_builds_and_saves_the_ondisk_index_when_none_matches_saying_so(catalog, tmp_path, capsys):  # noqa: F811
    write_fake_model(tmp_path, catalog, "fake-cnn", 16, noise=0.9, seed=1)
    build_index(tmp_path, catalog, "fake-cnn", backend="ivf-ondisk")  # the default memory budget
    options = {"memory_budget": 2**20}  # another build setting: the saved index does not match
    first = evaluate_models(catalog, tmp_path, ["fake-cnn"], sample_queries=40, seed=7, backend="ivf-ondisk", index_options=options, **FAST)
    built = first.config["index_settings"]["fake-cnn"]
    assert built["reused"] is False and built["memory_budget"] == 2**20
    assert any(n.startswith("fake-cnn: no saved ivf-ondisk index matched") and built["saved_index"] in n for n in first.config["notes"])
    again = evaluate_models(catalog, tmp_path, ["fake-cnn"], sample_queries=40, seed=7, backend="ivf-ondisk", index_options=options, **FAST)
    assert again.config["index_settings"]["fake-cnn"]["reused"] is True and again.config["index_settings"]["fake-cnn"]["saved_index"] == built["saved_index"]
    assert json.dumps(again.to_json()["results"]) == json.dumps(first.to_json()["results"])


def test_a_restricted_ondisk_index_answers_from_the_allowed_items_only(catalog, tmp_path):  # noqa: F811
    vectors = write_fake_model(tmp_path, catalog, "fake-cnn", 16, noise=0.9, seed=1)
    index = build_index(tmp_path, catalog, "fake-cnn", backend="ivf-ondisk", nprobe=10**6)
    copy, original = DUP_GROUPS[0]  # byte-identical images: the same vector
    position = catalog.ids.index(original)
    assert index.search(vectors[position], 1, exclude_ids=[original]).ids[0][0] == copy
    index.restrict_to([i for i in catalog.ids if i != copy])
    found = index.search(vectors[position], 5, exclude_ids=[original]).ids[0]
    assert copy not in found and len(found) == 5
    with pytest.raises(KeyError, match="1 id\\(s\\) not in the ivf-ondisk index of fake-cnn, e.g. nope"):
        index.restrict_to(["nope"])
