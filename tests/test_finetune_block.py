"""Tuning efficientnet-lite0's last image block (mini-SigLIP, ``trainable="last"``) on cached maps."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from vrec_utils.catalog import load_catalog, split_catalog
from vrec_utils.images import load_rgb
from vrec_utils.models import create_embedder
from vrec_utils.models import mini_siglip as ms
from vrec_utils.train import FinetuneConfig, finetune, label_ndcg, recipe_config, shift_halves
from vrec_utils.train.embed import extract_finetuned_embeddings
from vrec_utils.train.feature_maps import FeatureMaps, extract_feature_maps, feature_maps_dir
from vrec_utils.train.pairs import make_pairs

FAST = FinetuneConfig(epochs=2, batch_size=32, lr=3e-3, warmup_steps=2, val_fraction=0.2, eval_fraction=0.25)


@pytest.fixture(scope="module")
def tower():
    return create_embedder("efficientnet-lite0", device="cpu")


def _pixels(tower, catalog, ids):
    return torch.stack([tower.image_transform(load_rgb(catalog.image_path(i))) for i in ids])


def test_cached_map_forward_equals_the_full_tower(sample_catalog, tower, tmp_path):
    """Cached float16 maps through the block copy = the tower's own conv_head/BN/pool on the same
    (float16-rounded) maps, and within float16 rounding of the full tower's pooled features."""
    catalog = sample_catalog.head(12)
    cached = extract_feature_maps(catalog, tower, tmp_path, batch_size=5, progress=False)
    pixels = _pixels(tower, catalog, catalog.ids)
    with torch.no_grad():
        maps = tower.encode_maps(pixels)
        full = F.normalize(tower.encode_image(pixels), dim=-1)
        assert torch.allclose(tower.pool_maps(maps), tower.encode_image(pixels), atol=1e-6)  # the two-step tower is the tower
        stored = cached.tensor(list(catalog.ids), catalog)
        assert stored.dtype == torch.float16 and stored.shape == (12, 320, 7, 7)
        assert torch.allclose(stored.float(), maps.half().float(), atol=1e-2, rtol=1e-3)  # batch composition only
        block = ms.TunedBlock.from_tower(tower.model).eval()
        direct = F.normalize(tower.pool_maps(stored.float()), dim=-1)
        assert torch.allclose(block(stored), direct, atol=1e-6)
        assert torch.allclose(block(stored), full, atol=2e-3) and not torch.equal(block(stored), full)


def test_maps_are_identical_to_the_per_image_transform_path(sample_catalog, tower, tmp_path):
    """The cache decodes like vrec extract (threads, uint8 PIL stage, per-batch normalisation): the
    stored maps equal, bit for bit, the old path's (per-image transform, stacked, channels_last) on
    the same batches of real images."""
    from vrec_utils.images import split_transform

    assert split_transform(tower.image_transform) is not None  # the fast path is the one under test
    catalog = sample_catalog.head(12)
    cached = extract_feature_maps(catalog, tower, tmp_path, batch_size=5, progress=False)
    ids = list(catalog.ids)
    old = []
    with torch.inference_mode():
        for begin in range(0, len(ids), 5):  # the same batches as the cache
            pixels = _pixels(tower, catalog, ids[begin : begin + 5])
            if tower.prefers_channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            old.append(tower.encode_maps(pixels).float().numpy().astype(np.float16))
    np.testing.assert_array_equal(cached.tensor(ids, catalog).numpy(), np.concatenate(old))


def test_map_cache_resumes_and_refuses_changed_images(sample_catalog, tower, tmp_path, monkeypatch):
    from vrec_utils.train import feature_maps

    monkeypatch.setattr(feature_maps, "CHUNK", 4)  # rows written per progress step: 16
    folder = tmp_path / "cat"
    (folder / "images").mkdir(parents=True)
    ids = sample_catalog.ids[:35]
    for item in ids:
        shutil.copy(sample_catalog.image_path(item), folder / "images" / f"{item}.jpg")
    pd.DataFrame({"id": ids, "image": [f"images/{i}.jpg" for i in ids]}).to_csv(folder / "catalog.csv", index=False)
    catalog = load_catalog(folder / "catalog.csv")
    whole = extract_feature_maps(catalog, tower, tmp_path / "a", progress=False)
    again = extract_feature_maps(catalog, tower, tmp_path / "b", progress=False)
    directory = feature_maps_dir(tmp_path / "b", catalog, tower)
    progress = json.loads((directory / "progress.json").read_text())
    (directory / "progress.json").write_text(json.dumps({**progress, "done": 16}))  # killed after its first step
    maps = np.memmap(directory / "maps.f16", dtype=np.float16, mode="r+", shape=again.maps.shape)
    maps[16:] = 0
    maps.flush()
    with pytest.raises(ValueError, match="of 16 of 35 items only"):
        FeatureMaps.open(directory)
    resumed = extract_feature_maps(catalog, tower, tmp_path / "b", progress=False)
    assert np.allclose(resumed.maps, whole.maps, atol=1e-2) and np.abs(resumed.maps[16:].astype(np.float32)).sum() > 0
    shutil.copy(sample_catalog.image_path(sample_catalog.ids[-1]), folder / "images" / f"{ids[0]}.jpg")
    with pytest.raises(ValueError, match="changed since their maps were cached"):
        resumed.tensor([ids[0]], catalog)


