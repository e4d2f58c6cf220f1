"""Sigmoid loss, the fine-tuning loop, checkpoints, saved models (mini-siglip and tiny VLMs)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

from vrec_utils.catalog import Catalog, split_catalog
from vrec_utils.train import (
    ALPHA_GRID,
    PAPER_BIAS,
    PAPER_T_PRIME,
    FinetuneConfig,
    SigmoidLoss,
    ensure_finetuned,
    finetune,
    label_ndcg,
    lr_factor,
    make_pairs,
    select_parameters,
    sigmoid_loss,
)

# Small and fast: every run trains on cached features of the same 128 real items.
FAST = FinetuneConfig(epochs=3, batch_size=32, lr=3e-3, warmup_steps=2, val_fraction=0.2, eval_fraction=0.25)


def reference_sigmoid_loss(img: np.ndarray, txt: np.ndarray, t_prime: float, b: float) -> float:
    """Straight from the SigLIP paper: -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b))."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    n, total = len(img), 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = math.exp(t_prime) * float(img[i] @ txt[j]) + b
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / n


# ------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("n, d, t_prime, b", [(1, 3, 0.0, 0.0), (5, 4, PAPER_T_PRIME, PAPER_BIAS), (7, 16, 1.3, -2.5)])
def test_sigmoid_loss_matches_reference(n, d, t_prime, b):
    rng = np.random.default_rng(n)
    img, txt = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    got = sigmoid_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(t_prime, dtype=torch.float64), b)
    assert float(got) == pytest.approx(reference_sigmoid_loss(img, txt, t_prime, b), rel=1e-10, abs=1e-12)


def test_sigmoid_loss_parameters_learn_and_start_at_paper_values():
    loss_fn = SigmoidLoss()
    assert float(loss_fn.t_prime.detach()) == pytest.approx(math.log(10.0))
    assert float(loss_fn.bias.detach()) == pytest.approx(-10.0)
    img = torch.randn(6, 8, requires_grad=True)
    loss = loss_fn(img, torch.randn(6, 8))
    loss.backward()
    assert loss_fn.t_prime.grad is not None and loss_fn.bias.grad is not None and img.grad is not None
    # aligned pairs score lower than shuffled ones
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert sigmoid_loss(x, x, 2.0, -1.0) < sigmoid_loss(x, x.roll(1, 0), 2.0, -1.0)


def test_sigmoid_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_loss(torch.zeros(3, 4), torch.zeros(2, 4), 0.0, 0.0)


# ------------------------------------------------------------------------------ config and data


def test_config_validates_and_round_trips():
    config = FinetuneConfig(exclude=("masterCategory=Accessories",), alpha=0.5)
    assert FinetuneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert dataclasses.replace(config, seed=1).digest() != config.digest()
    for bad in ({"trainable": "some"}, {"batch_size": 1}, {"lr": 0}, {"exclude": ("masterCategory",)}, {"alpha": 2.0}):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(s, 100, 10, "cosine") for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:])) and factors[-1] < 0.01
    assert lr_factor(50, 100, 0, "constant") == 1.0 and lr_factor(50, 100, 0, "linear") == pytest.approx(0.5)


def _with_blank_titles(catalog: Catalog, ids: list[str]) -> Catalog:
    items = catalog.items.copy()
    items.loc[ids, "title"] = "  "
    return Catalog(items, catalog.root, catalog.source, catalog.label_columns, catalog.report)


def test_pairs_come_from_train_split_skip_blank_titles_and_excluded(small_catalog):
    split = split_catalog(small_catalog, 0.25, 0)
    blank = list(split.train[:7]) + list(split.eval[:3])
    catalog = _with_blank_titles(small_catalog, blank)
    config = FinetuneConfig(exclude=("masterCategory=Footwear",), val_fraction=0.2)
    pairs = make_pairs(catalog, config)
    used = set(pairs.train_ids) | set(pairs.val_ids)
    assert not used & set(split.eval)  # evaluation items are never trained or validated on
    assert not used & set(blank)
    assert pairs.n_no_title == 7  # counted on the train split only
    footwear = catalog.items["masterCategory"] == "Footwear"
    assert not used & set(catalog.items.index[footwear])
    assert pairs.n_excluded == int(footwear.loc[[i for i in split.train if i not in blank]].sum()) > 0
    assert set(pairs.train_ids).isdisjoint(pairs.val_ids) and len(pairs.val_ids) > 0


def test_label_ndcg_hand_example():
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    assert label_ndcg(vectors, ["a", "a", "b", "b"], k=5) == pytest.approx(1.0)
    assert label_ndcg(vectors, ["a", "b", "a", "b"], k=1) == pytest.approx(0.0)


