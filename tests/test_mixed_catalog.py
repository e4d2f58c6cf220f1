"""The mixed-catalogue check: the label mapping, the cross-domain measures against direct
computations (sklearn's nDCG), and a gated run measured on one index of studio and photo items."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import ndcg_score

from vrec_utils.catalog import load_catalog
from vrec_utils.models import create_embedder
from vrec_utils.store import load_embeddings
from vrec_utils.studies.mixed_catalog import (
    COMPARISONS,
    SETS,
    VARIANTS,
    MixedCheck,
    choose_with_mixed_check,
    cross_domain_ndcg,
    cross_domain_share,
    mixed_catalog_check,
    mixed_ids,
    shared_kinds,
)
from vrec_utils.train import FinetuneConfig, finetune, shift_halves

FAST = FinetuneConfig(epochs=2, batch_size=32, lr=3e-3, warmup_steps=2, val_fraction=0.2, eval_fraction=0.25, in_domain_gate=0.99)
#: sample articleType -> a clothing-dev label, for photo stand-ins made of sample images
TO_PHOTO_LABEL = {"Tshirts": "Polo", "Shirts": "Shirt", "Tops": "Blouse", "Casual Shoes": "Shoes", "Sports Shoes": "Shoes", "Heels": "Shoes"}


def test_shared_kinds_map_both_taxonomies_and_keep_unmapped_kinds_apart():
    studio = pd.DataFrame({
        "articleType": ["Tshirts", "Heels", "Jeans", "Watches", "Tops"],
        "masterCategory": ["Apparel", "Footwear", "Apparel", "Accessories", "Apparel"],
    })  # fmt: skip
    photo = pd.DataFrame({"label": ["Longsleeve", "Polo", "Shoes", "Pants", "Body", "Blouse"]})
    assert shared_kinds(studio, "studio").tolist() == ["T-shirt", "Shoes", "Pants", "studio:Watches", "Top"]
    assert shared_kinds(photo, "photo").tolist() == ["T-shirt", "T-shirt", "Shoes", "Pants", "photo:Body", "Top"]
    with pytest.raises(ValueError, match="side"):
        shared_kinds(photo, "home")


def test_cross_domain_ndcg_matches_sklearn_per_query():
    rng = np.random.default_rng(0)
    queries, candidates = rng.normal(size=(12, 6)), rng.normal(size=(40, 6))
    q_kinds = np.array(list("abcz") * 3)  # "z": no relevant candidate
    c_kinds = rng.choice(list("abcd"), size=40)
    got = cross_domain_ndcg(queries, q_kinds, candidates, c_kinds, k=5)
    sims = queries @ candidates.T
    for i in range(len(queries)):
        relevant = (c_kinds == q_kinds[i]).astype(float)
        if relevant.sum() == 0:
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(ndcg_score(relevant[None], sims[i][None], k=5), abs=1e-6)


def test_cross_domain_share_counts_top_neighbours_from_the_other_domain():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(15, 4))
    domains = np.array(["s"] * 9 + ["p"] * 6)
    got = cross_domain_share(x, domains, k=3)
    for i in range(15):
        sims = x @ x[i]
        sims[i] = -np.inf
        top = np.argsort(-sims)[:3]
        assert got[i] == pytest.approx(np.mean(domains[top] != domains[i]))


@pytest.fixture(scope="module")
def mixed_run(sample_catalog, tmp_path_factory):
    """A gated run on 128 sample items, and 48 other sample images as 'photos' (clothing-dev layout)."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "images").mkdir()
    picked = [i for i in sample_catalog.ids[150:] if sample_catalog.items.at[i, "articleType"] in TO_PHOTO_LABEL][:48]
    rows = []
    for n, item_id in enumerate(picked):
        shutil.copy(sample_catalog.image_path(item_id), folder / "images" / f"{item_id}.jpg")
        rows.append({"id": f"p{item_id}", "image": f"images/{item_id}.jpg", "label": TO_PHOTO_LABEL[sample_catalog.items.at[item_id, "articleType"]], "sender_id": str(n % 12)})
    pd.DataFrame(rows).to_csv(folder / "catalog.csv", index=False)
    photos = load_catalog(folder / "catalog.csv")
    work = tmp_path_factory.mktemp("mixed-work")
    studio = sample_catalog.head(128)
    result = finetune(studio, "mini-siglip", work / "run", workdir=work, config=FAST, device="cpu", progress=False)
    return studio, photos, work, result