@pytest.fixture(scope="module")
def block_run(sample_catalog, tmp_path_factory):
    """A gated run of the block recipe: distillation, one augmented view, the shift selection table."""
    folder = tmp_path_factory.mktemp("shifted-block")
    (folder / "images").mkdir()
    rows = []
    for n, item in enumerate(sample_catalog.ids[150:190]):
        shutil.copy(sample_catalog.image_path(item), folder / "images" / f"{item}.jpg")
        rows.append({"id": f"s{item}", "image": f"images/{item}.jpg", "label": sample_catalog.items.at[item, "masterCategory"], "sender_id": str(n % 10)})
    pd.DataFrame(rows).to_csv(folder / "catalog.csv", index=False)
    shifted = load_catalog(folder / "catalog.csv")
    # alpha fixed: on 40 photos the selection rule may keep the base (alpha 0), which would test nothing
    config = dataclasses.replace(recipe_config("gated-block-distill10-augment-shift", FAST, folder / "catalog.csv"), augment_max_items=20, alpha=0.8)
    work = tmp_path_factory.mktemp("block-work")
    catalog = sample_catalog.head(128)
    result = finetune(catalog, "mini-siglip", work / "run", workdir=work, config=config, device="cpu", progress=False)
    return result, catalog, shifted, work


def test_block_run_trains_the_block_and_records_it(block_run, tower):
    result, *_ = block_run
    meta = json.loads((result.model_dir / "vrec_model.json").read_text())
    assert meta["heads"]["block_channels"] == 320 and meta["recipe"]["trainable"] == "last"
    assert meta["recipe"]["name"] == "gated-block-distill10-augment-shift" and meta["recipe"]["selection"]["shift"]["n_items"] > 0
    heads, _ = ms.load_heads(result.model_dir, meta)
    original = ms.TunedBlock.from_tower(tower.model)
    assert not torch.equal(heads.block.conv.weight, original.conv.weight)  # the block trained
    assert torch.equal(heads.block.bn.running_mean, original.bn.running_mean)  # its BN statistics stayed frozen


def test_block_model_reloads_and_embeds_raw_images_as_evaluated(block_run):
    """Raw images through the saved model (tower to the maps, tuned block, heads) = the cached path
    the study evaluates with; two loads agree exactly; coefficient 0 is efficientnet-lite0 exactly."""
    result, catalog, _, work = block_run
    val_ids = json.loads((result.out / "split.json").read_text())["finetune_val"]
    cached = extract_finetuned_embeddings(catalog, result.model_name, work, device="cpu", progress=False)
    first, second = create_embedder(result.model_name, device="cpu"), create_embedder(result.model_name, device="cpu")
    assert first.needs_maps
    pixels = _pixels(first, catalog, val_ids)
    with torch.no_grad():
        a, b = first.encode_image(pixels), second.encode_image(pixels)
        assert torch.equal(a, b)
        assert np.allclose(a.numpy(), cached.vectors_for(val_ids), atol=1e-5)
        labels = catalog.items.loc[val_ids, FAST.label].astype(str).to_numpy()
        expected = result.alpha_table.loc[result.alpha_table["alpha"] == result.alpha, "val_ndcg@5"].item()
        assert label_ndcg(np.asarray(cached.vectors_for(val_ids)), labels) == pytest.approx(expected, abs=1e-6)
        base = F.normalize(create_embedder("efficientnet-lite0", device="cpu").encode_image(pixels), dim=-1)
        assert torch.equal(first.image_from_features(base, alpha=0.0), F.normalize(base, dim=-1))
        zero = ms.load_mini_siglip(result.model_dir, alpha=0.0)
        assert torch.allclose(zero.encode_image(pixels), base, atol=1e-6)  # the frozen block's features, normalised
    assert result.alpha == 0.8 and not np.allclose(a.numpy(), base.numpy(), atol=1e-3)


