"""vrec_utils.evaluation and `vrec evaluate` on ~300 real fashion-small items with fake cached models.

The fake models are class centroid + noise vectors written into a tmp workdir with
EmbeddingCache, so load_embeddings finds them like real ones. Copies of the same image get the
same vector, as a real model would give them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.metrics import ndcg_score

from vrec_utils.catalog import CatalogError, Split, load_catalog
from vrec_utils.evaluation import (
    EvalConfig,
    bootstrap_ci,
    duplicate_keys,
    evaluate,
    evaluate_embeddings,
    evaluate_models,
    label_relevance,
    paired_permutation_pvalue,
)
from vrec_utils.index.exact import leave_one_out_knn
from vrec_utils.store import EmbeddingCache, Embeddings, EmbeddingsNotFoundError, load_embeddings

FAST = {"n_bootstrap": 200, "n_permutations": 500}
DUP_GROUPS = [["11058", "11057"], ["11085", "11086"], ["11090", "11089"], ["11091", "11092"]]


def write_fake_model(workdir, catalog, name: str, dim: int, noise: float, seed: int) -> np.ndarray:
    """Cache ``name``'s vectors for every catalog item: articleType centroid + noise, copies of
    one image share a vector. Returns the vectors in catalog order."""
    rng = np.random.default_rng(seed)
    codes = pd.factorize(catalog.items["articleType"])[0]
    vectors = rng.normal(size=(codes.max() + 1, dim))[codes] + noise * rng.normal(size=(len(codes), dim))
    first = pd.factorize(duplicate_keys(catalog, catalog.ids))[0]
    vectors = vectors[np.unique(first, return_index=True)[1][first]]  # every copy gets its first copy's vector
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cache = EmbeddingCache.open(workdir, catalog, {"model": name, "dim": dim}, precision="fp32", normalized=True)
    cache.append(catalog.ids, vectors.astype(np.float32))
    cache.consolidate(complete=True)
    return vectors.astype(np.float32)


@pytest.fixture(scope="module")
def catalog(fashion_small_dir):
    """The first 300 items plus four groups of byte-identical images (308 items)."""
    full = load_catalog(fashion_small_dir)
    extra = [i for group in DUP_GROUPS for i in group]
    ids = [i for i in full.ids[:300] if i not in extra] + extra
    order = {i: n for n, i in enumerate(full.ids)}
    return full.subset(sorted(ids, key=order.__getitem__))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, catalog):
    path = tmp_path_factory.mktemp("evalwork")
    write_fake_model(path, catalog, "fake-cnn", 16, noise=0.9, seed=1)
    write_fake_model(path, catalog, "fake-vlm", 24, noise=0.6, seed=2)
    return path


@pytest.fixture(scope="module")
def result(catalog, workdir):
    return evaluate_models(catalog, workdir, ["fake-cnn", "fake-vlm"], filter_column="articleType", **FAST)


def _brute_force_ndcg(vectors, labels_levels, k, gain):
    """Per-item nDCG@k over all other items with sklearn: y_true = grades of every other item,
    y_score = cosine similarity (query removed)."""
    n = len(vectors)
    sims = vectors @ vectors.T
    grades = sum((lv[:, None] == lv[None, :]).astype(float) for lv in labels_levels)
    out = np.zeros(n)
    for q in range(n):
        others = np.arange(n) != q
        y_true = grades[q, others]
        if gain == "exp2":
            y_true = np.exp2(y_true) - 1
        out[q] = ndcg_score(y_true[None, :], sims[q, others][None, :], k=k)
    return out


def _without_near_ties(vectors: np.ndarray, positions: np.ndarray, k: int, eps: float = 1e-5) -> np.ndarray:
    """Mask of the query ``positions`` whose k+1 best scores (float64, self excluded) hold no two
    distinct values closer than ``eps``: there, float32 rounding in another summation order (a
    BLAS kernel, an index backend) cannot reorder the list. Exact ties (copies of an image,
    which share their labels) are kept."""
    v = np.asarray(vectors, dtype=np.float64)
    sims = v[positions] @ v.T
    sims[np.arange(len(positions)), positions] = -np.inf
    top = -np.sort(-sims, axis=1)[:, : k + 1]
    gaps = -np.diff(top, axis=1)
    return ~((gaps > 0) & (gaps < eps)).any(axis=1)


# --------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("gain", ["exp2", "linear"])
@pytest.mark.parametrize("columns", [["articleType"], ["masterCategory", "subCategory", "articleType"]])
def test_label_ndcg_matches_sklearn_over_all_candidates(catalog, workdir, gain, columns):
    """End to end: our nDCG (ideal DCG from class counts) equals sklearn's over full rows."""
    emb = load_embeddings(workdir, catalog, "fake-vlm")
    kwargs = {"label": columns[0]} if len(columns) == 1 else {"hierarchy": columns}
    res = evaluate_embeddings(catalog, {"fake-vlm": emb}, exclude_duplicates=False, gain=gain, **kwargs, **FAST)
    vectors = emb.vectors_for(catalog.ids).astype(np.float64)
    items = catalog.items
    paths = [pd.factorize(items[columns[: i + 1]].astype(str).agg("/".join, axis=1))[0] for i in range(len(columns))]
    position = pd.Index(catalog.ids).get_indexer(res.query_ids)
    for k in (5, 10):
        clear = _without_near_ties(vectors, position, k)
        assert clear.mean() > 0.95
        expected = _brute_force_ndcg(vectors, paths, k, gain)[position]
        ours = res.values[("fake-vlm", "unfiltered")][f"ndcg@{k}"]
        np.testing.assert_allclose(ours[clear], expected[clear], rtol=0, atol=1e-9)