def test_mixed_check_variants_and_routing(mixed_run):
    studio, photos, work, result = mixed_run
    check = mixed_catalog_check(studio, photos, work, result.model_name, config=FAST, n_bootstrap=200)
    _, report = shift_halves(photos, FAST.shift_group, FAST.shift_seed)
    assert check.n_photo == len(report) and 0 < check.n_studio < len(studio)
    table = check.table.set_index(["queries", "comparison"])
    assert set(table.index.get_level_values(0)) == {"all", "studio", "photo", "photo -> studio only"}
    assert (table["ci_low"] <= table["diff"]).all() and (table["diff"] <= table["ci_high"]).all()
    # photo -> studio against a direct computation on the base vectors
    base_photo = load_embeddings(work, photos, "efficientnet-lite0").vectors_for(report)
    split_eval = check_ids(studio)
    assert check.n_studio == len(split_eval)
    base_studio = load_embeddings(work, studio, "efficientnet-lite0").vectors_for(split_eval)
    kinds_p = shared_kinds(photos.items.loc[list(report)], "photo").to_numpy()
    kinds_s = shared_kinds(studio.items.loc[split_eval], "studio").to_numpy()
    direct = cross_domain_ndcg(base_photo, kinds_p, base_studio, kinds_s)
    row = table.loc[("photo -> studio only", f"{VARIANTS[1]} vs {VARIANTS[0]}")]
    assert row["ndcg@5 a"] == pytest.approx(np.nanmean(direct), abs=1e-6) and row["n_queries"] == int((~np.isnan(direct)).sum())
    # routing: a query outside the gate searches base vectors, inside it the served ones
    heads = create_embedder(result.model_name, device="cpu").heads
    with torch.no_grad():
        inside = heads.gate(torch.from_numpy(np.asarray(base_photo, dtype=np.float32))).bool().numpy()
    routed = table.loc[("photo -> studio only", f"{VARIANTS[3]} vs {VARIANTS[0]}")]
    if not inside.any():  # every photo outside the gate: routed is exactly the base model there
        assert routed["diff"] == 0.0
    neighbours = check.neighbours.set_index(["queries", "variant"])
    assert neighbours["top-5 from the other domain"].between(0, 1).all()


def check_ids(studio):
    """The studio evaluation items the check indexes (the split's evaluation part, no duplicates in the sample)."""
    from vrec_utils.catalog import split_catalog

    return list(split_catalog(studio, FAST.eval_fraction, FAST.split_seed).eval)


def _forbidden(studio, photos):
    """What round 5's rule must never read: the studio evaluation split and the photos' reported half."""
    from vrec_utils.catalog import split_catalog

    return set(split_catalog(studio, FAST.eval_fraction, FAST.split_seed).eval), set(shift_halves(photos, FAST.shift_group, FAST.shift_seed)[1])


def _scrambled(studio, photos, monkeypatch):
    """Catalogs whose forbidden items carry other labels, and a load_embeddings that gives the
    forbidden items random vectors (every model): a check that reads them changes its numbers."""
    import dataclasses

    import vrec_utils.studies.mixed_catalog as mc
    from vrec_utils.store import Embeddings

    eval_ids, reported = _forbidden(studio, photos)
    items = studio.items.copy()
    items.loc[items.index.isin(eval_ids), "articleType"] = "Watches"
    shot = photos.items.copy()
    shot.loc[shot.index.isin(reported), "label"] = "Body"
    real = mc.load_embeddings
    rng = np.random.default_rng(0)

    def load(workdir, catalog, model, **kw):
        emb = real(workdir, catalog, model, **kw)
        vectors = np.array(emb.vectors, dtype=np.float32)
        hit = np.isin(np.asarray(emb.ids).astype(str), list(eval_ids | reported))
        noise = rng.normal(size=(int(hit.sum()), vectors.shape[1])).astype(np.float32)
        vectors[hit] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
        return Embeddings(emb.ids, vectors, emb.manifest)

    monkeypatch.setattr(mc, "load_embeddings", load)
    return dataclasses.replace(studio, items=items), dataclasses.replace(photos, items=shot)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the scrambled kinds leave a query group empty: NaN, no warning