def test_select_parameters_heads_last_all():
    names = [
        "m0.vision_model.embeddings.patch_embedding.weight",
        "m0.vision_model.encoder.layers.0.mlp.fc1.weight",
        "m0.vision_model.encoder.layers.1.mlp.fc1.weight",
        "m0.vision_model.post_layernorm.weight",
        "m0.vision_model.head.probe",
        "m0.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "m0.text_model.encoder.layers.1.self_attn.k_proj.weight",
        "m0.text_model.head.weight",
        "m0.logit_scale",
    ]
    named = [(n, None) for n in names]
    assert select_parameters(named, "heads") == ["m0.vision_model.head.probe", "m0.text_model.head.weight", "m0.logit_scale"]
    last = select_parameters(named, "last", 1)
    assert "m0.vision_model.encoder.layers.1.mlp.fc1.weight" in last and "m0.vision_model.post_layernorm.weight" in last
    assert "m0.text_model.encoder.layers.1.self_attn.k_proj.weight" in last
    assert not any(".layers.0." in n for n in last) and "m0.vision_model.embeddings.patch_embedding.weight" not in last
    assert select_parameters(named, "all") == names


# ----------------------------------------------------------------------------- mini-siglip runs


@pytest.fixture(scope="session")
def tiny_fashion(sample_catalog):
    return sample_catalog.head(128)


@pytest.fixture(scope="session")
def ft_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ft-work")


@pytest.fixture(scope="session")
def mini_run(tiny_fashion, ft_workdir):
    from vrec_utils.train import default_run_dir

    out = default_run_dir(ft_workdir, tiny_fashion, "mini-siglip", FAST)  # where ensure_finetuned looks
    return finetune(tiny_fashion, "mini-siglip", out, workdir=ft_workdir, config=FAST, device="cpu", progress=False)


def test_a_few_steps_reduce_the_loss_on_real_pairs(mini_run):
    steps = mini_run.steps
    assert len(steps) == 3 * math.ceil(mini_run.n_train / 32)
    first, last = steps["loss"].iloc[:2].mean(), steps["loss"].iloc[-2:].mean()
    assert last < first
    hist = mini_run.history
    assert list(hist["epoch"]) == [1, 2, 3] and hist["val_loss"].notna().all()
    assert hist["val_loss"].iloc[-1] < hist["val_loss"].iloc[0]
    assert {"train_loss", "val_loss", "val_ndcg@5", "temperature", "bias"} <= set(hist.columns)


def test_saved_model_loads_through_registry(mini_run, tiny_fashion):
    from vrec_utils.images import load_rgb
    from vrec_utils.models import create_embedder

    model_json = json.loads((mini_run.model_dir / "vrec_model.json").read_text())
    assert model_json["family"] == "mini-siglip" and model_json["alpha"] == mini_run.alpha
    assert json.loads((mini_run.model_dir / "config.json").read_text())["epochs"] == 3
    embedder = create_embedder(mini_run.model_name, device="cpu")
    assert embedder.has_text and embedder.dim == 1280
    images = [load_rgb(tiny_fashion.image_path(i)) for i in tiny_fashion.ids[:3]]
    vectors = embedder.embed_images(images)
    texts = embedder.embed_texts(["black watch", "red dress"])
    assert vectors.shape == (3, 1280) and texts.shape == (2, 1280)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    base = create_embedder("mini-siglip", device="cpu")
    assert embedder.weights_id() != base.weights_id()
    # the untrained base equals efficientnet-lite0 on images
    np.testing.assert_allclose(base.embed_images(images), base.image_tower.embed_images(images), atol=1e-5)
    assert base.image_tower.name == "efficientnet-lite0"


def test_warmed_cache_matches_the_saved_model(mini_run, tiny_fashion, ft_workdir):
    from vrec_utils.images import load_rgb
    from vrec_utils.models import create_embedder
    from vrec_utils.store import load_embeddings

    cached = load_embeddings(ft_workdir, tiny_fashion, mini_run.model_name)
    assert len(cached) == len(tiny_fashion)  # every catalog item, eval split included
    embedder = create_embedder(mini_run.model_name, device="cpu")
    ids = tiny_fashion.ids[:4]
    direct = embedder.embed_images([load_rgb(tiny_fashion.image_path(i)) for i in ids])
    cosines = (direct * cached.vectors_for(ids)).sum(axis=1)
    assert cosines.min() > 0.99  # cache computed under bf16/fp32 autocast like `vrec extract`