def test_label_relevance_hierarchy_and_empty_labels():
    items = pd.DataFrame(
        {
            "master": ["Apparel", "Apparel", "Apparel", "Footwear", "Apparel", ""],
            "sub": ["Topwear", "Topwear", "Bottomwear", "Shoes", "Topwear", "Topwear"],
            "article": ["Tshirts", "Shirts", "Tshirts", "Tshirts", "", "Tshirts"],
        }
    )
    rel = label_relevance(items, ["master", "sub", "article"])
    q = np.array([0])
    # item 0 against 1..5: same path to sub (2), master only (1: the article matches but the path
    # does not), nothing (0), master+sub with an empty article (2), empty master (0)
    np.testing.assert_array_equal(rel.grades(q, np.array([[1, 2, 3, 4, 5, -1]])), [[2, 1, 0, 2, 0, 0]])
    np.testing.assert_array_equal(rel.n_at_least(q), [[3, 2, 0]])
    np.testing.assert_array_equal(rel.ideal(q, 5), [[2, 2, 1, 0, 0]])
    # an empty label relates to nothing, not even to another empty label
    assert rel.n_relevant(np.array([5]))[0] == 0
    binary = label_relevance(items, ["article"])
    np.testing.assert_array_equal(binary.n_relevant(np.arange(6)), [3, 0, 3, 3, 0, 3])


def test_query_is_never_its_own_candidate(catalog, workdir):
    vectors = load_embeddings(workdir, catalog, "fake-cnn").vectors_for(catalog.ids)
    queries = np.arange(len(vectors))
    found = leave_one_out_knn(vectors, queries, 10)
    assert not (found == queries[:, None]).any()
    groups = pd.factorize(catalog.items["articleType"])[0]
    found = leave_one_out_knn(vectors, queries, 10, groups)
    assert not (found == queries[:, None]).any()
    valid = found >= 0
    assert (groups[np.where(valid, found, 0)] == groups[:, None])[valid].all()  # filter respected
    # padding where a class has fewer than 10 other members
    sizes = np.bincount(groups)[groups] - 1
    np.testing.assert_array_equal(valid.sum(axis=1), np.minimum(sizes, 10))


@pytest.mark.parametrize(
    "n, n_queries, k, block",
    [
        (1100, 50, 7, 16),  # few queries: query blocks against the whole pool
        (1100, 1100, 7, 256),  # leave-one-out: symmetric block pairs
        (1100, 900, 2, 256),  # symmetric, with the pruned top-k inside 256-wide blocks
        (2100, 2100, 7, 1024),  # symmetric, pruned, off-diagonal blocks read by columns
        (1024, 1024, 7, 4096),  # one block, pruned
        (40, 40, 50, 16),  # k larger than the pool: padded
    ],
)
def test_leave_one_out_knn_matches_brute_force_order(n, n_queries, k, block):
    rng = np.random.default_rng(n + k)
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = np.sort(rng.choice(n, n_queries, replace=False))
    found = leave_one_out_knn(vectors, queries, k, block=block)
    sims = (vectors[queries].astype(np.float64) @ vectors.T.astype(np.float64)).astype(np.float32)  # the tie rule's scores
    sims[np.arange(n_queries), queries] = -np.inf
    expected = np.argsort(-sims, axis=1, kind="stable")[:, : min(k, n - 1)]
    np.testing.assert_array_equal(found[:, : expected.shape[1]], expected)
    assert (found[:, expected.shape[1] :] == -1).all()