def test_selection_check_never_reads_evaluation_items_or_the_reported_half(mixed_run, monkeypatch):
    studio, photos, work, result = mixed_run
    clean = {s: mixed_catalog_check(studio, photos, work, result.model_name, config=FAST, n_bootstrap=200, sets=s) for s in SETS}
    studio_ids, photo_ids = mixed_ids(studio, photos, FAST, "selection")
    eval_ids, reported = _forbidden(studio, photos)
    assert studio_ids and photo_ids and not set(studio_ids) & eval_ids and not set(photo_ids) & reported
    s2, p2 = _scrambled(studio, photos, monkeypatch)
    scrambled = {s: mixed_catalog_check(s2, p2, work, result.model_name, config=FAST, n_bootstrap=200, sets=s) for s in SETS}
    pd.testing.assert_frame_equal(scrambled["selection"].table, clean["selection"].table)
    pd.testing.assert_frame_equal(scrambled["selection"].neighbours, clean["selection"].neighbours)
    # the scrambling is seen by a check that does read those items: this test can fail
    assert not scrambled["evaluation"].table["ndcg@5 a"].equals(clean["evaluation"].table["ndcg@5 a"])
    with pytest.raises(ValueError, match="sets"):
        mixed_ids(studio, photos, FAST, "reported")


def test_eligibility_and_the_round5_rule():
    rows = []
    for queries in ("all", "studio", "photo", "photo -> studio only"):
        for comparison, diff in zip([f"{b} vs {a}" for a, b in COMPARISONS], (0.0, -0.02 if queries == "photo -> studio only" else 0.01, 0.002, 0.0)):
            rows.append({"queries": queries, "comparison": comparison, "diff": diff, "ci_low": diff - 0.01, "ci_high": diff + 0.01})
    check = MixedCheck(pd.DataFrame(rows), pd.DataFrame(), 10, 5, "selection")
    got = check.eligibility(0.005).set_index("serving")
    assert got.loc["served", "photo -> studio change"] == -0.02 and not got.loc["served", "mixed eligible"]
    assert got.loc["routed", "studio change"] == 0.002 and got.loc["routed", "mixed eligible"]
    table = pd.DataFrame({"recipe": ["a", "b", "c"], "val gain": [0.03, 0.04, 0.05], "selection change": [-0.001, -0.002, -0.02]})
    mixed = pd.DataFrame({
        "recipe": ["a", "a", "b", "b", "c", "c"], "serving": ["served", "routed"] * 3,
        "mixed eligible": [True, True, False, True, True, True],
    })  # fmt: skip
    # c fails the selection-half tolerance, b is eligible only routed
    assert choose_with_mixed_check(table, 0.005, mixed) == ("b", "routed")
    assert choose_with_mixed_check(table, 0.005, mixed.assign(**{"mixed eligible": [True, True, True, True, False, False]})) == ("b", "served")
    with pytest.raises(ValueError, match="mixed-catalogue"):
        choose_with_mixed_check(table, 0.005, mixed.assign(**{"mixed eligible": False}))


@pytest.fixture(scope="module")
def moved_run(mixed_run):
    """A gated run on the same studio items that moves neighbours: full mix (alpha 1), higher lr."""
    import dataclasses

    studio, photos, work, _ = mixed_run
    config = dataclasses.replace(FAST, alpha=1.0, epochs=4, lr=2e-2)
    return studio, photos, work, finetune(studio, "mini-siglip", work / "moved", workdir=work, config=config, device="cpu", progress=False)