def test_block_model_embeds_a_catalog_in_chunks_each_item_once(block_run, tmp_path, monkeypatch):
    """A fresh workdir, several chunks through the heads: every item filed once, each with the
    vector the saved model gives its raw image (a chunk loop that overlapped filed items twice)."""
    result, catalog, _, _ = block_run
    monkeypatch.setattr("vrec_utils.train.embed.MAPS_CHUNK", 48)  # 128 items: 3 chunks
    embeddings = extract_finetuned_embeddings(catalog, result.model_name, tmp_path, device="cpu", progress=False)
    ids = list(map(str, embeddings.ids))
    assert len(ids) == len(set(ids)) == len(catalog.items)
    model = create_embedder(result.model_name, device="cpu")
    some = [ids[5], ids[60], ids[120]]
    with torch.no_grad():
        direct = F.normalize(model.encode_image(_pixels(model, catalog, some)), dim=-1)
    assert np.allclose(direct.numpy(), embeddings.vectors_for(some), atol=1e-5)


def test_block_selection_reads_the_selection_half_only(block_run, monkeypatch):
    """The block recipe's selection maps are the selection half's, its training maps the train
    split's rows only, its augmented views those of training items."""
    from vrec_utils.train import feature_maps, pair_models

    result, catalog, shifted, work = block_run
    asked: list[list[str]] = []
    real = feature_maps.FeatureMaps.tensor
    monkeypatch.setattr(feature_maps.FeatureMaps, "tensor", lambda self, ids, cat=None: asked.append(list(ids)) or real(self, ids, cat))
    config = dataclasses.replace(recipe_config("block-distill10-augment-shift", FAST, shifted.root / "catalog.csv"), augment_max_items=20)
    pairs = make_pairs(catalog, config)
    model = pair_models.create_pair_model("mini-siglip", catalog, pairs, config, work, torch.device("cpu"), False, False)
    select, report = shift_halves(shifted, "sender_id", seed=0)
    eval_ids = set(split_catalog(catalog, FAST.eval_fraction, FAST.split_seed).eval)
    shifted_asks = [ids for ids in asked if ids and ids[0].startswith("s")]
    assert shifted_asks == [list(model.selection.ids)] and set(model.selection.ids) <= set(select)
    assert set().union(*map(set, asked)).isdisjoint(eval_ids | set(report))
    views = [i.rsplit("~aug", 1)[0] for ids in asked for i in ids if "~aug" in i]
    assert views and set(views) <= set(pairs.train_ids)
    assert model.maps.shape[0] == len(model.ids) and model.selection.maps.shape[0] == len(model.selection.ids)


def test_block_settings_refused_with_a_reason(sample_catalog, tmp_path):
    catalog = sample_catalog.head(40)
    for config, match in (
        (dataclasses.replace(FAST, trainable="last", last_blocks=2), "last_blocks=2"),
        (dataclasses.replace(FAST, trainable="last", mix="weights"), "mix='output'"),
    ):
        with pytest.raises(ValueError, match=match):
            finetune(catalog, "mini-siglip", tmp_path / "run", workdir=tmp_path, config=config, device="cpu", progress=False)
    with pytest.raises(ValueError, match="block_lr_scale"):
        FinetuneConfig(block_lr_scale=0)
    heads = ms.MiniSiglipHeads(ms.HeadSpec(block_channels=320))
    with pytest.raises(ValueError, match="feature maps"):
        heads.image(F.normalize(torch.randn(2, 1280), dim=-1), 0.5)


def test_alpha_sweep_of_a_block_model_reads_its_maps(block_run):
    """Notebook 07's coefficient sweep of a block model: coefficient 0 scores as efficientnet-lite0,
    the saved coefficient as the saved model itself."""
    from vrec_utils.evaluation import evaluate_models
    from vrec_utils.studies.finetune_study import _alpha_sweep

    result, catalog, _, work = block_run
    split = split_catalog(catalog, FAST.eval_fraction, FAST.split_seed)
    sweep, _ = _alpha_sweep(catalog, work, result.model_name, "efficientnet-lite0", split, FAST.label, "cpu", n_bootstrap=50)
    direct = evaluate_models(catalog, work, ["efficientnet-lite0", result.model_name], label=FAST.label, split=split, ks=(5,), metrics=["ndcg@5"], n_bootstrap=50)
    means = direct.summary().set_index("model")["mean"]
    at = lambda a: sweep.loc[(sweep["alpha"] - a).abs() < 1e-9, "mean"].item()
    assert at(0.0) == pytest.approx(means["efficientnet-lite0"], abs=1e-9)
    assert at(result.alpha) == pytest.approx(means[result.model_name], abs=1e-6)