def test_backends_agree(catalog, workdir, result):
    via_index = evaluate_models(catalog, workdir, ["fake-cnn", "fake-vlm"], filter_column="articleType", backend="faiss", **FAST)
    assert via_index.config["backend"] == "faiss"
    for row, per_metric in result.values.items():
        for metric, values in per_metric.items():  # every query, near-ties included: one tie rule
            np.testing.assert_array_equal(via_index.values[row][metric], values, err_msg=f"{row} {metric}")
    # exact ties between items of different classes (items given the vector of an item of another
    # class): which of two tied items is listed first changes the metrics, so the backends agree
    # only if both apply the tie rule (equal scores by lower row)
    emb = load_embeddings(workdir, catalog, "fake-cnn")
    labels = catalog.items["articleType"].reindex(emb.ids).to_numpy()
    vectors = np.array(emb.vectors)
    takers = [i for i in range(1, 200, 2) if labels[i] != labels[i - 1]]
    vectors[takers] = vectors[np.asarray(takers) - 1]
    tied = {"tied": Embeddings(emb.ids, vectors, emb.manifest)}
    found = leave_one_out_knn(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), np.arange(len(vectors)), 10)
    assert np.isin(found, takers).any(axis=1).sum() > 20  # many lists hold a tied pair
    by_matrix = evaluate_embeddings(catalog, tied, **FAST)
    by_index = evaluate_embeddings(catalog, tied, backend="faiss", **FAST)
    for metric, values in by_matrix.values[("tied", "unfiltered")].items():
        np.testing.assert_array_equal(by_index.values[("tied", "unfiltered")][metric], values, err_msg=f"tied {metric}")
    hnsw = evaluate_models(catalog, workdir, ["fake-cnn"], backend="faiss", index_options={"ann": "hnsw"}, **FAST)
    assert hnsw.config["index_options"] == {"ann": "hnsw"}
    with pytest.raises(KeyError, match="available"):
        evaluate_models(catalog, workdir, ["fake-cnn"], backend="annoy")


def test_evaluate_takes_a_frozen_config(catalog, workdir, result):
    config = EvalConfig(ks=[10, 5, 5], filter_column="articleType", **FAST)
    assert config.ks == (5, 10) and config.label == "articleType" and config.depth == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    with pytest.raises(TypeError):
        config.index_options["ann"] = "hnsw"  # read-only
    embeddings = {name: load_embeddings(workdir, catalog, name) for name in ("fake-cnn", "fake-vlm")}
    direct = evaluate(catalog, embeddings, config)
    assert direct.to_json() == result.to_json()  # the keyword wrappers build the same config
    with pytest.raises(ValueError, match="ci_method"):
        EvalConfig(ci_method="normal")
    with pytest.raises(ValueError, match="index_options"):
        EvalConfig(index_options={"ann": "hnsw"})  # the matrix backend has none


def test_same_inputs_and_seed_give_identical_numbers(catalog, workdir, result):
    again = evaluate_models(catalog, workdir, ["fake-cnn", "fake-vlm"], filter_column="articleType", **FAST)
    assert json.dumps(again.to_json()) == json.dumps(result.to_json())
    pd.testing.assert_frame_equal(again.per_query, result.per_query)
    other_seed = evaluate_models(catalog, workdir, ["fake-cnn", "fake-vlm"], backend="matrix", seed=1, **FAST)
    a = result.summary().query("setting == 'unfiltered'").reset_index(drop=True)
    b = other_seed.summary()
    pd.testing.assert_series_equal(a["mean"], b["mean"])  # the seed only moves the intervals
    assert not np.array_equal(a["ci_low"], b["ci_low"])


# --------------------------------------------------------------------------------- duplicates and singletons