@pytest.fixture()
def half_gate(moved_run, monkeypatch):
    """The run's router with its threshold at the median distance of the studio items, so that
    about half the queries route each way (the fitted 0.99 gate passes nearly every sample image)."""
    import vrec_utils.search as search
    from vrec_utils.models.local import query_router
    from vrec_utils.train import extract_finetuned_embeddings

    studio, _, work, result = moved_run
    extract_finetuned_embeddings(studio, result.model_name, work, progress=False)
    router = query_router(result.model_name)
    base = load_embeddings(work, studio, router.base_model)
    with torch.no_grad():
        distance = router.gate.distance(torch.from_numpy(np.asarray(base.vectors, dtype=np.float32)))
    router.gate.threshold.fill_(float(distance.median()))
    monkeypatch.setattr(search, "query_router", lambda model: router if model == result.model_name else None)
    return router, base


def test_routing_gives_out_of_domain_queries_exactly_the_base_neighbours(moved_run, half_gate):
    from PIL import Image

    from vrec_utils.search import recommend, search_by_image

    studio, _, work, result = moved_run
    router, base = half_gate
    inside = pd.Series(router.inside(base.vectors), index=base.ids)
    assert 0 < inside.sum() < len(inside)
    ids = list(studio.ids)
    routed = recommend(studio, work, result.model_name, ids, k=5)
    plain_base = recommend(studio, work, "efficientnet-lite0", ids, k=5)
    differ = [q for q in ids if inside[q] and routed.loc[routed["query_id"] == q, "item_id"].tolist() != plain_base.loc[plain_base["query_id"] == q, "item_id"].tolist()]
    assert differ, "the tuned model must move some neighbours, or this test cannot tell routing from the base model"
    tuned = load_embeddings(work, studio, result.model_name)
    sims = tuned.vectors_for(ids) @ tuned.vectors_for(ids).T
    np.fill_diagonal(sims, -np.inf)
    for n, item in enumerate(ids):
        got = routed[routed["query_id"] == item]
        if inside[item]:  # the fine-tune's own neighbours
            assert got["item_id"].tolist() == [ids[j] for j in np.argsort(-sims[n], kind="stable")[:5]]
        else:  # exactly efficientnet-lite0's
            want = plain_base[plain_base["query_id"] == item]
            assert got["item_id"].tolist() == want["item_id"].tolist()
            np.testing.assert_allclose(got["score"], want["score"], rtol=0, atol=1e-6)
    # a query image far from the catalogue (noise) is outside the gate: the base model's neighbours
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(80, 60, 3), dtype=np.uint8))
    embedder = create_embedder(result.model_name, device="cpu")
    assert not router.inside(embedder.feature_model.embed_images([noise]))[0]
    got = search_by_image(studio, work, result.model_name, noise, k=5, device="cpu")
    want = search_by_image(studio, work, "efficientnet-lite0", noise, k=5, device="cpu")
    assert got["item_id"].tolist() == want["item_id"].tolist()
    np.testing.assert_allclose(got["score"], want["score"], rtol=0, atol=1e-6)


