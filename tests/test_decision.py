"""vrec_utils.decision: the CNN-vs-VLM decision report, checked against reference implementations
(faiss indexes, sklearn PCA, statsmodels, closed forms) on small real embeddings and hand-made
catalogs. Real vectors: efficientnet-lite0 on 300 fashion-small items (the ``real`` fixture)."""

from __future__ import annotations

import dataclasses
import shutil

import faiss
import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.decomposition import PCA
from statsmodels.stats.multitest import multipletests

from vrec_utils.decision.categories import adjust_pvalues, category_table
from vrec_utils.decision.compression import (
    model_variants,
    pareto_front,
    pq_params,
    search_variant,
    sign_codes,
)
from vrec_utils.decision.data import decision_data, loo_search
from vrec_utils.decision.filtering import filter_rows, violation_share
from vrec_utils.decision.power import ABPlan, ab_plan_table, sample_size
from vrec_utils.decision.protocols import (
    image_to_image_recall1,
    label_to_product,
    own_item_ranks,
    text_to_image,
)
from vrec_utils.decision.run import DecisionParams, run_decision
from vrec_utils.index import create_index
from vrec_utils.index.exact import neighbour_recall as recall_at_k
from vrec_utils.store import Embeddings, EmbeddingsNotFoundError

FAST = DecisionParams(pca_dims=(16, 128), hnsw_ef=(8, 64), ivf_nprobe=(), n_bootstrap=200, n_permutations=500, latency_queries=32,
                      min_category_queries=3)


def fake(catalog, name: str, dim: int, noise: float, seed: int, weights: str = "fake-test-vectors") -> Embeddings:
    """articleType centroid + noise, as a cached model would give (unit rows)."""
    rng = np.random.default_rng(seed)
    codes = pd.factorize(catalog.items["articleType"])[0]
    v = rng.normal(size=(codes.max() + 1, dim))[codes] + noise * rng.normal(size=(len(codes), dim))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return Embeddings(np.asarray(catalog.ids), v.astype(np.float32), {"model": name, "identity": {"weights": weights}})


@pytest.fixture(scope="module")
def real_data(real):
    """The real vectors cut to their first 128 dimensions (re-normalised): PQ and the searches
    stay fast, and the values keep the real distribution (non-negative, post-ReLU CNN features)."""
    catalog, _, embeddings = real
    cut = Embeddings(embeddings.ids, np.ascontiguousarray(embeddings.vectors[:, :128]), embeddings.manifest)
    return decision_data(catalog, {"efficientnet-lite0": cut}, n_bootstrap=100, n_permutations=200)


@pytest.fixture(scope="module")
def pair(small_catalog):
    return {"cnn": fake(small_catalog, "cnn", 160, 2.5, 0), "vlm": fake(small_catalog, "vlm", 48, 1.2, 1)}


# ------------------------------------------------------------------- part 1: quantisers and PCA


def _variant(data, name):
    pca = name.startswith("pca")
    variants = model_variants(data, data.models[0], pca_dims=(int(name[3:]),) if pca else (), quantisers=() if pca else (name,))
    return next(v for v in variants if v.name == name)