def test_duplicates_excluded_keep_first_copy(catalog, workdir, result):
    meta = pd.read_csv(catalog.root / "image_meta.csv", dtype=str, keep_default_na=False).set_index("id").loc[catalog.ids]
    copies = meta[meta["dup_group_first_id"] != meta.index]
    assert set(DUP_GROUPS[0][1:]) <= set(copies.index)
    assert result.report["duplicates_excluded"] == len(copies) >= 4
    dropped = set(copies.index)
    assert dropped.isdisjoint(result.query_ids)
    kept = set(copies["dup_group_first_id"])
    assert result.report["candidates"] == len(catalog) - len(copies)
    with_dups = evaluate_models(catalog, workdir, ["fake-cnn"], exclude_duplicates=False, **FAST)
    assert with_dups.report["duplicates_excluded"] == 0
    assert dropped <= set(with_dups.query_ids)
    # a copy is a free rank-1 hit
    ndcg = pd.Series(with_dups.values[("fake-cnn", "unfiltered")]["mrr@5"], index=with_dups.query_ids)
    assert (ndcg[sorted(kept | dropped)] == 1.0).all()


def test_duplicates_found_by_content_hash_without_image_meta(catalog, tmp_path):
    """A generic catalog (no image_meta.csv) gets the same groups from sha256 of the files."""
    ids = [i for group in DUP_GROUPS for i in group] + catalog.ids[:10]
    (tmp_path / "img").mkdir()
    for i in ids:
        shutil.copy(catalog.image_path(i), tmp_path / "img" / f"{i}.jpg")
    rows = catalog.items.loc[ids, ["articleType"]].assign(id=ids, image=[f"img/{i}.jpg" for i in ids])
    rows.to_csv(tmp_path / "catalog.csv", index=False)
    generic = load_catalog(tmp_path / "catalog.csv")
    by_hash = duplicate_keys(generic, generic.ids)
    by_meta = duplicate_keys(catalog, generic.ids)
    assert pd.factorize(by_hash)[0].tolist() == pd.factorize(by_meta)[0].tolist()
    assert by_hash.duplicated().sum() == 4


def test_singletons_reported_and_left_out(catalog, result):
    counts = catalog.items["articleType"].value_counts()
    singles = sorted(counts[counts == 1].index)
    lonely = result.report["no_relevant"]
    assert lonely["count"] == len(singles)
    assert sorted(lonely["classes"]) == singles
    single_ids = set(catalog.items.index[catalog.items["articleType"].isin(singles)])
    assert single_ids.isdisjoint(result.query_ids)
    assert result.n_queries == result.report["candidates"] - len(singles)
    summary = result.summary()
    assert (summary["n_queries"] == result.n_queries).all()


def test_singletons_remain_candidates(catalog, workdir):
    vectors = load_embeddings(workdir, catalog, "fake-cnn").vectors_for(catalog.ids)
    counts = catalog.items["articleType"].value_counts()
    single_pos = np.flatnonzero(catalog.items["articleType"].isin(counts[counts == 1].index).to_numpy())
    found = leave_one_out_knn(vectors, np.arange(len(vectors)), 10)
    assert np.isin(single_pos, found).any()


# --------------------------------------------------------------------------------- interactions


@pytest.fixture()
def tiny(tmp_path, catalog):
    """Six items with hand-made vectors on a circle: item 0's neighbours in order are 1, 2, 3, 4, 5;
    item 2's are 1, 3, 0, 4, 5."""
    ids = catalog.ids[:6]
    tiny_catalog = catalog.subset(ids)
    angles = np.array([0.0, 0.1, 0.2, 0.35, 0.5, 0.7]) * np.pi
    vectors = np.stack([np.cos(angles), np.sin(angles), np.zeros(6)], axis=1).astype(np.float32)
    cache = EmbeddingCache.open(tmp_path, tiny_catalog, {"model": "hand", "dim": 3}, precision="fp32", normalized=True)
    cache.append(ids, vectors)
    cache.consolidate(complete=True)
    return tiny_catalog, tmp_path, ids