def test_routed_ndcg_equals_the_studys_routing(moved_run, half_gate):
    """nDCG@5 of routed recommend() over the catalogue equals the study's routing: per query the
    served model's value inside the gate and the base model's outside (as mixed_catalog_check does)."""
    from vrec_utils.evaluation import evaluate_embeddings
    from vrec_utils.evaluation.config import UNFILTERED
    from vrec_utils.metrics import ideal_from_counts, ndcg_at_k
    from vrec_utils.search import recommend

    studio, _, work, result = moved_run
    router, base = half_gate
    variants = {"base": base, "served": load_embeddings(work, studio, result.model_name)}
    study = evaluate_embeddings(studio, variants, label="articleType", ks=(5,), metrics=["ndcg@5"], exclude_duplicates=False, n_bootstrap=10)
    queries = list(study.query_ids)
    inside = router.inside(base.vectors_for(queries))
    served, plain = study.values[("served", UNFILTERED)]["ndcg@5"], study.values[("base", UNFILTERED)]["ndcg@5"]
    assert not np.allclose(served[inside], plain[inside])  # routed differs from the base model where it should
    expected = np.where(inside, served, plain)
    routed = recommend(studio, work, result.model_name, queries, k=5)
    labels = studio.items["articleType"]
    rel = np.stack([(labels.loc[routed.loc[routed["query_id"] == q, "item_id"]].to_numpy() == labels[q]).astype(float) for q in queries])
    n_rel = np.array([(labels == labels[q]).sum() - 1 for q in queries])
    got = ndcg_at_k(rel, ideal_from_counts(n_rel, 5), 5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------- serving mode


def _copy_model(result, tmp_path, name: str, **meta_changes) -> str:
    """A copy of ``result``'s model folder with ``vrec_model.json`` changed (None: key removed)."""
    import json

    from vrec_utils.models.local import local_model_name

    folder = tmp_path / name
    shutil.copytree(result.model_dir, folder)
    meta = json.loads((folder / "vrec_model.json").read_text())
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    (folder / "vrec_model.json").write_text(json.dumps(meta))
    return local_model_name(folder)


def test_a_saved_gated_model_records_routed_and_a_served_one_does_not_route(moved_run, tmp_path):
    import dataclasses

    from PIL import Image

    from vrec_utils.models.local import gate_router, query_router, serving_mode
    from vrec_utils.models.mini_siglip import read_model_json
    from vrec_utils.search import search_by_image

    studio, _, work, result = moved_run
    assert read_model_json(result.model_dir)["serving"] == "routed" and serving_mode(result.model_name) == "routed"
    assert query_router(result.model_name) is not None
    served = finetune(studio, "mini-siglip", work / "served", workdir=work, config=dataclasses.replace(result.config, serving="served"),
                      device="cpu", progress=False, warm_start=result.out)  # fmt: skip
    assert read_model_json(served.model_dir)["serving"] == "served" and serving_mode(served.model_name) == "served"
    assert query_router(served.model_name) is None and gate_router(served.model_name) is not None
    # a noise image is outside the gate: the routed model gives it efficientnet-lite0's neighbours, the
    # served one ranks the model's served vectors by the query's served (here: base) vector
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(80, 60, 3), dtype=np.uint8))
    embedder = create_embedder(served.model_name, device="cpu")
    query = embedder.embed_images([noise])
    assert not gate_router(served.model_name).inside(embedder.feature_model.embed_images([noise]))[0]
    got = search_by_image(studio, work, served.model_name, noise, k=5, device="cpu")
    vectors = load_embeddings(work, studio, served.model_name)
    sims = (vectors.vectors @ query[0]).astype(np.float64)
    want = [vectors.ids[j] for j in np.argsort(-sims, kind="stable")[:5]]
    assert got["item_id"].tolist() == want
    np.testing.assert_allclose(got["score"], np.sort(sims)[::-1][:5], rtol=0, atol=1e-5)
    routed = search_by_image(studio, work, result.model_name, noise, k=5, device="cpu")
    base = search_by_image(studio, work, "efficientnet-lite0", noise, k=5, device="cpu")
    np.testing.assert_allclose(routed["score"], base["score"], rtol=0, atol=1e-6)
    assert not np.allclose(got["score"], base["score"], atol=1e-4), "served and routed must differ here, or the test cannot tell them apart"


def test_a_model_without_a_recorded_mode_routes_with_a_one_line_note(moved_run, tmp_path, capsys):
    from vrec_utils.models.local import query_router, serving_mode
    from vrec_utils.models.mini_siglip import read_model_json

    _, _, _, result = moved_run
    legacy = _copy_model(result, tmp_path, "legacy", serving=None)
    capsys.readouterr()
    assert serving_mode(legacy) == "routed" and query_router(legacy) is not None
    assert serving_mode(legacy) == "routed"  # noted once per model folder
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "records no serving mode" in note[0] and "measured served" in note[0]
    with pytest.raises(ValueError, match="serving must be"):
        serving_mode(_copy_model(result, tmp_path, "bad", serving="sometimes"))
    heads = {**read_model_json(result.model_dir)["heads"], "gate": False}
    ungated = _copy_model(result, tmp_path, "ungated", serving="routed", heads=heads)
    assert serving_mode(ungated) == "served" and query_router(ungated) is None


def test_serving_is_a_selection_field_that_keeps_earlier_digests():
    import dataclasses

    from vrec_utils.train.config import SELECTION_FIELDS

    assert "serving" not in FAST.to_dict() and "serving" in SELECTION_FIELDS
    served = dataclasses.replace(FAST, serving="served")
    assert served.digest() != FAST.digest() and served.training_dict() == FAST.training_dict()
    assert FAST.serving_mode() == "routed" and dataclasses.replace(FAST, in_domain_gate=None).serving_mode() == "served"
    with pytest.raises(ValueError, match="serving"):
        FinetuneConfig(serving="sometimes")