def _faiss_lists(index, data, k):
    """Leave-one-out lists of a faiss index (k + 1, the query dropped), as positions."""
    q = data.query_pos
    _, found = index.search(np.ascontiguousarray(data.vectors[data.models[0]][q]), k + 1)
    return np.array([[f for f in row if f != own][:k] for row, own in zip(found, q)])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_scalar_quantiser_lists_equal_faiss_index(real_data, kind):
    data = real_data
    x = data.vectors[data.models[0]]
    index = faiss.IndexScalarQuantizer(x.shape[1], {"int8": faiss.ScalarQuantizer.QT_8bit, "int4": faiss.ScalarQuantizer.QT_4bit}[kind],
                                       faiss.METRIC_INNER_PRODUCT)
    index.train(data.train[data.models[0]])
    index.add(x)
    variant = _variant(data, kind)
    assert variant.bytes_per_item == index.sa_code_size() == (x.shape[1] if kind == "int8" else x.shape[1] // 2)
    ours, ref = search_variant(data, variant, k=5), _faiss_lists(index, data, 5)
    assert (ours == ref).mean() > 0.99  # equal up to float ties
    assert (ours[:, 0] == ref[:, 0]).all()


def test_product_quantiser_lists_equal_faiss_index_pq(real_data):
    data = real_data
    x = data.vectors[data.models[0]]
    m, nbits = pq_params(x.shape[1], len(x))
    assert x.shape[1] % m == 0 and 2**nbits * 39 <= len(x)
    variant = _variant(data, "pq")
    index = faiss.clone_index(variant.trained)
    index.add(x)
    assert (search_variant(data, variant, k=5) == _faiss_lists(index, data, 5)).mean() > 0.99


def test_binary_codes_give_index_binary_flat_hamming_distances(real_data):
    data = real_data
    x, train = data.vectors[data.models[0]], data.train[data.models[0]]
    codes = sign_codes(train, x)
    packed = np.packbits(codes > 0, axis=1)
    index = faiss.IndexBinaryFlat(x.shape[1])
    index.add(packed)
    distances, _ = index.search(packed[data.query_pos], 6)
    ours = search_variant(data, _variant(data, "binary"), k=5)
    d = x.shape[1]
    hamming = (d - np.einsum("qkd,qd->qk", codes[ours], codes[data.query_pos])) / 2
    assert np.array_equal(hamming, distances[:, 1:6])  # the query itself is at distance 0, first
    # sign codes of a centred CNN are not all ones (post-ReLU features are non-negative)
    assert 0.2 < (codes > 0).mean() < 0.8


def test_binary_rerank_rescores_the_hamming_candidates_in_float(real_data):
    data = real_data
    v = _variant(data, "binary+rerank")
    found = search_variant(data, v, k=5)
    candidates = loo_search(v.queries, v.database, data.query_pos, v.oversample * 5)
    x = data.vectors[data.models[0]]
    for row, cand, q in zip(found[:20], candidates[:20], data.query_pos[:20]):
        assert set(row) <= set(cand)
        expected = cand[np.argsort(-(x[cand] @ x[q]).astype(np.float64), kind="stable")][:5]
        assert np.array_equal(row, expected)


def test_pca_variant_equals_sklearn_projection(real_data):
    data = real_data
    x, train = data.vectors[data.models[0]], data.train[data.models[0]]
    variant = _variant(data, "pca32")
    ref = PCA(n_components=32, svd_solver="full").fit(train).transform(x)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    # components are defined up to sign: compare the inner products, which do not depend on it
    np.testing.assert_allclose(variant.database @ variant.database.T, ref @ ref.T, atol=2e-4)
    assert variant.bytes_per_item == 4 * 32


# ------------------------------------------------------------------- part 2: recall through an index


def test_recall_at_k_equals_a_direct_computation(real_data):
    data = real_data
    model = data.models[0]
    x = data.vectors[model]
    index = create_index("faiss", model=model, dim=x.shape[1], ann="hnsw", ef_search=4)
    index.add(data.ids, x)
    result = index.search(x[data.query_pos], 10, exclude_ids=list(data.ids[data.query_pos]), ef_search=4)
    found = pd.Index(data.ids).get_indexer(np.asarray(result.ids).ravel()).reshape(-1, 10)
    exact = data.search(x, x, 10)
    direct = [len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), exact.tolist())]
    np.testing.assert_allclose(recall_at_k(found, exact), direct)
    assert min(direct) < 1.0  # ef_search=4 is approximate: the test can tell
    assert recall_at_k(np.array([[3, -1]]), np.array([[3, 5]]))[0] == 0.5


# ------------------------------------------------------------------- part 3: the filter


def test_violation_share_on_a_hand_made_catalog():
    groups = np.array([0, 0, 0, 1, 1, 2])
    retrieved = np.array([[1, 3, 5], [0, 2, -1], [4, 3, 5]])
    query_pos = np.array([0, 1, 3])
    # query 0 (group 0): 1 in, 3 and 5 out -> 2/3; query 1: both in -> 0; query 3 (group 1): 4 and 3 in, 5 out -> 1/3
    np.testing.assert_allclose(violation_share(retrieved, groups, query_pos), [2 / 3, 0.0, 1 / 3])