def test_interaction_relevance_by_hand(tiny):
    cat, workdir, ids = tiny
    log = tmp_log = workdir / "log.csv"
    pd.DataFrame(
        {
            "query_id": [ids[0], ids[0], ids[0], ids[0], "999999999", ids[1], ids[2]],
            "item_id": [ids[2], ids[4], ids[2], ids[0], ids[1], "888888888", ids[1]],
            "weight": ["1", "3", "1", ".5", "1", "1", "2"],
        }
    ).to_csv(log, index=False)
    res = evaluate_models(cat, workdir, ["hand"], interactions=tmp_log, ks=[3], exclude_duplicates=False, gain="linear", **FAST)
    rep = res.report["interactions"]
    assert rep["rows"] == 7
    assert rep["unknown_id_rows"] == 2 and rep["unknown_query_ids"] == 1 and rep["unknown_item_ids"] == 1
    assert set(rep["unknown_id_examples"]) == {"999999999", "888888888"}
    assert rep["self_pair_rows"] == 1
    assert rep["merged_repeated_pairs"] == 1  # (q0, i2) twice: weights summed to 2
    # queries: q0 (relevant: i2 weight 2, i4 weight 3) and q2 (relevant: i1 weight 2)
    assert sorted(res.query_ids) == sorted([ids[0], ids[2]])
    values = pd.DataFrame(res.values[("hand", "unfiltered")], index=res.query_ids)
    # q0 retrieves 1, 2, 3 -> grades 0, 2, 0; ideal 3, 2
    dcg = 2 / np.log2(3)
    idcg = 3 + 2 / np.log2(3)
    assert values.at[ids[0], "ndcg@3"] == pytest.approx(dcg / idcg, abs=1e-12)
    assert values.at[ids[0], "recall@3"] == pytest.approx(0.5)
    assert values.at[ids[0], "mrr@3"] == pytest.approx(0.5)
    # q2 retrieves 1, 3, 0 -> its only relevant item (1) is first
    assert values.at[ids[2], "ndcg@3"] == pytest.approx(1.0)
    # the same log as a DataFrame gives the same numbers
    frame = pd.read_csv(log, dtype=str, keep_default_na=False)
    again = evaluate_models(cat, workdir, ["hand"], interactions=frame, ks=[3], exclude_duplicates=False, gain="linear", **FAST)
    np.testing.assert_array_equal(again.values[("hand", "unfiltered")]["ndcg@3"], res.values[("hand", "unfiltered")]["ndcg@3"])


def test_interactions_bad_input(tiny):
    cat, workdir, ids = tiny
    bad_columns = workdir / "bad.csv"
    pd.DataFrame({"query": [ids[0]], "item": [ids[1]]}).to_csv(bad_columns, index=False)
    with pytest.raises(ValueError, match=r"query_id, item_id.*found: query, item"):
        evaluate_models(cat, workdir, ["hand"], interactions=bad_columns, ks=[3])
    unknown = workdir / "unknown.csv"
    pd.DataFrame({"query_id": ["1", "2"], "item_id": ["3", "4"]}).to_csv(unknown, index=False)
    with pytest.raises(ValueError, match=r"no usable interaction.*2 with ids not in the catalog"):
        evaluate_models(cat, workdir, ["hand"], interactions=unknown, ks=[3])
    weights = workdir / "weights.csv"
    pd.DataFrame({"query_id": [ids[0]], "item_id": [ids[1]], "weight": ["lots"]}).to_csv(weights, index=False)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        evaluate_models(cat, workdir, ["hand"], interactions=weights, ks=[3])


# --------------------------------------------------------------------------------- bad input


def test_unknown_label_column_lists_available(catalog, workdir):
    with pytest.raises(CatalogError, match=r"'colour'.*available: .*articleType"):
        evaluate_models(catalog, workdir, ["fake-cnn"], label="colour")
    with pytest.raises(CatalogError, match="available"):
        evaluate_models(catalog, workdir, ["fake-cnn"], filter_column="nope")


def test_model_without_cache(catalog, workdir):
    with pytest.raises(EmbeddingsNotFoundError, match="vrec extract"):
        evaluate_models(catalog, workdir, ["fake-cnn", "not-extracted"])


def test_k_larger_than_candidate_set(tiny):
    cat, workdir, _ = tiny
    with pytest.raises(ValueError, match=r"k=10 is larger than the candidate set: 6 items.*k <= 5"):
        evaluate_models(cat, workdir, ["hand"], ks=[5, 10], label="masterCategory")


def test_vectors_are_compared_by_cosine(catalog, workdir, result):
    """Embeddings built in memory need not be unit length (cosine is what is evaluated); a zero
    vector is refused."""
    emb = load_embeddings(workdir, catalog, "fake-cnn")
    scale = np.random.default_rng(0).uniform(0.5, 3.0, size=(len(emb), 1)).astype(np.float32)
    scaled = Embeddings(emb.ids, np.asarray(emb.vectors) * scale, emb.manifest)
    res = evaluate_embeddings(catalog, {"fake-cnn": scaled}, **FAST)
    np.testing.assert_allclose(res.values[("fake-cnn", "unfiltered")]["ndcg@10"], result.values[("fake-cnn", "unfiltered")]["ndcg@10"], atol=1e-12)
    broken = np.asarray(emb.vectors).copy()
    broken[3] = 0
    with pytest.raises(ValueError, match="zero vector"):
        evaluate_embeddings(catalog, {"fake-cnn": Embeddings(emb.ids, broken, emb.manifest)}, **FAST)