def test_routed_in_domain_is_the_served_value_inside_the_gate_and_the_base_value_outside(moved_run, half_gate, monkeypatch):
    import vrec_utils.models.local as local
    import vrec_utils.studies.recipe_study as recipe_study
    from vrec_utils.catalog import split_catalog
    from vrec_utils.evaluation import evaluate_models
    from vrec_utils.evaluation.config import UNFILTERED

    studio, _, work, result = moved_run
    router, base = half_gate
    monkeypatch.setattr(local, "gate_router", lambda model: router if model == result.model_name else None)
    queries = list(split_catalog(studio, result.config.eval_fraction, result.config.split_seed).eval)
    with torch.no_grad():  # about half the evaluation queries inside the gate
        router.gate.threshold.fill_(float(router.gate.distance(torch.from_numpy(np.asarray(base.vectors_for(queries), dtype=np.float32))).median()))
    got = recipe_study.routed_in_domain(studio, work, result.model_name, config=result.config, n_bootstrap=200).set_index("mode")
    split = split_catalog(studio, result.config.eval_fraction, result.config.split_seed)
    direct = evaluate_models(studio, work, ["efficientnet-lite0", result.model_name], label="articleType", split=split, ks=(5,), metrics=["ndcg@5"], n_bootstrap=10)
    inside = router.inside(base.vectors_for(list(direct.query_ids)))
    served, plain = direct.values[(result.model_name, UNFILTERED)]["ndcg@5"], direct.values[("efficientnet-lite0", UNFILTERED)]["ndcg@5"]
    assert 0 < inside.mean() < 1 and got.loc["routed", "share inside the gate"] == pytest.approx(inside.mean())
    assert got.loc["served", "mean_b"] == pytest.approx(served.mean()) and got.loc["served", "mean_a"] == pytest.approx(plain.mean())
    routed = np.where(inside, served, plain)
    assert got.loc["routed", "mean_b"] == pytest.approx(routed.mean()) and got.loc["routed", "diff"] == pytest.approx((routed - plain).mean())
    assert got.loc["routed vs served", "diff"] == pytest.approx((routed - served).mean())
    assert got.loc["routed", "diff_ci_low"] <= got.loc["routed", "diff"] <= got.loc["routed", "diff_ci_high"]
    sides = recipe_study.both_sides(studio, work, result.model_name, config=result.config, n_bootstrap=200).iloc[0]
    assert (sides["diff"], sides["ci_low"], sides["ci_high"]) == pytest.approx(tuple(got.loc["served", ["diff", "diff_ci_low", "diff_ci_high"]]))


def test_notebook_checks_give_a_routed_model_its_routed_row_first(moved_run, tmp_path):
    from vrec_utils.catalog import split_catalog
    from vrec_utils.studies.finetune_study import _Context, _in_domain_checks
    from vrec_utils.studies.recipe_study import routed_in_domain
    from vrec_utils.train import extract_finetuned_embeddings

    studio, _, work, result = moved_run
    extract_finetuned_embeddings(studio, result.model_name, work, progress=False)
    split = split_catalog(studio, result.config.eval_fraction, result.config.split_seed)
    ctx = _Context(studio, work, result.config, "mini-siglip", "efficientnet-lite0", split, "articleType", 200, "cpu", False)
    routed, served = _in_domain_checks(ctx, result.model_name)
    assert "routed" in routed["check"] and "served vectors" in served["check"]
    want = routed_in_domain(studio, work, result.model_name, config=result.config, n_bootstrap=200).set_index("mode")
    assert routed["diff"] == pytest.approx(want.loc["routed", "diff"]) and served["diff"] == pytest.approx(want.loc["served", "diff"])
    plain = _copy_model(result, tmp_path, "served-copy", serving="served")
    extract_finetuned_embeddings(studio, plain, work, progress=False)
    (only,) = _in_domain_checks(ctx, plain)
    assert only["check"].endswith("served") and only["diff"] == pytest.approx(served["diff"])