def test_filtered_search_stays_in_the_category_and_never_returns_the_query(small_catalog, pair):
    data = decision_data(small_catalog, pair, n_bootstrap=100, n_permutations=100)
    _, _, violations = filter_rows(data)
    x = data.vectors["cnn"]
    found = data.search(x, x, filtered=True)
    ok = found >= 0
    assert (data.groups[np.maximum(found, 0)] == data.groups[data.query_pos][:, None])[ok].all()
    assert not (found == data.query_pos[:, None]).any()
    assert violations["cnn"].mean() > violations["vlm"].mean()  # the noisier model strays more


# ------------------------------------------------------------------- part 4: multiple comparisons


def test_holm_and_bh_match_hand_computations_and_statsmodels():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.2])
    m, order = len(p), np.argsort(p)
    holm = np.empty(m)
    holm[order] = np.minimum(1, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    bh = np.empty(m)
    bh[order] = np.minimum(1, np.minimum.accumulate(m / np.arange(m, 0, -1) * p[order][::-1])[::-1])
    np.testing.assert_allclose(adjust_pvalues(p, "holm")[1], holm)
    np.testing.assert_allclose(adjust_pvalues(p, "fdr_bh")[1], bh)
    assert list(adjust_pvalues(p, "holm")[0]) == list(multipletests(p, method="holm")[0])
    with pytest.raises(ValueError, match="correction must be one of"):
        adjust_pvalues(p, "bonf")


def test_category_table_adjusts_its_own_pvalues(small_catalog, pair):
    data = decision_data(small_catalog, pair, n_bootstrap=100, n_permutations=200)
    values, dims, _ = filter_rows(data)
    table = category_table(data, data.result(values, dims), min_queries=3, correction="fdr_bh")
    np.testing.assert_allclose(table["p_adjusted"], multipletests(table["p_value"], method="fdr_bh")[1])
    wins = table[table["winner"] == "vlm"]
    assert len(wins) and (wins["diff"] > 0).all() and (wins["p_adjusted"] < 0.05).all()
    assert set(table["example_query"]) <= set(data.ids[data.query_pos])


# ------------------------------------------------------------------- part 5: power


def test_sample_size_matches_the_closed_form_and_cohens_table():
    plan = ABPlan(baseline_rate=0.5, mde_relative=0.2, alpha=0.05, power=0.8)  # 0.5 -> 0.6
    h, n = sample_size(plan)
    assert h == pytest.approx(2 * np.arcsin(np.sqrt(0.6)) - 2 * np.arcsin(np.sqrt(0.5)))
    closed = 2 * ((norm.ppf(0.975) + norm.ppf(0.8)) / h) ** 2  # var(2 asin sqrt p) = 1/n per arm; far tail ignored
    assert n == pytest.approx(closed, rel=1e-3)
    _, n_h02 = sample_size(ABPlan(baseline_rate=0.5, mde_relative=np.sin(np.arcsin(np.sqrt(0.5)) + 0.1) ** 2 / 0.5 - 1))
    assert np.ceil(n_h02) == 393  # Cohen (1988), h = 0.2, alpha 0.05 two-sided, power 0.8: n = 392.4 per group


def test_ab_plan_prints_every_assumption_and_checks_them():
    plan = ABPlan(baseline_rate=0.05, daily_traffic=20_000, mde_relative=0.05, traffic_share=0.5)
    table = ab_plan_table(plan).set_index("quantity")
    for name in ("baseline_rate", "daily_traffic", "mde_relative", "alpha", "power", "traffic_share", "alternative"):
        assert table.loc[name, "note"] == "assumption (parameter)"
    n = table.loc["users per arm", "value"]
    assert table.loc["days", "value"] == np.ceil(2 * n / 10_000)
    with pytest.raises(ValueError, match="baseline_rate"):
        ABPlan(baseline_rate=1.5)


# ------------------------------------------------------------------- part 6: protocols


def test_protocol_metrics_on_a_toy_catalog_with_a_known_answer():
    images = np.eye(4, dtype=np.float32)
    titles = np.array([[1, 0, 0, 0], [0, 0.6, 0.8, 0], [0, 0, 1, 0], [0.9, 0, 0, 0.1]], dtype=np.float32)
    # title 0 -> image 0 (rank 1); title 1 -> image 2 scores 0.8 > image 1's 0.6 (rank 2); title 2 rank 1;
    # title 3 -> image 0 first (0.9), own image second (0.1)
    assert own_item_ranks(titles, images, np.arange(4)).tolist() == [1, 2, 1, 2]
    m = text_to_image(titles, images, np.array([True, True, True, True]))
    assert (m["recall@1"], m["recall@10"], m["mrr"]) == (0.5, 1.0, pytest.approx((1 + 0.5 + 1 + 0.5) / 4))
    assert text_to_image(titles, images, np.array([True, False, True, False]))["recall@1"] == 1.0
    labels = np.array(["a", "a", "b", "b"], dtype=object)
    names = {"a": np.array([1, 0.5, 0, 0], np.float32), "b": np.array([0.9, 0, 0.1, 0.2], np.float32)}
    # "a" ranks 0, 1 (both a) first; "b" ranks image 0 (a) first, then 3, 2 (b)
    res = label_to_product(names, images, labels, ks=(1, 3))
    assert res["p@1"] == 0.5 and res["p@3"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_image_to_image_never_scores_the_query_itself(small_catalog):
    emb = fake(small_catalog, "dup", 16, 0.0, 3)  # noise 0: every item of a class has the same vector
    data = decision_data(small_catalog, {"dup": emb}, n_bootstrap=50, n_permutations=50)
    metrics, top1 = image_to_image_recall1(data, "dup")
    assert not (top1 == data.query_pos).any()
    assert metrics["recall@1"] == 1.0  # a same-class twin, never the query, is at rank 1
    for variant in model_variants(data, "dup", pca_dims=(8,)):
        assert not (search_variant(data, variant) == data.query_pos[:, None]).any(), variant.name


# ------------------------------------------------------------------- the whole report, bad input


def test_run_decision_writes_every_table_and_a_reproducible_verdict(small_catalog, pair, tmp_path):
    report = run_decision(small_catalog, pair, params=FAST, tables_dir=tmp_path / "a")
    assert {"frontier", "quality", "fidelity", "fidelity_pairs", "filter", "filter_contrast", "ab_plan", "protocols"} <= set(report.tables)
    assert len(report.verdict) >= 5 and all("[decision_" in line for line in report.verdict)
    frontier = report.tables["frontier"]
    assert frontier["mercari_baseline"].sum() == 1 and frontier.loc[frontier["mercari_baseline"], "model"].item() == "cnn"
    assert frontier["pareto"].any()
    again = run_decision(small_catalog, pair, params=FAST, tables_dir=tmp_path / "b")
    for name in ("quality", "filter", "fidelity_pairs", "ab_plan"):
        pd.testing.assert_frame_equal(report.tables[name], again.tables[name])
    strip = lambda text: [line.split("search takes")[0] for line in text]  # latencies are measurements, not reproducible
    assert strip(report.verdict) == strip(again.verdict)
    quality = pd.read_csv(tmp_path / "a" / "decision_quality.csv")
    assert f"{quality['diff'].item():+.3f}" in report.verdict[0]


def test_a_model_without_cache_names_the_command(small_catalog, tmp_path):
    with pytest.raises(EmbeddingsNotFoundError, match="vrec extract .*--model nope"):
        run_decision(small_catalog, workdir=tmp_path, models=["nope"], params=FAST)


def test_a_catalog_without_category_column_skips_parts_3_and_4(small_catalog, pair):
    items = small_catalog.items.drop(columns=["subCategory"])
    catalog = dataclasses.replace(small_catalog, items=items, label_columns=[c for c in small_catalog.label_columns if c != "subCategory"])
    minimal = dataclasses.replace(FAST, pca_dims=(), quantisers=(), hnsw_ef=(), ivf_nprobe=())
    report = run_decision(catalog, pair, params=minimal)
    assert "filter" not in report.tables and "categories" not in report.tables
    notes = [n for n in report.notes if "subCategory" in n or "parts 3-4" in n]
    assert notes and all("\n" not in n for n in notes)
    assert "frontier" in report.tables and "fidelity" in report.tables


def test_random_weights_are_named_as_such(small_catalog):
    emb = fake(small_catalog, "tiny-siglip", 16, 1.0, 0, weights="random-init:tiny-siglip")
    data = decision_data(small_catalog, {"tiny-siglip": emb}, n_bootstrap=50, n_permutations=50)
    assert data.labels["tiny-siglip"] == "tiny-siglip (random weights: test only)"


# ------------------------------------------------------------------- vrec decide


def test_vrec_decide_writes_tables_figure_and_verdict(small_catalog, tmp_path, capsys):
    from vrec_utils.catalog import load_catalog
    from vrec_utils.cli import main
    from vrec_utils.store import EmbeddingCache

    items = small_catalog.items.reset_index()
    (tmp_path / "images").mkdir()
    for item_id, image in zip(items["id"], items["image"]):
        shutil.copyfile(image, tmp_path / "images" / f"{item_id}.jpg")  # a symlink would leave the catalog folder
    items["image"] = "images/" + items["id"] + ".jpg"
    csv = tmp_path / "catalog.csv"
    items[["id", "image", "title", "subCategory", "articleType"]].to_csv(csv, index=False)
    catalog = load_catalog(csv)
    workdir = tmp_path / "work"
    for name, dim, noise, seed in (("cnn-a", 160, 2.5, 0), ("vlm-b", 48, 1.2, 1)):
        emb = fake(catalog, name, dim, noise, seed)
        cache = EmbeddingCache.open(workdir, catalog, {"model": name, "dim": dim}, precision="fp32", normalized=True)
        cache.append(catalog.ids, emb.vectors)
        cache.consolidate(complete=True)
    out = tmp_path / "out"
    code = main(["decide", "--catalog", str(csv), "--workdir", str(workdir), "--models", "cnn-a,vlm-b", "--out", str(out),
                 "--time-embedding", "0", "--hnsw-ef", "16", "--nprobe", "", "--n-bootstrap", "200", "--daily-traffic", "5000"])
    printed = capsys.readouterr().out
    assert code == 0
    assert (out / "figures" / "decision_frontier.png").is_file()
    plan = pd.read_csv(out / "tables" / "decision_ab_plan.csv").set_index("quantity")
    assert float(plan.loc["daily_traffic", "value"]) == 5000
    assert f"{int(float(plan.loc['days', 'value']))} days at 5,000 users/day" in printed
    assert "say vlm-b is better than cnn-a" in printed and "no interaction log was given" in printed
    assert main(["decide", "--catalog", str(csv), "--workdir", str(workdir), "--models", "cnn-a,nope", "--out", str(out)]) == 2
    assert "vrec extract" in capsys.readouterr().err
    missing = tmp_path / "no-such-log.csv"
    assert main(["decide", "--catalog", str(csv), "--workdir", str(workdir), "--models", "cnn-a,vlm-b", "--out", str(out),
                 "--time-embedding", "0", "--interactions", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no-such-log.csv" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_notebook_08_runs_in_the_report_with_the_smoke_profile(tmp_path):
    """The decision section of `vrec report`: notebook 08 runs headless, writes the frontier
    figure, the tables and the verdict, and names the random smoke models as such."""
    import nbformat

    from vrec_utils.report import run_report

    result = run_report("smoke", out=tmp_path / "out", workdir=tmp_path / "work", sample_size=120, notebooks=["08"], progress=False,
                        log=lambda line: None)
    nb = nbformat.read(result.executed[0], as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{errors[0]['ename']}: {errors[0]['evalue']}" if errors else ""
    assert (result.figures_dir / "08_frontier.png").is_file()
    verdict = (result.tables_dir / "decision_verdict.md").read_text()
    assert "tiny-siglip (random weights: test only)" in verdict and "[decision_frontier.csv]" in verdict
    for name in ("frontier", "fidelity", "filter", "ab_plan", "protocols"):
        assert (result.tables_dir / f"decision_{name}.csv").is_file()


def test_frontier_figure_marks_the_front_and_the_mercari_point():
    from vrec_utils.plots import quality_cost_frontier

    frame = pd.DataFrame({
        "model": ["cnn", "cnn", "vlm", "vlm"], "variant": ["float32", "pca128", "float32", "int8"],
        "family": ["float", "pca", "float", "scalar"], "bytes_per_item": [5120.0, 512.0, 2048.0, 512.0],
        "ndcg@5": [0.6, 0.62, 0.8, 0.79], "ndcg@5_low": [0.58, 0.6, 0.78, 0.77], "ndcg@5_high": [0.62, 0.64, 0.82, 0.81],
    })
    frame["pareto"] = pareto_front(frame)
    frame["mercari_baseline"] = [False, True, False, False]
    assert frame["pareto"].tolist() == [False, False, True, True]
    fig = quality_cost_frontier(frame)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("Mercari baseline" in t for t in texts) and "int8" in texts
    with pytest.raises(ValueError, match="needs column"):
        quality_cost_frontier(frame.drop(columns=["pareto"]))


# ------------------------------------------------------------------- interactions in the verdict


def _top(vectors: np.ndarray, q: int, n: int) -> np.ndarray:
    sims = vectors @ vectors[q]
    sims[q] = -np.inf  # the query is never its own result
    return np.argsort(-sims, kind="stable")[:n]


def test_interactions_verdict_on_a_hand_made_log(small_catalog, pair, tmp_path):
    """Users clicked exactly the CNN's three nearest items for 20 queries: against that log the CNN
    scores nDCG@5 = 1 on every query, the VLM what a direct computation gives, and the verdict says
    what labels and interactions each say."""
    data = decision_data(small_catalog, pair, n_bootstrap=50, n_permutations=50)
    cnn, vlm = data.vectors["cnn"], data.vectors["vlm"]
    queries = np.arange(0, len(data.ids), 10)[:20]
    rows = [(data.ids[q], data.ids[j]) for q in queries for j in _top(cnn, q, 3)]
    log = tmp_path / "clicks.csv"
    pd.DataFrame(rows + [("no-such-item", data.ids[0])], columns=["query_id", "item_id"]).to_csv(log, index=False)
    discount = 1 / np.log2(np.arange(2, 7))
    expected = [sum(discount[r] for r, j in enumerate(_top(vlm, q, 5)) if j in set(_top(cnn, q, 3))) / discount[:3].sum() for q in queries]

    report = run_decision(small_catalog, pair, params=dataclasses.replace(FAST, elasticsearch="off"), interactions=log)
    quality = report.tables["quality"]
    assert quality["relevance"].str.startswith(("labels", "interactions")).tolist() == [True, True]
    logged = quality.iloc[1]
    assert logged["n_queries"] == 20 and logged["mean_a"] == pytest.approx(1.0)
    assert logged["mean_b"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert logged["diff"] == pytest.approx(np.mean(expected) - 1.0, abs=1e-12) and logged["diff_ci_high"] < 0
    labels_say = "better than" if quality.iloc[0]["diff_ci_low"] > 0 else "worse than" if quality.iloc[0]["diff_ci_high"] < 0 else "not distinguishable from"
    first = report.verdict[0]
    assert f"labels (same articleType, {data.n_queries} queries) say vlm is {labels_say} cnn" in first
    assert "interactions (20 logged queries, graded by weight) say it is worse than it" in first
    assert ("the two agree" in first) == (labels_say == "worse than")
    assert any("60 of 61 rows used" in n and "1 with ids not in the catalog" in n for n in report.notes)


def test_without_interactions_the_verdict_says_so_in_one_line(small_catalog, pair):
    report = run_decision(small_catalog, pair, params=dataclasses.replace(FAST, pca_dims=(), quantisers=(), hnsw_ef=(), elasticsearch="off"))
    assert len(report.tables["quality"]) == 1
    assert "no interaction log was given" in report.verdict[0] and "\n" not in report.verdict[0]
