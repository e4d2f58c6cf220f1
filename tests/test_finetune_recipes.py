"""Robustness recipes of mini-SigLIP fine-tuning: each piece against a direct computation, WiSE-FT
endpoints, the shifted selection set (never the reported items), saved recipe models."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from vrec_utils.catalog import load_catalog, split_catalog
from vrec_utils.models import create_embedder
from vrec_utils.models import mini_siglip as ms
from vrec_utils.train import (
    FinetuneConfig,
    finetune,
    interpolate_state,
    l2_sp,
    label_ndcg,
    photo_augment,
    recipe_config,
    shift_halves,
    similarity_distillation,
)
from vrec_utils.train.recipes import wise_ft_heads

FAST = FinetuneConfig(epochs=3, batch_size=32, lr=3e-3, warmup_steps=2, val_fraction=0.2, eval_fraction=0.25)


def reference_distillation(tuned: np.ndarray, base: np.ndarray) -> float:
    """Straight from the definition: mean over i != j of (cos(t_i, t_j) - cos(b_i, b_j))^2."""
    n, total = len(tuned), 0.0
    cos = lambda u, v: float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    for i in range(n):
        for j in range(n):
            if i != j:
                total += (cos(tuned[i], tuned[j]) - cos(base[i], base[j])) ** 2
    return total / (n * (n - 1))


@pytest.mark.parametrize("n, d", [(2, 3), (6, 8), (9, 5)])
def test_similarity_distillation_matches_direct_computation(n, d):
    rng = np.random.default_rng(n)
    tuned, base = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    got = similarity_distillation(torch.tensor(tuned), torch.tensor(base))
    assert float(got) == pytest.approx(reference_distillation(tuned, base), rel=1e-10)


def test_similarity_distillation_is_zero_for_the_base_and_trains_the_tuned_side_only():
    base = torch.randn(5, 4, requires_grad=True)
    assert float(similarity_distillation(base * 3.0, base).detach()) == pytest.approx(0.0, abs=1e-12)  # scale-free
    tuned = torch.randn(5, 4, requires_grad=True)
    similarity_distillation(tuned, base).backward()
    assert tuned.grad is not None and tuned.grad.abs().sum() > 0 and base.grad is None
    with pytest.raises(ValueError, match="same n"):
        similarity_distillation(torch.zeros(3, 4), torch.zeros(2, 4))


def test_interpolate_state_endpoints_are_exact_and_the_middle_is_linear():
    g = torch.Generator().manual_seed(0)
    base = {"image_head.up.weight": torch.randn(4, 4, generator=g), "image_head.up.bias": torch.randn(4, generator=g), "text_head.w": torch.randn(3, generator=g)}
    tuned = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    at0 = interpolate_state(base, tuned, 0.0, prefix="image_head.")
    at1 = interpolate_state(base, tuned, 1.0, prefix="image_head.")
    mid = interpolate_state(base, tuned, 0.3, prefix="image_head.")
    for key, value in base.items():
        expected0 = value if key.startswith("image_head.") else tuned[key]
        assert torch.equal(at0[key], expected0) and torch.equal(at1[key], tuned[key])
    w = "image_head.up.weight"
    torch.testing.assert_close(mid[w], 0.7 * base[w] + 0.3 * tuned[w])
    assert torch.equal(mid["text_head.w"], tuned["text_head.w"])  # outside the prefix: the tuned tensor
    with pytest.raises(ValueError, match="coefficient"):
        interpolate_state(base, tuned, 1.5)


@pytest.mark.parametrize("head", [{}, {"image_rank": 3}, {"image_head": "diagonal"}])
def test_wise_ft_at_0_and_1_reproduces_the_base_and_the_tuned_model_exactly(head):
    spec = ms.HeadSpec(image_dim=16, text_dim=8, **head)
    heads = ms.MiniSiglipHeads(spec, seed=0)
    initial = {k: v.clone() for k, v in heads.state_dict().items()}
    with torch.no_grad():  # "training": move every tensor
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.nn.functional.normalize(torch.randn(7, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    at0, at1 = wise_ft_heads(initial, heads, 0.0), wise_ft_heads(initial, heads, 1.0)
    assert torch.equal(at0.image(x, 1.0), torch.nn.functional.normalize(x, dim=-1))  # the base (identity) model
    assert torch.equal(at1.image(x, 1.0), heads.image(x, 1.0))  # the tuned model
    t = torch.randn(2, 8)
    assert torch.equal(at0.text(t), heads.text(t))  # the text head stays tuned
    assert not torch.equal(wise_ft_heads(initial, heads, 0.5).image(x, 1.0), heads.image(x, 1.0))


def test_photo_augment_is_seeded_keeps_size_and_replaces_the_backdrop(sample_catalog):
    from vrec_utils.images import load_rgb

    image = load_rgb(sample_catalog.image_path(sample_catalog.ids[0]))
    a = photo_augment(image, np.random.default_rng(3))
    b = photo_augment(image, np.random.default_rng(3))
    c = photo_augment(image, np.random.default_rng(4))
    assert a.size == image.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    white = lambda im: float((np.asarray(im) >= 245).all(axis=-1).mean())
    assert white(image) > 0.2 and white(a) < 0.5 * white(image)


# ---------------------------------------------------------------------- the shifted selection set


@pytest.fixture(scope="session")
def shifted_catalog(sample_catalog, tmp_path_factory):
    """48 sample images not in ``tiny_fashion``, in the clothing-dev layout (label, sender_id; 12 senders)."""
    folder = tmp_path_factory.mktemp("shifted")
    (folder / "images").mkdir()
    ids = sample_catalog.ids[150:198]
    rows = []
    for n, item_id in enumerate(ids):
        shutil.copy(sample_catalog.image_path(item_id), folder / "images" / f"{item_id}.jpg")
        rows.append({"id": f"s{item_id}", "image": f"images/{item_id}.jpg", "label": sample_catalog.items.at[item_id, "masterCategory"], "sender_id": str(n % 12)})
    pd.DataFrame(rows).to_csv(folder / "catalog.csv", index=False)
    return load_catalog(folder / "catalog.csv")


def test_shift_halves_split_by_sender_seeded_and_disjoint(shifted_catalog):
    select, report = shift_halves(shifted_catalog, "sender_id", seed=0)
    assert set(select).isdisjoint(report) and set(select) | set(report) == set(shifted_catalog.ids)
    senders = shifted_catalog.items["sender_id"]
    assert set(senders.loc[list(select)]).isdisjoint(senders.loc[list(report)])
    assert shift_halves(shifted_catalog, "sender_id", seed=0) == (select, report)
    assert shift_halves(shifted_catalog, "sender_id", seed=1) != (select, report)
    assert 0.2 < len(select) / len(shifted_catalog) < 0.8


@pytest.fixture(scope="session")
def recipe_run(sample_catalog, shifted_catalog, tmp_path_factory):
    """A run with every recipe piece on: WiSE-FT chosen on the shift selection half, distillation,
    LP-FT, augmented views. Records every catalog whose image features are extracted."""
    from vrec_utils.train import recipes

    seen: list[list[str]] = []
    real = recipes.extract_image_embeddings

    def spy(catalog, *args, **kwargs):
        seen.append(list(catalog.ids))
        return real(catalog, *args, **kwargs)

    recipes.extract_image_embeddings = spy
    try:
        config = dataclasses.replace(
            recipe_config("distill-augment-wise-ft-shift", FAST, shifted_catalog.root / "catalog.csv"),
            probe_epochs=1, augment_max_items=20,
        )
        work = tmp_path_factory.mktemp("recipe-work")
        catalog = sample_catalog.head(128)
        result = finetune(catalog, "mini-siglip", work / "run", workdir=work, config=config, device="cpu", progress=False)
    finally:
        recipes.extract_image_embeddings = real
    return result, catalog, seen, work


def test_selection_never_sees_reported_or_evaluation_items(recipe_run, shifted_catalog):
    result, catalog, seen, _ = recipe_run
    select, report = shift_halves(shifted_catalog, "sender_id", seed=0)
    shifted_calls = [ids for ids in seen if ids and ids[0].startswith("s")]
    assert shifted_calls, "the selection set was never embedded"
    for ids in shifted_calls:  # only the selection half is ever embedded for selection
        assert set(ids) <= set(select) and set(ids).isdisjoint(report)
    eval_ids = set(split_catalog(catalog, FAST.eval_fraction, FAST.split_seed).eval)
    augmented_sources = {i.rsplit("~aug", 1)[0] for ids in seen for i in ids if "~aug" in i}
    assert augmented_sources and augmented_sources.isdisjoint(eval_ids)  # no augmented view of an evaluation item
    recorded = json.loads((result.model_dir / "vrec_model.json").read_text())["recipe"]
    shift = recorded["selection"]["shift"]
    assert shift["ids_sha256"] == hashlib.sha256("\n".join(select).encode()).hexdigest()
    assert shift["n_reported_items"] == len(report) and set(shift["groups"]).isdisjoint(shifted_catalog.items.loc[list(report), "sender_id"])


def test_coefficient_holds_on_the_selection_half_and_is_recorded(recipe_run):
    result, *_ = recipe_run
    table = result.alpha_table
    assert {"alpha", "val_ndcg@5", "shift_select_ndcg@5"} <= set(table.columns)
    base = table.loc[table["alpha"] == 0.0, "shift_select_ndcg@5"].item()
    chosen = table.loc[table["alpha"] == result.alpha]
    assert chosen["shift_select_ndcg@5"].item() >= base
    holding = table[table["shift_select_ndcg@5"] >= base]
    assert chosen["val_ndcg@5"].item() == holding["val_ndcg@5"].max()  # the best in-domain among those that hold
    recorded = json.loads((result.model_dir / "vrec_model.json").read_text())
    assert recorded["recipe"]["name"] == "distill-augment-wise-ft-shift"
    assert recorded["recipe"]["mix"] == "weights" and recorded["recipe"]["coefficient"] == result.alpha
    assert recorded["alpha"] == 1.0  # WiSE-FT: the interpolated weights are served unmixed
    assert result.info["augmented_items"] == 20


def test_saved_recipe_model_reloads_and_embeds_identically(recipe_run):
    """The reloaded model reproduces the validation score its coefficient was chosen with, and
    embeds the same features identically on a second load."""
    from vrec_utils.store import load_embeddings

    result, catalog, _, work = recipe_run
    val_ids = json.loads((result.out / "split.json").read_text())["finetune_val"]
    features = load_embeddings(work, catalog, "efficientnet-lite0").vectors_for(val_ids)
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    first, second = create_embedder(result.model_name, device="cpu"), create_embedder(result.model_name, device="cpu")
    with torch.no_grad():
        a, b = first.image_from_features(x).numpy(), second.image_from_features(x).numpy()
    assert np.array_equal(a, b)
    labels = catalog.items.loc[val_ids, FAST.label].astype(str).to_numpy()
    expected = result.alpha_table.loc[result.alpha_table["alpha"] == result.alpha, "val_ndcg@5"].item()
    assert label_ndcg(a, labels) == pytest.approx(expected, abs=1e-6)


def test_recipes_refuse_tower_bases_and_bad_settings(sample_catalog, tmp_path):
    with pytest.raises(ValueError, match="shift_catalog"):
        FinetuneConfig(select_on="shift")
    with pytest.raises(ValueError, match="probe_epochs"):
        FinetuneConfig(epochs=2, probe_epochs=2)
    with pytest.raises(KeyError, match="unknown recipe"):
        recipe_config("nope")
    config = dataclasses.replace(FAST, trainable="last", distill=1.0, epochs=1)
    with pytest.raises(ValueError, match="distill"):
        finetune(sample_catalog.head(32), "tiny-siglip", tmp_path, workdir=tmp_path, config=config, device="cpu", progress=False)


# ------------------------------------------------------------------------------ both sides


def _sides(in_low, in_high, shift=None):
    rows = [{"model": "m", "side": "in-domain", "set": "eval", "diff": (in_low + in_high) / 2, "ci_low": in_low, "ci_high": in_high}]
    if shift is not None:
        rows.append({"model": "m", "side": "shift", "set": "photos", "diff": sum(shift) / 2, "ci_low": shift[0], "ci_high": shift[1]})
    return pd.DataFrame(rows)


def test_verdict_says_holds_only_when_both_intervals_say_so():
    from vrec_utils.studies.recipe_study import verdict

    assert verdict(_sides(0.01, 0.03, (-0.005, 0.02))).startswith("gains in-domain and holds under shift")
    assert verdict(_sides(0.01, 0.03, (-0.03, 0.01))).startswith("gains in-domain, but may lose under shift")
    assert not verdict(_sides(0.01, 0.03, (-0.031, -0.017))).startswith("gains in-domain and holds")
    assert not verdict(_sides(-0.01, 0.03, (0.01, 0.02))).startswith("gains in-domain and holds")  # no in-domain gain
    assert "not measured" in verdict(_sides(0.01, 0.03))


def test_both_sides_reports_the_reported_half_only(recipe_run, shifted_catalog):
    from vrec_utils.studies.recipe_study import both_sides

    result, catalog, _, work = recipe_run
    sides = both_sides(catalog, work, result.model_name, config=result.config, shift_catalog=shifted_catalog, n_bootstrap=200, device="cpu")
    assert list(sides["side"]) == ["in-domain", "shift"]
    _, report = shift_halves(shifted_catalog, "sender_id", seed=0)
    assert sides["n_queries"].iloc[1] <= len(report) and sides["set"].iloc[1].endswith("senders)")
    assert sides["n_queries"].iloc[0] <= len(split_catalog(catalog, FAST.eval_fraction, FAST.split_seed).eval)
    assert ((sides["ci_low"] <= sides["diff"]) & (sides["diff"] <= sides["ci_high"])).all()


def test_cli_prints_both_sides_and_the_verdict(recipe_run, shifted_catalog, tmp_path, capsys, monkeypatch):
    import vrec_utils.cli.finetune_cmd as cmd
    from vrec_utils.cli import main

    _, catalog, _, work = recipe_run
    monkeypatch.setattr(cmd, "load_catalog", lambda path: catalog)  # reuse the cached features
    code = main([
        "finetune", "--catalog", "sample", "--out", str(tmp_path / "run"), "--workdir", str(work), "--epochs", "2",
        "--batch-size", "32", "--quiet", "--no-warm-cache", "--shift-catalog", str(shifted_catalog.root / "catalog.csv"),
        "--n-bootstrap", "100", "--recipe", "alpha-mix-shift",
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "in-domain" in out and "shift" in out and "reported half" in out and "verdict: " in out
    recorded = json.loads((tmp_path / "run" / "model" / "vrec_model.json").read_text())["recipe"]
    assert recorded["name"] == "alpha-mix-shift" and "shift" in recorded["selection"]
    assert main(["finetune", "--catalog", "sample", "--base", "tiny-siglip", "--recipe", "distill", "--out", str(tmp_path / "x")]) == 2
    assert "mini-siglip only" in capsys.readouterr().err


# ------------------------------------------------------------- round 2: L2-SP, low-capacity heads, the rule


def test_l2_sp_matches_direct_computation_and_pulls_toward_the_start_only():
    rng = np.random.default_rng(0)
    start = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    now = {k: v + rng.normal(size=v.shape) for k, v in start.items()}
    expected = sum(float(((now[k] - start[k]) ** 2).sum()) for k in start)  # straight from the definition
    params = {k: torch.tensor(v, requires_grad=True) for k, v in now.items()}
    initial = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    got = l2_sp(params, initial)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-12)
    got.backward()
    for k in start:  # d/dp ||p - p0||^2 = 2 (p - p0); the starting point gets no gradient
        np.testing.assert_allclose(params[k].grad.numpy(), 2 * (now[k] - start[k]), rtol=1e-12)
        assert initial[k].grad is None
    assert float(l2_sp({k: torch.tensor(v) for k, v in start.items()}, initial)) == 0.0
    with pytest.raises(ValueError, match="no starting value"):
        l2_sp({"c": torch.zeros(2)}, initial)


def test_diagonal_head_is_the_identity_at_start_and_reloads_identically(tmp_path):
    spec = ms.HeadSpec(image_dim=16, text_dim=8, image_head="diagonal")
    heads = ms.MiniSiglipHeads(spec, seed=0)
    x = torch.nn.functional.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    with torch.no_grad():
        assert torch.equal(heads.image_head(x), x)  # the identity, exactly: the served model is the base
        for a in (0.3, 1.0):
            torch.testing.assert_close(heads.image(x, a), heads.image(x, 0.0), rtol=0, atol=1e-7)
    assert sum(p.numel() for p in heads.image_head.parameters()) == 2 * 16
    with torch.no_grad():
        heads.image_head.scale.copy_(torch.linspace(-0.5, 0.5, 16))
        heads.image_head.bias.fill_(0.01)
    expected = torch.nn.functional.normalize(x * (1 + torch.linspace(-0.5, 0.5, 16)) + 0.01, dim=-1)
    torch.testing.assert_close(heads.tuned_image(x), expected)
    ms.save_mini_siglip(tmp_path / "m", heads, alpha=0.7, towers={})
    loaded, _ = ms.load_heads(tmp_path / "m", ms.read_model_json(tmp_path / "m"))
    assert loaded.spec == spec and torch.equal(loaded.image(x, 0.7), heads.image(x, 0.7))
    with pytest.raises(ValueError, match="image_rank"):
        ms.HeadSpec(image_rank=4, image_head="diagonal")


def test_models_saved_before_diagonal_heads_load_as_residual(tmp_path):
    heads = ms.MiniSiglipHeads(ms.HeadSpec(image_dim=16, text_dim=8, image_rank=2), seed=0)
    ms.save_mini_siglip(tmp_path / "m", heads, alpha=0.5, towers={})
    meta = ms.read_model_json(tmp_path / "m")
    del meta["heads"]["image_head"]  # the manifest as it was written before
    loaded, _ = ms.load_heads(tmp_path / "m", meta)
    assert loaded.spec.image_head == "residual" and loaded.spec.image_rank == 2


def test_config_fields_added_later_keep_the_identity_of_earlier_runs():
    plain = FinetuneConfig()
    assert "l2sp" not in plain.to_dict() and "image_head" not in plain.to_dict()  # digest as before these fields
    tuned = dataclasses.replace(plain, l2sp=0.01, image_head="diagonal")
    assert tuned.to_dict()["l2sp"] == 0.01 and tuned.to_dict()["image_head"] == "diagonal"
    assert FinetuneConfig.from_dict(tuned.to_dict()) == tuned and FinetuneConfig.from_dict(plain.to_dict()) == plain
    assert tuned.digest() != plain.digest() and tuned.training_dict() != plain.training_dict()
    with pytest.raises(ValueError, match="l2sp"):
        FinetuneConfig(l2sp=-1.0)
    with pytest.raises(ValueError, match="image_rank"):
        FinetuneConfig(image_head="diagonal", image_rank=4)


def _head_distance(result) -> float:
    heads, _ = ms.load_heads(result.model_dir, ms.read_model_json(result.model_dir))
    return float(sum(p.detach().pow(2).sum() for p in heads.image_head.parameters()))  # identity start: all zeros


def test_l2sp_keeps_the_trained_head_closer_to_its_start(recipe_run):
    """Two short trainings of a diagonal head on the cached sample features, with and without a
    strong L2-SP weight: the regularised head ends nearer the identity and records the recipe."""
    _, catalog, _, work = recipe_run
    base = dataclasses.replace(FAST, image_head="diagonal", alpha=1.0)  # alpha fixed: the saved head is the tuned one
    free = finetune(catalog, "mini-siglip", work / "free", workdir=work, config=base, device="cpu", progress=False, warm_cache=False)
    pulled = finetune(catalog, "mini-siglip", work / "l2sp", workdir=work, config=dataclasses.replace(base, l2sp=100.0),
                      device="cpu", progress=False, warm_cache=False)  # fmt: skip
    assert 0 < _head_distance(pulled) < 0.5 * _head_distance(free)
    recorded = json.loads((pulled.model_dir / "vrec_model.json").read_text())
    assert recorded["recipe"]["l2sp"] == 100.0 and recorded["recipe"]["image_head"] == "diagonal"
    assert recorded["heads"]["image_head"] == "diagonal"


def test_selection_gains_and_the_rule_read_only_validation_and_the_selection_half():
    from vrec_utils.studies.recipe_study import choose_by_rule, selection_gains

    alpha = pd.DataFrame({"alpha": [0.0, 0.1, 0.2], "val_ndcg@5": [0.60, 0.62, 0.65], "shift_select_ndcg@5": [0.50, 0.497, 0.49]})
    assert selection_gains(alpha, 0.1) == pytest.approx({"val gain": 0.02, "selection change": -0.003})
    assert np.isnan(selection_gains(alpha.drop(columns="shift_select_ndcg@5"), 0.2)["selection change"])
    table = pd.DataFrame({
        "recipe": ["a", "b", "c", "d"], "val gain": [0.02, 0.05, 0.03, 0.09], "selection change": [-0.001, -0.02, 0.0, np.nan],
        "in-domain diff": [0.0, 0.0, 0.0, 0.0], "shift diff": [0.0, 0.0, 0.0, 0.0],
    })  # fmt: skip
    assert choose_by_rule(table, 0.005) == "c"  # b loses too much on the selection half; d never chose there
    assert choose_by_rule(table, 0.03) == "b"
    peeked = table.assign(**{"in-domain diff": [0.9, 0.0, -0.9, 0.0], "shift diff": [0.9, 0.0, -0.9, 0.0]})
    assert choose_by_rule(peeked, 0.005) == "c"  # evaluation and reported-half numbers never change the choice
    with pytest.raises(ValueError, match="tolerance"):
        choose_by_rule(table.iloc[[1, 3]], 0.005)


def test_in_domain_gate_matches_mahalanobis_and_serves_the_base_outside(tmp_path):
    from vrec_utils.train.recipes import fit_in_domain_gate

    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(200, 16, generator=g) * 0.3 + 1.0, dim=-1)  # one cluster
    val = torch.nn.functional.normalize(torch.randn(40, 16, generator=g) * 0.3 + 1.0, dim=-1)
    far = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=-1)  # elsewhere on the sphere
    mean, precision, threshold = fit_in_domain_gate(train, val, 0.9)
    from sklearn.covariance import LedoitWolf

    fit = LedoitWolf().fit(train.double().numpy())
    direct = [float((v - fit.location_) @ fit.precision_ @ (v - fit.location_)) for v in val.double().numpy()]
    assert threshold == pytest.approx(np.quantile(direct, 0.9), rel=1e-4)
    heads = ms.MiniSiglipHeads(ms.HeadSpec(image_dim=16, text_dim=8), seed=0)
    with torch.no_grad():
        heads.image_head.up.weight.normal_(0, 0.5, generator=g)
    heads.set_gate(mean, precision, threshold)
    np.testing.assert_allclose(heads.gate.distance(val).numpy(), direct, rtol=1e-3)
    x = torch.cat([val, far])
    inside = heads.gate(x).bool()
    assert inside[:40].float().mean() == pytest.approx(0.9, abs=0.03) and not inside[40:].any()
    with torch.no_grad():
        served, plain = heads.image(x, 0.6), ms.mix_embeddings(x, heads.tuned_image(x), 0.6)
        assert torch.equal(served[~inside], heads.image(x, 0.0)[~inside])  # outside: the base embedding, exactly
        assert torch.equal(served[inside], plain[inside]) and not torch.allclose(served[inside], heads.image(x, 0.0)[inside])
    ms.save_mini_siglip(tmp_path / "m", heads, alpha=0.6, towers={})
    loaded, _ = ms.load_heads(tmp_path / "m", ms.read_model_json(tmp_path / "m"))
    assert loaded.spec.gate and torch.equal(loaded.image(x, 0.6), served)
    with pytest.raises(ValueError, match="mix='output'"):
        FinetuneConfig(in_domain_gate=0.99, mix="weights")


def test_gated_recipe_run_records_its_gate_and_embeds_as_chosen(recipe_run, shifted_catalog):
    """A gated run (sharing no training with others) fits the gate on train features only and the
    saved model embeds the validation items as the coefficient was chosen with."""
    from vrec_utils.store import load_embeddings

    _, catalog, _, work = recipe_run
    config = recipe_config("gated-alpha-mix-shift", dataclasses.replace(FAST, epochs=2), shifted_catalog.root / "catalog.csv")
    result = finetune(catalog, "mini-siglip", work / "gated", workdir=work, config=config, device="cpu", progress=False, warm_cache=False)
    gate = json.loads((result.model_dir / "vrec_model.json").read_text())["recipe"]["gate"]
    assert gate["quantile"] == 0.99 and 0.9 <= gate["val_inside"] <= 1.0 and 0.0 <= gate["selection_inside"] <= 1.0
    val_ids = json.loads((result.out / "split.json").read_text())["finetune_val"]
    x = torch.from_numpy(np.asarray(load_embeddings(work, catalog, "efficientnet-lite0").vectors_for(val_ids), dtype=np.float32))
    with torch.no_grad():
        served = create_embedder(result.model_name, device="cpu").image_from_features(x).numpy()
    labels = catalog.items.loc[val_ids, FAST.label].astype(str).to_numpy()
    expected = result.alpha_table.loc[result.alpha_table["alpha"] == result.alpha, "val_ndcg@5"].item()
    assert label_ndcg(served, labels) == pytest.approx(expected, abs=1e-6)


def test_cli_default_recipe_is_the_study_default_and_falls_back_without_a_shift_catalog(shifted_catalog, capsys):
    from vrec_utils.cli import build_parser
    from vrec_utils.cli.finetune_cmd import config_from_args, config_with_recipe
    from vrec_utils.train.recipes import DEFAULT_RECIPE, RECIPES

    shift = str(shifted_catalog.root)
    args = build_parser().parse_args(["finetune", "--catalog", "sample", "--out", "/tmp/unused-run", "--shift-catalog", shift])
    config = config_with_recipe(args, mini=True)
    assert config.recipe == DEFAULT_RECIPE and config == recipe_config(DEFAULT_RECIPE, config_from_args(args), shift)
    assert all(getattr(config, k) == v for k, v in RECIPES[DEFAULT_RECIPE].items() if k != "select_on")
    bare = config_with_recipe(build_parser().parse_args(["finetune", "--catalog", "sample", "--out", "/tmp/unused-run", "--shift-catalog", ""]), mini=True)
    assert bare.select_on == "val" and bare.shift_catalog is None  # no shift catalog: chosen on validation, and said so
    if RECIPES[DEFAULT_RECIPE].get("select_on") == "shift":
        assert bare.recipe == f"{DEFAULT_RECIPE}@val" and "chosen on validation" in capsys.readouterr().err


def test_every_recipe_builds_and_gated_twins_share_their_training(shifted_catalog):
    """Each recipe is a valid config; a gated recipe and its ungated twin differ only in selection
    fields, so the study trains them once (the round-2/3 tables rely on it)."""
    from vrec_utils.train.recipes import RECIPES

    shift = shifted_catalog.root / "catalog.csv"
    configs = {name: recipe_config(name, FinetuneConfig(), shift) for name in RECIPES}
    twins = [(name, name[len("gated-"):]) for name in RECIPES if name.startswith("gated-") and name[len("gated-"):] in RECIPES]
    assert len(twins) >= 8
    for gated, plain in twins:
        assert configs[gated].in_domain_gate == 0.99 and configs[plain].in_domain_gate is None
        assert configs[gated].training_dict() == configs[plain].training_dict()
    assert configs["gated-alpha-mix-60ep-shift"].epochs == 60 and configs["distill10-augment-shift"].distill == 10.0
