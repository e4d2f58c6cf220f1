"""Sharded IVF build + on-disk merge (faiss.contrib.ondisk), searched memory-mapped: the same
neighbours as an in-memory IVF with the same training; the memory budget picks the code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from vrec_utils.cli import main
from vrec_utils.index import IndexBackendError, build_index, ivf_ondisk
from vrec_utils.index.ivf_ondisk import (
    IvfOnDiskIndex,
    OnDiskIvfIndex,
    build,
    plan_ivf,
    recall_at_k,
)


def shards_of(ids, vectors, size):
    return [(ids[b : b + size], vectors[b : b + size]) for b in range(0, len(ids), size)]


@pytest.mark.parametrize("code_budget", ["SQ8", "PQ"])
def test_sharded_ondisk_ivf_equals_in_memory_ivf_with_the_same_training(real, tmp_path, code_budget):
    _, _, embeddings = real
    ids = np.asarray(embeddings.ids, dtype=str)
    vectors = np.ascontiguousarray(embeddings.vectors, dtype=np.float32)
    n, dim = vectors.shape
    sq8 = plan_ivf(n, dim, memory_budget=10**9, nlist=6, nprobe=2)
    pq8_bytes = n * (8 + ivf_ondisk.ID_BYTES) + 6 * dim * 4  # a budget that fits 8 bytes per vector, not 10
    plan = sq8 if code_budget == "SQ8" else plan_ivf(n, dim, memory_budget=pq8_bytes + n - 1, nlist=6, nprobe=2)
    assert plan.code == ("SQ8" if code_budget == "SQ8" else "PQ8")
    ondisk = build(plan, shards_of(ids, vectors, 70), tmp_path / "ivf", sample=vectors, workers=2)
    assert len(ondisk) == n and (tmp_path / "ivf" / "lists.ivfdata").stat().st_size > 0
    assert not list((tmp_path / "ivf").glob("shard-*.index"))  # merged, then removed
    # the in-memory twin: the very same trained index, all vectors added at once
    memory = faiss.read_index(str(tmp_path / "ivf" / ivf_ondisk.TRAINED))
    memory.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    params = faiss.SearchParametersIVF(nprobe=2)
    want_scores, want_labels = memory.search(vectors[:50], 10, params=params)
    reopened = OnDiskIvfIndex.open(tmp_path / "ivf")
    got_scores, got_labels = reopened.search_labels(vectors[:50], 10, refine_factor=1)  # the codes alone
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_array_equal(got_scores, want_scores)
    found_ids, _ = reopened.search(vectors[:50], 10)  # ids of the (re-ranked) labels
    assert found_ids.tolist() == ids[reopened.search_labels(vectors[:50], 10)[1]].tolist()
    # lists are on disk, not in the index object: read memory-mapped
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(reopened.index).invlists), faiss.OnDiskInvertedLists)


def test_refine_reranks_the_codes_candidates_by_exact_inner_product(real, tmp_path):
    _, _, embeddings = real
    ids = np.asarray(embeddings.ids, dtype=str)
    vectors = np.ascontiguousarray(embeddings.vectors, dtype=np.float32)
    n, dim = vectors.shape
    plan = plan_ivf(n, dim, memory_budget=n * (4 + ivf_ondisk.ID_BYTES) + 6 * dim * 4, nlist=6, nprobe=2)  # PQ4: coarse codes
    ondisk = build(plan, shards_of(ids, vectors, 70), tmp_path / "ivf", sample=vectors, workers=2)
    assert np.array_equal(np.fromfile(tmp_path / "ivf" / ivf_ondisk.VECTORS, dtype=np.float32).reshape(n, dim), vectors)
    queries = vectors[:50]
    # by hand: the codes' 4k candidates, ordered by their exact inner products
    _, candidates = ondisk.search_labels(queries, 40, refine_factor=1)
    exact = np.einsum("nkd,nd->nk", vectors[candidates], queries)
    want = np.take_along_axis(candidates, np.argsort(-exact, axis=1, kind="stable")[:, :10], axis=1)
    scores, labels = ondisk.search_labels(queries, 10)
    assert ondisk.refine_factor == ivf_ondisk.REFINE_FACTOR == 4 and "re-ranked x4" in ondisk.name
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_allclose(scores, np.einsum("nkd,nd->nk", vectors[labels], queries), rtol=1e-5, atol=1e-6)
    flat_labels = faiss.IndexFlatIP(dim)
    flat_labels.add(vectors)
    truth = flat_labels.search(queries, 10)[1]
    codes_only = ondisk.search_labels(queries, 10, refine_factor=1)[1]
    assert recall_at_k(labels, truth) > recall_at_k(codes_only, truth)  # PQ4 alone misorders; re-ranking mends it
    # chunked re-ranking (tiny chunks) gives the same answer
    np.testing.assert_array_equal(ondisk.vectors[[7, 0, 7]], vectors[[7, 0, 7]])  # rows read from disk by number
    chunked = ivf_ondisk.rerank(queries, candidates, ondisk.vectors, 10, chunk_bytes=1)
    np.testing.assert_array_equal(chunked[1], labels)
    # refine=False keeps no vectors and searches the codes alone
    plain = build(plan, shards_of(ids, vectors, 70), tmp_path / "plain", sample=vectors, workers=2, refine=False)
    assert plain.vectors is None and not (tmp_path / "plain" / ivf_ondisk.VECTORS).exists()
    np.testing.assert_array_equal(plain.search_labels(queries, 10)[1], codes_only)


def test_memory_budget_chooses_sq8_then_smaller_pq_codes():
    n, dim = 10_000_000, 256
    assert plan_ivf(n, dim, 4 * 2**30).code == "SQ8"  # 10M x (256 + 8) B = 2.6 GB
    pq = plan_ivf(n, dim, 2 * 2**30)
    assert pq.code.startswith("PQ") and pq.index_bytes(n) <= 2 * 2**30
    smaller = plan_ivf(n, dim, 2**30)
    assert smaller.code.startswith("PQ") and smaller.index_bytes(n) <= 2**30
    assert int(smaller.code[2:]) < int(pq.code[2:])  # less memory: fewer bytes per vector
    assert (pq.nlist, pq.coarse) == (16384, "hnsw32") and plan_ivf(100_000, dim, 2**40).coarse == "flat"
    with pytest.raises(ValueError, match="memory budget"):
        plan_ivf(n, dim, 10**6)


def test_recall_at_k_counts_shared_neighbours():
    exact = np.array([[0, 1, 2], [3, 4, -1]])
    assert recall_at_k(np.array([[2, 1, 0], [3, 9, -1]]), exact) == pytest.approx((1 + 0.5) / 2)


# ---------------------------------------------------------------------------------------- the registered backend


def test_registered_backend_answers_like_a_direct_ondisk_search(real):
    catalog, workdir, embeddings = real
    index = build_index(workdir, catalog, "efficientnet-lite0", backend="ivf-ondisk", nprobe=2)
    assert isinstance(index, IvfOnDiskIndex) and len(index) == len(catalog) and index.info["reused"] is False
    described = index.describe()
    assert described["factory"].endswith(",SQ8") and described["nprobe"] == 2 and described["memory_budget"] == 4 * 2**30
    direct = OnDiskIvfIndex.open(index.info["path"])
    queries = np.ascontiguousarray(embeddings.vectors[:40], dtype=np.float32)
    want_ids, want_scores = direct.search(queries, 10, nprobe=2)
    got = index.search(queries, 10)
    assert got.ids.tolist() == want_ids.tolist()
    np.testing.assert_array_equal(got.scores, want_scores)
    # leave-one-out (what evaluation asks): the direct k+1 list without the query item
    ids = np.asarray(embeddings.ids[:40], dtype=str)
    loo = index.search(queries, 10, exclude_ids=list(ids))
    wide, _ = direct.search(queries, 11, nprobe=2)
    expected = [[i for i in row if i != own][:10] for row, own in zip(wide.tolist(), ids)]
    assert loo.ids.tolist() == expected
    # reused while the embeddings are unchanged; nprobe is a search setting, not a rebuild
    again = build_index(workdir, catalog, "efficientnet-lite0", backend="ivf-ondisk", nprobe=4)
    assert again.info["reused"] is True and again.describe()["nprobe"] == 4


def test_filtered_search_returns_the_best_allowed_items(real):
    catalog, workdir, embeddings = real
    index = build_index(workdir, catalog, "efficientnet-lite0", backend="ivf-ondisk", filter_columns=["articleType"], nprobe=1)
    direct = OnDiskIvfIndex.open(index.info["path"])
    labels = catalog.items.loc[embeddings.ids, "articleType"].to_numpy(dtype=str)
    rare = pd.Series(labels).value_counts().index[-1]  # a label with very few items: its rows fall back to every list
    queries = np.ascontiguousarray(embeddings.vectors[:30], dtype=np.float32)
    for value in ("Tshirts", rare):
        got = index.search(queries, 5, filters={"articleType": value})
        allowed = int((labels == value).sum())
        assert (got.counts() == min(5, allowed)).all()
        assert set(catalog.items.loc[got.ids[got.ids != ""], "articleType"]) == {value}
        # reference: every item scored (all lists), filtered afterwards; rows that found enough in
        # their one probed list must agree with the same post-filter over their probed list only
        every, _ = direct.search(queries, len(direct), nprobe=direct.nlist)
        one_list, _ = direct.search(queries, len(direct), nprobe=1)
        allowed_ids = set(np.asarray(embeddings.ids)[labels == value])
        for row in range(len(queries)):
            in_list = [i for i in one_list[row] if i in allowed_ids]
            reference = in_list if len(in_list) >= min(5, allowed) else [i for i in every[row] if i in allowed_ids]
            assert got.ids[row][: min(5, allowed)].tolist() == reference[:5]


def test_an_index_of_another_catalog_is_never_served(real):
    catalog, workdir, _ = real
    whole = build_index(workdir, catalog, "efficientnet-lite0", backend="ivf-ondisk")
    part = catalog.head(200)
    # the other catalog's folder name; plant the whole catalog's index there, as a stale copy would be
    fresh = build_index(workdir, part, "efficientnet-lite0", backend="ivf-ondisk")
    planted = Path(fresh.info["path"])
    shutil.rmtree(planted)
    shutil.copytree(whole.info["path"], planted)
    served = build_index(workdir, part, "efficientnet-lite0", backend="ivf-ondisk")
    assert served.info["reused"] is False and len(served) == 200
    assert set(served.search(np.ones(served.dim, np.float32), 200).ids[0]) == set(part.ids)
    assert json.loads((planted / "index.json").read_text())["info"]["catalog"] == part.fingerprint()


def test_a_built_index_refuses_more_items_and_the_cli_builds_one(real, capsys):
    catalog, workdir, embeddings = real
    index = build_index(workdir, catalog, "efficientnet-lite0", backend="ivf-ondisk")
    with pytest.raises(IndexBackendError, match="--rebuild"):
        index.add(["new"], embeddings.vectors[:1], catalog.items.loc[[catalog.ids[0]], list(catalog.label_columns)].set_axis(["new"]))
    # the CLI reads the whole fashion-small folder: its first 300 items have vectors (--allow-partial)
    base = ["index", "--catalog", str(catalog.root), "--workdir", str(workdir), "--model", "efficientnet-lite0", "--backend", "ivf-ondisk"]
    code = main([*base, "--memory-budget", "1G", "--nprobe", "3", "--json", "--allow-partial"])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out)
    assert (summary["backend"], summary["nprobe"], summary["memory_budget"]) == ("ivf-ondisk", 3, 2**30)
    assert summary["size"] >= 300  # the first 300, and later byte-identical copies of them (vectors are shared by content)
    assert summary["factory"].endswith(",SQ8") and summary["lists_bytes"] <= 2**30
    assert main([*base, "--es-index", "x"]) == 2 and "--es-index: not a setting of the ivf-ondisk backend" in capsys.readouterr().err
    assert main([*base, "--memory-budget", "lots"]) == 2