def test_filtered_lists_shorter_than_k_are_scored(result):
    # most classes have fewer than 10 other members: filtered lists are padded, precision@10 counts pads as misses
    filtered = result.values[("fake-cnn", "filtered:articleType")]
    assert (filtered["precision@10"] <= 1).all() and (filtered["recall@10"] == 1).any()
    assert (filtered["precision@10"] < 1).any()


def test_one_relevance_source(catalog, workdir):
    with pytest.raises(ValueError, match="one relevance source"):
        evaluate_models(catalog, workdir, ["fake-cnn"], label="articleType", hierarchy=["masterCategory"])


# --------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_matches_scipy(method):
    values = np.random.default_rng(5).random((300, 3)) ** 3
    low, high = bootstrap_ci(values, n_resamples=999, method=method, seed=3)
    ref = scipy.stats.bootstrap(
        (values.T,), np.mean, n_resamples=999, method=method, rng=np.random.default_rng(3), axis=-1, vectorized=True
    )
    np.testing.assert_allclose(low, ref.confidence_interval.low, rtol=0, atol=1e-9)
    np.testing.assert_allclose(high, ref.confidence_interval.high, rtol=0, atol=1e-9)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_of_no_rows_is_nan_and_draws_nothing(method):
    rng = np.random.default_rng(3)
    low, high = bootstrap_ci(np.empty(0), n_resamples=99, method=method, seed=rng)
    assert np.isnan(low) and np.isnan(high)
    lows, highs = bootstrap_ci(np.empty((0, 3)), n_resamples=99, method=method, seed=rng)
    assert lows.shape == highs.shape == (3,) and np.isnan(lows).all() and np.isnan(highs).all()
    assert rng.random() == np.random.default_rng(3).random()  # the shared generator was not advanced


def test_permutation_pvalue_exact_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.random(10), rng.random(10) + 0.2
    ours = paired_permutation_pvalue(b - a, n_permutations=5000)  # 2**10 patterns: exact
    ref = scipy.stats.permutation_test(
        (b, a), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples", n_resamples=np.inf, vectorized=True
    )
    assert ours == pytest.approx(ref.pvalue, abs=1e-12)


def test_permutation_pvalue_random_is_seeded():
    d = np.random.default_rng(1).normal(0.05, 1, size=(400, 2))
    p1 = paired_permutation_pvalue(d, n_permutations=999, seed=7)
    assert np.array_equal(p1, paired_permutation_pvalue(d, n_permutations=999, seed=7))
    assert ((p1 > 0) & (p1 <= 1)).all()
    assert paired_permutation_pvalue(np.zeros(400), n_permutations=99) == 1.0


def test_summary_and_comparisons(result):
    summary = result.summary()
    assert list(summary.columns) == ["model", "setting", "metric", "mean", "ci_low", "ci_high", "n_queries"]
    assert len(summary) == 2 * 2 * 10
    assert ((summary["ci_low"] <= summary["mean"]) & (summary["mean"] <= summary["ci_high"])).all()
    per_query = result.per_query
    assert list(per_query.columns) == ["query_id", "model", "setting", "metric", "value"]
    means = per_query.groupby(["model", "setting", "metric"], sort=False)["value"].mean()
    np.testing.assert_allclose(summary.set_index(["model", "setting", "metric"])["mean"], means)

    table = result.table()
    assert list(table.columns[:7]) == ["model", "setting", "dims", "n_queries", "ndcg@5", "ndcg@5_low", "ndcg@5_high"]
    assert len(table) == 4 and table["ndcg@5"].tolist() == summary.query("metric == 'ndcg@5'")["mean"].tolist()

    comparisons = result.comparisons(["ndcg@5"])
    pairs = set(zip(comparisons["model_a"], comparisons["setting_a"], comparisons["model_b"], comparisons["setting_b"]))
    assert pairs == {
        ("fake-cnn", "unfiltered", "fake-vlm", "unfiltered"),
        ("fake-cnn", "filtered:articleType", "fake-vlm", "filtered:articleType"),
        ("fake-cnn", "filtered:articleType", "fake-vlm", "unfiltered"),
        ("fake-cnn", "unfiltered", "fake-cnn", "filtered:articleType"),
        ("fake-vlm", "unfiltered", "fake-vlm", "filtered:articleType"),
    }
    row = result.compare("fake-cnn", "fake-vlm", ["ndcg@5"]).iloc[0]
    a = result.values[("fake-cnn", "unfiltered")]["ndcg@5"]
    b = result.values[("fake-vlm", "unfiltered")]["ndcg@5"]
    assert row["diff"] == pytest.approx(b.mean() - a.mean())
    assert row["rel_improvement_pct"] == pytest.approx(100 * (b.mean() / a.mean() - 1))
    assert row["diff_ci_low"] <= row["diff"] <= row["diff_ci_high"]
    assert row["rel_ci_low"] <= row["rel_improvement_pct"] <= row["rel_ci_high"]
    assert 0 < row["p_value"] <= 1
    # compare() alone gives the numbers comparisons() gives
    same = comparisons[(comparisons["setting_a"] == "unfiltered")].iloc[0]
    assert same["p_value"] == row["p_value"] and same["diff_ci_low"] == row["diff_ci_low"]