def test_resume_after_kill_gives_the_same_weights(mini_run, tiny_fashion, ft_workdir, tmp_path, monkeypatch):
    import vrec_utils.train.loop as ft

    real_save = ft._save_checkpoint

    def save_then_die(path, run_key, epoch, *args, **kwargs):
        real_save(path, run_key, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt("killed after epoch 1")

    monkeypatch.setattr(ft, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_fashion, "mini-siglip", tmp_path, workdir=ft_workdir, config=FAST, device="cpu", progress=False)
    assert not (tmp_path / "model").exists() and (tmp_path / "checkpoints" / "last.pt").exists()
    monkeypatch.setattr(ft, "_save_checkpoint", real_save)
    resumed = finetune(tiny_fashion, "mini-siglip", tmp_path, workdir=ft_workdir, config=FAST, device="cpu", progress=False)
    assert resumed.resumed_from_epoch == 1
    from safetensors.torch import load_file

    a = load_file(str(mini_run.model_dir / "heads.safetensors"))
    b = load_file(str(resumed.model_dir / "heads.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_allclose(resumed.steps["loss"], mini_run.steps["loss"], rtol=0, atol=0)
    # a different config in the same folder is refused rather than silently mixed
    with pytest.raises(ValueError, match="different base, catalog or config"):
        finetune(tiny_fashion, "mini-siglip", tmp_path, workdir=ft_workdir, config=dataclasses.replace(FAST, seed=9), device="cpu", progress=False)


def test_rows_without_title_are_skipped_and_counted(tiny_fashion, ft_workdir, tmp_path):
    split = split_catalog(tiny_fashion, FAST.eval_fraction, FAST.split_seed)
    catalog = _with_blank_titles(tiny_fashion, list(split.train[:5]))
    config = dataclasses.replace(FAST, epochs=1)
    result = finetune(catalog, "mini-siglip", tmp_path, workdir=ft_workdir, config=config, device="cpu", progress=False, warm_cache=False)
    assert result.n_no_title == 5
    assert json.loads((tmp_path / "result.json").read_text())["n_no_title"] == 5


def test_alpha_is_chosen_on_validation_and_reported(mini_run):
    table = mini_run.alpha_table
    assert list(table["alpha"]) == list(ALPHA_GRID)
    assert mini_run.alpha in set(table["alpha"])
    best = table["val_ndcg@5"].max()
    chosen = table.loc[table["alpha"] == mini_run.alpha, "val_ndcg@5"].item()
    assert chosen >= best - FAST.alpha_tolerance
    assert (table.loc[table["alpha"] < mini_run.alpha, "val_ndcg@5"] < best - FAST.alpha_tolerance).all()


def test_ensure_finetuned_reuses_a_finished_run(mini_run, tiny_fashion, ft_workdir, monkeypatch):
    import vrec_utils.train.runs as ft

    name = ensure_finetuned(tiny_fashion, ft_workdir, config=FAST, out=mini_run.out)
    assert name == mini_run.model_name
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: pytest.fail("should not train again"))
    assert ensure_finetuned(tiny_fashion, ft_workdir, config=FAST, out=mini_run.out) == name


def test_base_without_text_tower_is_refused(tiny_fashion, ft_workdir, tmp_path):
    with pytest.raises(ValueError, match="no text tower"):
        finetune(tiny_fashion, "efficientnet-lite0", tmp_path, workdir=ft_workdir, config=FAST, device="cpu", progress=False)


def test_mini_siglip_trains_heads_only(tiny_fashion, ft_workdir, tmp_path):
    with pytest.raises(ValueError, match="trainable='heads'"):
        finetune(tiny_fashion, "mini-siglip", tmp_path, workdir=ft_workdir, config=dataclasses.replace(FAST, trainable="all"), progress=False)


# ------------------------------------------------------------------------- tiny SigLIP / open_clip


@pytest.mark.parametrize("base, trainable", [("tiny-siglip", "heads"), ("tiny-siglip", "last"), ("tiny-openclip", "heads")])
def test_tiny_vlm_finetune_saves_a_local_model(base, trainable, tiny_fashion, ft_workdir, tmp_path):
    from vrec_utils.images import load_rgb
    from vrec_utils.models import create_embedder

    config = dataclasses.replace(FAST, trainable=trainable, epochs=2, max_pairs=32, batch_size=16, label=None, select_by="last")
    result = finetune(tiny_fashion, base, tmp_path, workdir=ft_workdir, config=config, device="cpu", progress=False)
    assert result.alpha is None and len(result.history) == 2
    assert result.steps["loss"].notna().all()
    tuned = create_embedder(result.model_name, device="cpu")
    original = create_embedder(base, device="cpu")
    assert tuned.has_text and tuned.dim == original.dim
    assert tuned.weights_id() != original.weights_id()
    images = [load_rgb(tiny_fashion.image_path(i)) for i in tiny_fashion.ids[:2]]
    assert tuned.embed_images(images).shape == (2, original.dim)
    assert tuned.embed_texts(["black watch"]).shape == (1, original.dim)
    assert not np.allclose(tuned.embed_texts(["black watch"]), original.embed_texts(["black watch"]))


def test_cli_finetune(tiny_fashion, ft_workdir, tmp_path, capsys, monkeypatch):
    import vrec_utils.cli.finetune_cmd as cmd
    from vrec_utils.cli import main

    monkeypatch.setattr(cmd, "load_catalog", lambda path: tiny_fashion)  # reuse the cached features
    code = main([
        "finetune", "--catalog", "sample", "--base", "mini-siglip", "--out", str(tmp_path / "run"),
        "--workdir", str(ft_workdir), "--epochs", "1", "--batch-size", "32", "--quiet", "--json", "--no-warm-cache",
        "--shift-catalog", "", "--n-bootstrap", "100", "--recipe", "alpha-mix-shift",
    ])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["model"].startswith("local:") and payload["epochs_run"] == 1
    # a recipe that chooses on a shift catalog falls back to validation without one, and says so
    assert payload["recipe"]["name"].endswith("@val") and "none is given" in captured.err
    assert [row["side"] for row in payload["comparison"]] == ["in-domain"]
    # an ungated model is served: its numbers say so and there is no routed row
    assert payload["serving"] == "served" and payload["comparison"][0]["serving"] == "served" and payload["routed_in_domain"] is None
    args = ["finetune", "--catalog", "sample", "--base", "efficientnet-lite0", "--out", str(tmp_path / "x"), "--workdir", str(ft_workdir)]
    assert main(args) == 2
    assert "no text tower" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ measurement


def test_photo_shift_changes_backdrop_and_keeps_size(tiny_fashion):
    from vrec_utils.images import load_rgb
    from vrec_utils.studies.finetune_study import photo_shift_image

    image = load_rgb(tiny_fashion.image_path(tiny_fashion.ids[0]))
    shifted = photo_shift_image(image)
    assert shifted.size == image.size and shifted.mode == "RGB"
    corner = np.asarray(shifted)[:3, :3].reshape(-1, 3)
    assert (corner < 235).any()  # the white backdrop is gone


def test_measure_finetune_end_to_end(mini_run, tiny_fashion, ft_workdir):
    from vrec_utils.studies.finetune_study import measure_finetune

    m = measure_finetune(
        tiny_fashion, ft_workdir, config=FAST, holdout=("masterCategory=Apparel",), queries={"black watch": "Watches"},
        n_bootstrap=200, device="cpu", progress=False,
    )
    assert m.tuned_model == mini_run.model_name  # the finished run is reused, not retrained
    checks = m.checks_table()
    assert checks["check"].str.startswith("in-domain").any() and checks["check"].str.contains("synthetic photo shift").any()
    assert checks["check"].str.contains("no guard").any() and len(checks) == 5
    assert (checks["diff_ci_low"] <= checks["diff"]).all() and (checks["diff"] <= checks["diff_ci_high"]).all()
    assert set(m.alpha_sweep["alpha"]) == set(ALPHA_GRID)
    eval_ids = set(m.eval_ids)
    assert set(m.text_results["item_id"]) <= eval_ids and len(m.text_results) == 5
    query = m.example_queries(tiny_fashion, 1)[0]
    rows = m.similar_rows(tiny_fashion, query, 3)
    assert all(set(f["item_id"]) <= eval_ids - {query} for f in rows.values())
    for frame in rows.values():  # found through the index layer, in the columns notebook 07 shows
        assert list(frame.columns) == ["query_id", "rank", "item_id", "score", "title", m.label]
        assert list(frame["rank"]) == [1, 2, 3] and frame["score"].is_monotonic_decreasing
    assert list(m.text_results.columns[:4]) == ["query_text", "rank", "item_id", "score"]


@pytest.mark.slow
def test_notebook_07_runs_headless_in_the_smoke_profile(tmp_path):
    from vrec_utils.report import run_report

    result = run_report(
        "smoke", out=tmp_path / "out", workdir=tmp_path / "work", sample_size=300, notebooks=["07"], progress=False,
        log=lambda line: None,
    )
    figures = {p.name for p in result.figures}
    assert {"07_loss_steps.png", "07_loss_epochs.png", "07_text_search.png", "07_before_after_0.png"} <= figures
    assert (result.tables_dir / "finetune_checks.csv").is_file()