def test_per_category(result):
    table = result.per_category(metric="ndcg@5")
    assert list(table.columns) == ["articleType", "n_queries", "fake-cnn", "fake-vlm", "fake-vlm - fake-cnn"]
    assert table["n_queries"].sum() == result.n_queries
    overall = (table["fake-vlm"] * table["n_queries"]).sum() / result.n_queries
    assert overall == pytest.approx(result.values[("fake-vlm", "unfiltered")]["ndcg@5"].mean())
    assert table["fake-vlm - fake-cnn"].is_monotonic_decreasing
    by_gender = result.per_category("gender", metric="map@10", setting="filtered:articleType")
    assert set(by_gender["gender"]) <= set(result.query_items["gender"])
    with pytest.raises(ValueError, match="available"):
        result.per_category("nope")


def test_json_output(result, tmp_path):
    payload = result.to_json(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == payload
    first = payload["results"][0]
    assert first["model"] == "fake-cnn" and first["setting"] == "unfiltered"
    assert 0 <= first["ndcg@5"] <= 1 and len(first["ci95"]["ndcg@5"]) == 2
    assert first["n_queries"] == result.n_queries
    assert payload["config"]["gain"] == "exp2" and "2**rel - 1" in payload["config"]["gain_formula"]
    assert any("is the relevance label" in note for note in payload["config"]["notes"])  # filter = label: warned
    assert {"diff", "p_value", "rel_improvement_pct"} <= set(payload["comparisons"][0])


# --------------------------------------------------------------------------------- variants


def test_pca_and_fusion_rows(catalog, workdir):
    split = Split(train=tuple(catalog.ids[:150]), eval=tuple(catalog.ids[150:]), seed=0, eval_fraction=0.5)
    res = evaluate_models(
        catalog, workdir, ["fake-cnn", "fake-vlm"], split=split, pca_dims=[4, 8, 20], fusions=[("fake-cnn", "fake-vlm")],
        backend="matrix", **FAST,
    )
    assert set(res.query_ids) <= set(split.eval)
    assert ("fake-cnn", "pca4") in res.values and ("fake-cnn", "pca8") in res.values
    assert ("fake-cnn", "pca20") not in res.values  # the model has only 16 dimensions
    assert ("fake-vlm", "pca20") in res.values
    assert ("fake-cnn+fake-vlm", "unfiltered") in res.values and res.dims[("fake-cnn+fake-vlm", "unfiltered")] == 40
    assert any("skipped for fake-cnn" in note for note in res.config["notes"])
    assert any("train items" in note for note in res.config["notes"])
    curve = res.dims_curve("ndcg@5")
    assert curve[curve["model"] == "fake-vlm"]["dims"].tolist() == [4, 8, 20, 24]
    assert list(curve.columns) == ["model", "dims", "setting", "ndcg@5", "ci_low", "ci_high", "n_queries"]


# --------------------------------------------------------------------------------- CLI


def test_cli_summary_table_rows_line_up(catalog, workdir):
    from vrec_utils.cli.evaluate_cmd import summary_table

    res = evaluate_models(catalog, workdir, ["fake-cnn", "fake-vlm"], filter_column="articleType", pca_dims=[4], **FAST)
    table = summary_table(res)
    assert list(zip(table["model"], table["setting"])) == [
        ("fake-cnn", "unfiltered"), ("fake-cnn", "filtered:articleType"), ("fake-cnn", "pca4"),
        ("fake-vlm", "unfiltered"), ("fake-vlm", "filtered:articleType"), ("fake-vlm", "pca4"),
    ]  # fmt: skip
    summary = res.summary().set_index(["model", "setting", "metric"])
    for _, row in table.iterrows():
        low, high = summary.loc[(row["model"], row["setting"], "ndcg@5"), ["ci_low", "ci_high"]]
        assert row["ndcg@5 CI"] == f"[{low:.4f}, {high:.4f}]"
        assert row["ndcg@5"] == summary.loc[(row["model"], row["setting"], "ndcg@5"), "mean"]


def test_cli_prints_table_and_writes_json(catalog, workdir, tmp_path, capsys, monkeypatch):
    from vrec_utils.cli import main

    # the CLI loads the catalog from a path: a folder with the 308 items' rows and images
    root = tmp_path / "cat"
    (root / "images").mkdir(parents=True)
    rows = pd.read_csv(catalog.root / "styles.csv", dtype=str, keep_default_na=False)
    rows[rows["id"].isin(catalog.ids)].to_csv(root / "styles.csv", index=False)
    shutil.copy(catalog.root / "image_meta.csv", root / "image_meta.csv")
    for i in catalog.ids:
        shutil.copy(catalog.image_path(i), root / "images" / f"{i}.jpg")
    cli_catalog = load_catalog(root)
    write_fake_model(tmp_path / "w", cli_catalog, "fake-cnn", 16, noise=0.9, seed=1)
    write_fake_model(tmp_path / "w", cli_catalog, "fake-vlm", 24, noise=0.6, seed=2)
    out = tmp_path / "res.json"
    code = main([
        "evaluate", "--catalog", str(root), "--workdir", str(tmp_path / "w"), "--models", "fake-cnn,fake-vlm",
        "-k", "5,10", "--filter-column", "articleType", "--json", str(out),
        "--n-bootstrap", "200", "--n-permutations", "500", "--per-category",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "ndcg@5 CI" in printed and "paired comparisons" in printed and "exp2" in printed
    assert "filtered:articleType" in printed and "per category" in printed
    payload = json.loads(out.read_text())
    for r in payload["results"]:
        assert f"[{r['ci95']['ndcg@5'][0]:.4f}, {r['ci95']['ndcg@5'][1]:.4f}]" in printed
    assert {r["setting"] for r in payload["results"]} == {"unfiltered", "filtered:articleType"}
    assert all(len(r["ci95"]["ndcg@5"]) == 2 and r["n_queries"] > 0 for r in payload["results"])

    code = main(["evaluate", "--catalog", str(root), "--workdir", str(tmp_path / "w"), "--models", "fake-cnn", "--label", "colour"])
    err = capsys.readouterr().err
    assert code == 2 and "available:" in err and "articleType" in err
    code = main(["evaluate", "--catalog", str(root), "--workdir", str(tmp_path / "w"), "--models", "fake-cnn,missing-model"])
    err = capsys.readouterr().err
    assert code == 2 and "vrec extract" in err


def test_duplicated_items_give_the_same_lists_through_the_matrix_and_the_index(catalog, workdir):
    """Exact ties (the same photo under several ids): the similarity-matrix path and the FAISS
    index, exact fp32 or bf16-rescored, list the same items in the same order (lower row first)."""
    from vrec_utils.index import create_index

    base = load_embeddings(workdir, catalog, "fake-cnn").vectors_for(catalog.ids)
    rng = np.random.default_rng(5)
    vectors = np.ascontiguousarray(np.concatenate([base, base[:60], base[:60], base[:10].repeat(6, axis=0)])[rng.permutation(len(base) + 180)])
    ids = np.asarray([f"i{n}" for n in range(len(vectors))])
    queries = np.arange(len(vectors))
    found = leave_one_out_knn(vectors, queries, 10)
    sims = (vectors.astype(np.float64) @ vectors.T.astype(np.float64)).astype(np.float32)
    sims[queries, queries] = -np.inf
    np.testing.assert_array_equal(found, np.argsort(-sims, axis=1, kind="stable")[:, :10])
    assert (np.sort(sims, axis=1)[:, -10:][:, 1:] == np.sort(sims, axis=1)[:, -10:][:, :-1]).any(axis=1).sum() > 50
    for method in ("fp32", "bf16-rescored"):
        index = create_index("faiss", model="m", dim=vectors.shape[1], exact_method=method)
        index.add(ids, vectors)
        result = index.search(vectors, 10, exclude_ids=list(ids))
        np.testing.assert_array_equal(result.ids, ids[found], err_msg=method)
