"""Robustness recipes for mini-SigLIP fine-tuning, as small pieces the loop composes.

A recipe is a set of :class:`~vrec_utils.train.config.FinetuneConfig` fields (:data:`RECIPES`):

* ``mix``: how the tuned image head meets the base, either the **output mix**
  ``normalise((1 - a) x + a normalise(h(x)))`` or **WiSE-FT** (Wortsman et al. 2022): the image
  head's weights interpolated between the initial (identity) head and the tuned one,
  :func:`interpolate_state`, so coefficient 0 is the base model and 1 the tuned model exactly;
* ``distill``: :func:`~vrec_utils.train.loss.similarity_distillation`, keeping the tuned in-batch
  image-image similarities close to the base model's;
* ``l2sp``: :func:`~vrec_utils.train.loss.l2_sp` (Li et al. 2018), pulling the image head's
  weights toward their initial (identity) values;
* ``image_rank`` / ``image_head="diagonal"``: low-capacity image heads (``x + B A x``, or a
  per-dimension scale ``x * (1 + s) + c``), both the identity at start;
* ``probe_epochs``: linear-probe-then-fine-tune: the text head first learns to meet the frozen
  (identity) image head, then both train;
* ``augment_views``: photo-like augmentations (:func:`photo_augment`: backdrop, light, crop,
  perspective) of training images, written once as a catalog and embedded through the normal
  cache (:func:`augmented_features`), so no tower runs during training;
* ``select_on="shift"``: the coefficient is chosen on the *selection half* of a shifted catalog
  (:func:`shift_halves`, split by ``sender_id``); the other half is the one to report on.
  ``shift_tolerance``: how much nDCG@5 a coefficient may lose there against the base;
* ``in_domain_gate``: :func:`fit_in_domain_gate`, the output mix served only to images within the
  training distribution (Mahalanobis distance), the base embedding to all others.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch import nn

from ..catalog import Catalog, hash_unit_interval, load_catalog
from ..extract import extract_image_embeddings
from ..images import load_rgb
from ..models.base import Embedder
from ..store import slugify
from .config import FinetuneConfig

AUGMENT_VERSION = "photo-augment-v1"  # bump when photo_augment changes: the augmented catalog's folder name

ROUND2_TOLERANCE = 0.005  # nDCG@5 a round-2 coefficient may lose on the selection half (half of the 0.01 hold margin)
_ROUND2 = {"select_on": "shift", "shift_tolerance": ROUND2_TOLERANCE}
_GATE = {"in_domain_gate": 0.99}  # the output mix for images within the 99th percentile of validation distances

#: The recipes of the study (``benchmarks/bench_finetune_recipes.py``): FinetuneConfig overrides.
#: ``{shift}`` stands for the shifted catalog's path.
RECIPES: dict[str, dict[str, Any]] = {
    "alpha-mix": {},  # the output mix chosen on in-domain validation (before this study)
    "alpha-mix-shift": {"select_on": "shift"},
    "wise-ft": {"mix": "weights"},
    "wise-ft-shift": {"mix": "weights", "select_on": "shift"},
    "lp-ft": {"probe_epochs": 3},
    "distill": {"distill": 1.0},
    "augment": {"augment_views": 1},
    "distill-augment-wise-ft-shift": {"distill": 1.0, "augment_views": 1, "mix": "weights", "select_on": "shift"},
    # Round 2 (benchmarks/results/finetune_recipes_round2.md): every candidate chooses its output mix
    # on the selection half with ROUND2_TOLERANCE, and every training is measured with and without
    # the in-domain gate; the study's default is the best validation gain among them.
    "alpha-mix-shift-tol": {**_ROUND2},
    "lp-ft-shift": {**_ROUND2, "probe_epochs": 3},
    "l2sp-shift": {**_ROUND2, "l2sp": 1e-3},
    "distill3-augment-shift": {**_ROUND2, "distill": 3.0, "augment_views": 1},
    "gated-alpha-mix-shift": {**_ROUND2, **_GATE},
    "gated-lp-ft-shift": {**_ROUND2, **_GATE, "probe_epochs": 3},
    "gated-l2sp-shift": {**_ROUND2, **_GATE, "l2sp": 1e-3},
    "gated-distill3-augment-shift": {**_ROUND2, **_GATE, "distill": 3.0, "augment_views": 1},
    # Round 3 (benchmarks/results/finetune_recipes_round3.md): candidates for more in-domain gain
    # inside the gate, each measured with and without it (the rule and the protocol of round 2).
    "diagonal-shift": {**_ROUND2, "image_head": "diagonal"},
    "gated-diagonal-shift": {**_ROUND2, **_GATE, "image_head": "diagonal"},
    "low-rank-shift": {**_ROUND2, "image_rank": 16},
    "gated-low-rank-shift": {**_ROUND2, **_GATE, "image_rank": 16},
    "alpha-mix-60ep-shift": {**_ROUND2, "epochs": 60},
    "gated-alpha-mix-60ep-shift": {**_ROUND2, **_GATE, "epochs": 60},
    "distill10-augment-shift": {**_ROUND2, "distill": 10.0, "augment_views": 1},
    "gated-distill10-augment-shift": {**_ROUND2, **_GATE, "distill": 10.0, "augment_views": 1},
    # Round 4 (benchmarks/results/finetune_recipes_round4.md): efficientnet-lite0's last image block
    # (conv_head + BN) trains with the heads on cached feature maps (trainable="last"), and two views.
    "block-distill10-augment-shift": {**_ROUND2, "trainable": "last", "distill": 10.0, "augment_views": 1},
    "gated-block-distill10-augment-shift": {**_ROUND2, **_GATE, "trainable": "last", "distill": 10.0, "augment_views": 1},
    "distill10-augment2-shift": {**_ROUND2, "distill": 10.0, "augment_views": 2},
    "gated-distill10-augment2-shift": {**_ROUND2, **_GATE, "distill": 10.0, "augment_views": 2},
    "block-distill10-augment2-shift": {**_ROUND2, "trainable": "last", "distill": 10.0, "augment_views": 2},
    "gated-block-distill10-augment2-shift": {**_ROUND2, **_GATE, "trainable": "last", "distill": 10.0, "augment_views": 2},
    # Round 5 (benchmarks/results/finetune_recipes_round5.md): the block's lr factor 0.3 instead of 0.1 (trained in round 6)
    "block-lr3-distill10-augment-shift": {**_ROUND2, "trainable": "last", "block_lr_scale": 0.3, "distill": 10.0, "augment_views": 1},
    "gated-block-lr3-distill10-augment-shift": {**_ROUND2, **_GATE, "trainable": "last", "block_lr_scale": 0.3, "distill": 10.0, "augment_views": 1},
}

#: The recipe ``vrec finetune --base mini-siglip`` uses: round 6's pick
#: (benchmarks/results/finetune_recipes_round6.md), by round 5's rule unchanged over all 26 runs of rounds
#: 2-6: per recipe the coefficient with the best in-domain validation nDCG@5 among those losing at most
#: 0.005 on clothing-dev's selection half; a (recipe, serving mode) is eligible if, in one index of the
#: validation part and the selection half, photo -> studio and studio queries each lose at most 0.005;
#: then the best validation gain. Efficientnet-lite0's last image block tuned at lr x 0.3, one augmented
#: view per training image, coefficient 1.0 (validation +0.051), served *routed* (``vrec_utils.search``:
#: a query outside the model's in-domain gate searches efficientnet-lite0's vectors; served as one index
#: it loses -0.130 photo -> studio on the selection sets, routed +0.0003). Measured once afterwards, on
#: fashion-small's evaluation split as served to users (routed): +0.0379 [+0.0310, +0.0449] nDCG@5 (its
#: served vectors ranked by every query: +0.0347 [+0.0279, +0.0421]); +0.0008 [-0.0003, +0.0026] on
#: clothing-dev's reported half. Round 5's default (two views, lr x 0.1): +0.0302 routed. The saved model
#: records ``serving``. Without a shift catalog the coefficient falls back to in-domain validation
#: (``recipe_config(..., fallback=True)``); the gate and the routing still apply.
DEFAULT_RECIPE = "gated-block-lr3-distill10-augment-shift"


def recipe_config(
    name: str, base: FinetuneConfig | None = None, shift_catalog: str | os.PathLike | None = None, *, fallback: bool = False
) -> FinetuneConfig:
    """The config of recipe ``name`` on top of ``base``. Recipes that select on a shifted set
    need ``shift_catalog``; without one, ``fallback`` chooses on in-domain validation instead
    (recorded as ``<name>@val``), else it is an error."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    overrides = dict(RECIPES[name])
    if overrides.get("select_on") == "shift":
        if shift_catalog is None and not fallback:
            raise ValueError(f"recipe {name!r} chooses its coefficient on a shifted catalog; pass shift_catalog")
        if shift_catalog is None:
            overrides["select_on"], name = "val", f"{name}@val"
        else:
            overrides["shift_catalog"] = str(Path(shift_catalog).expanduser().resolve())
    return dataclasses.replace(base or FinetuneConfig(), recipe=name, **overrides)


# ----------------------------------------------------------------------------- WiSE-FT


def interpolate_state(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], coefficient: float, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1 - c) * base + c * tuned`` for the tensors whose name starts with ``prefix``,
    ``tuned`` for the others. ``c = 0`` returns ``base``'s tensors and ``c = 1`` ``tuned``'s, exactly."""
    if set(base) != set(tuned):
        raise ValueError(f"state dicts differ in keys: {sorted(set(base) ^ set(tuned))}")
    if not 0.0 <= coefficient <= 1.0:
        raise ValueError(f"coefficient must be in [0, 1], got {coefficient}")
    out = {}
    for key, value in tuned.items():
        if not key.startswith(prefix):
            out[key] = value.clone()
        elif coefficient == 0.0:
            out[key] = base[key].clone()
        elif coefficient == 1.0:
            out[key] = value.clone()
        else:
            out[key] = torch.lerp(base[key].to(value.dtype), value, float(coefficient))
    return out


def wise_ft_heads(initial: dict[str, torch.Tensor], tuned: nn.Module, coefficient: float) -> nn.Module:
    """A copy of mini-SigLIP heads ``tuned`` whose image head is interpolated (WiSE-FT) between
    ``initial`` (the untrained identity head: coefficient 0 serves the base model) and ``tuned``."""
    heads = copy.deepcopy(tuned)
    heads.load_state_dict(interpolate_state(initial, tuned.state_dict(), coefficient, prefix="image_head."))
    return heads


# ------------------------------------------------------------------------ augmentations

_BACKDROPS = ((181, 146, 108), (150, 150, 150), (214, 204, 186), (92, 84, 78), (200, 170, 150), (120, 130, 140))


def _perspective_coefficients(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """PIL's 8 PERSPECTIVE coefficients mapping output corners ``dst`` to input corners ``src``."""
    rows = []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.asarray(rows, dtype=np.float64), src.reshape(-1).astype(np.float64)).tolist()


def photo_augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A catalogue image made to look like a photo taken at home: the white backdrop replaced by
    a textured floor/bed/table colour with a light gradient, a perspective tilt, a random crop,
    and changed light (brightness, contrast, colour cast, softness)."""
    image = image.convert("RGB")
    w, h = image.size
    pixels = np.asarray(image, dtype=np.float32)
    backdrop = (pixels >= 232).all(axis=-1)
    colour = np.asarray(_BACKDROPS[rng.integers(len(_BACKDROPS))], dtype=np.float32) + rng.normal(0, 12, 3)
    ramp = np.linspace(1.0 - rng.uniform(0, 0.25), 1.0, h, dtype=np.float32)[:, None, None]
    texture = rng.normal(0, rng.uniform(2, 10), (h, w, 1)).astype(np.float32)
    ground = np.clip(colour * ramp + texture, 0, 255)
    pixels[backdrop] = ground[backdrop]
    shot = Image.fromarray(pixels.astype(np.uint8))
    corners = np.asarray([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    moved = corners + rng.uniform(-0.08, 0.08, (4, 2)) * [w, h]
    fill = tuple(int(c) for c in np.clip(colour, 0, 255))
    shot = shot.transform((w, h), Image.Transform.PERSPECTIVE, _perspective_coefficients(corners, moved), Image.Resampling.BILINEAR, fillcolor=fill)
    scale = rng.uniform(0.75, 1.0)
    cw, ch = max(2, round(w * scale)), max(2, round(h * scale))
    left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    shot = shot.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
    shot = ImageEnhance.Brightness(shot).enhance(rng.uniform(0.6, 1.1))
    shot = ImageEnhance.Contrast(shot).enhance(rng.uniform(0.7, 1.1))
    cast = np.asarray(shot, dtype=np.float32) * (1.0 + rng.uniform(-0.08, 0.08, 3))
    shot = Image.fromarray(np.clip(cast, 0, 255).astype(np.uint8))
    return shot.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))


def augmented_ids(ids: list[str], views: int) -> list[str]:
    return [f"{i}~aug{v}" for v in range(1, views + 1) for i in ids]


def augmented_catalog(catalog: Catalog, ids: list[str], views: int, seed: int, directory: str | os.PathLike) -> Catalog:
    """A generic-layout catalog of ``views`` :func:`photo_augment` copies of each of ``ids``
    (ids ``<id>~aug<v>``), seeded per (seed, id, view); reused when already written."""
    directory = Path(directory)
    csv = directory / "catalog.csv"
    out_ids = augmented_ids(ids, views)
    if csv.is_file() and pd.read_csv(csv, dtype=str, keep_default_na=False)["id"].tolist() == out_ids:
        return load_catalog(csv)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for v in range(1, views + 1):
        for item_id in ids:
            digest = hashlib.sha256(f"{AUGMENT_VERSION}-{seed}-{item_id}-{v}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
            name = f"images/{slugify(item_id)}-{hashlib.sha256(item_id.encode()).hexdigest()[:8]}-aug{v}.jpg"
            photo_augment(load_rgb(catalog.image_path(item_id)), rng).save(directory / name, quality=90)
            files.append(name)
    pd.DataFrame({"id": out_ids, "image": files}).to_csv(csv, index=False)
    return load_catalog(csv)


def augmented_views_catalog(catalog: Catalog, ids: list[str], config: FinetuneConfig, workdir: Path) -> tuple[list[str], Catalog]:
    """(the seeded subset of ``ids`` that gets views, the catalog of their augmented views)."""
    chosen = list(ids)
    if config.augment_max_items is not None and len(chosen) > config.augment_max_items:
        order = np.argsort(hash_unit_interval(chosen, f"augment-{config.seed}"), kind="stable")
        chosen = [chosen[i] for i in sorted(order[: config.augment_max_items])]
    key = hashlib.sha256("\n".join(chosen).encode()).hexdigest()[:10]
    folder = Path(workdir) / "augmented" / f"{slugify(catalog.name)}-{catalog.fingerprint()[:8]}-{AUGMENT_VERSION}-s{config.seed}-v{config.augment_views}-{key}"
    return chosen, augmented_catalog(catalog, chosen, config.augment_views, config.seed, folder)


def augmented_features(
    catalog: Catalog, ids: list[str], config: FinetuneConfig, workdir: Path, tower: Embedder, progress: bool
) -> dict[str, np.ndarray]:
    """``{id: (views, dim) features}`` of the augmented views of a seeded subset of ``ids``
    (``config.augment_max_items``), embedded by the frozen ``tower`` through the embedding cache."""
    if config.augment_views <= 0 or not ids:
        return {}
    chosen, views = augmented_views_catalog(catalog, ids, config, workdir)
    emb = extract_image_embeddings(views, tower, workdir, progress=progress).embeddings
    have = set(map(str, emb.ids))
    out = {}
    for item_id in chosen:
        names = [n for n in augmented_ids([item_id], config.augment_views) if n in have]
        if names:
            out[item_id] = np.asarray(emb.vectors_for(names), dtype=np.float32)
    return out


# ------------------------------------------------------------------------ in-domain gate


def fit_in_domain_gate(train: torch.Tensor, val: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, precision, threshold) of an in-domain gate: a Ledoit-Wolf shrunk Gaussian fitted to
    the ``train`` features, and the ``quantile`` of the squared Mahalanobis distances of the held-out
    ``val`` features (training features sit closer than new in-domain ones would)."""
    from sklearn.covariance import LedoitWolf  # ~1 s to import; only gated runs need it

    if len(train) < 2 or len(val) < 1:
        raise ValueError(f"the in-domain gate needs >= 2 training and >= 1 validation features, got {len(train)} and {len(val)}")
    fit = LedoitWolf().fit(train.detach().cpu().double().numpy())
    mean = torch.from_numpy(fit.location_).float()
    precision = torch.from_numpy(fit.precision_).float()
    centred = val.detach().cpu().float() - mean
    distances = ((centred @ precision) * centred).sum(dim=-1).double().numpy()
    return mean, precision, float(np.quantile(distances, quantile))


# ------------------------------------------------------------------ shifted selection set


def shift_halves(catalog: Catalog, group: str = "sender_id", seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(selection ids, reported ids): ``catalog`` split by ``group`` (seeded hash of the group
    value), so that no group (sender) has photos on both sides."""
    catalog.require_column(group)
    groups = catalog.items[group].astype(str)
    values = sorted(groups.unique())
    selected = {v for v, u in zip(values, hash_unit_interval(values, f"shift-select-{seed}")) if u < 0.5}
    is_select = groups.isin(selected).to_numpy()
    return tuple(catalog.items.index[is_select]), tuple(catalog.items.index[~is_select])


@dataclass(frozen=True)
class SelectionSet:
    """The shifted catalog's selection half as the loop scores it: base features and labels."""

    path: str
    ids: tuple[str, ...]
    report_ids: tuple[str, ...]  # the other half: never scored here
    features: torch.Tensor  # (n, dim) frozen image-tower features (the base model's embeddings)
    labels: np.ndarray
    groups: tuple[str, ...]  # the group values (senders) of the selection half
    maps: torch.Tensor | None = None  # float16 feature maps of the same rows (recipes that tune the last image block)

    def describe(self) -> dict[str, Any]:
        return {
            "catalog": self.path, "n_items": len(self.ids), "n_groups": len(self.groups), "groups": list(self.groups),
            "ids_sha256": hashlib.sha256("\n".join(self.ids).encode()).hexdigest(), "n_reported_items": len(self.report_ids),
        }  # fmt: skip


def load_selection_set(config: FinetuneConfig, workdir: Path, tower: Embedder, progress: bool) -> SelectionSet | None:
    """The selection half of ``config.shift_catalog`` (None unless ``select_on == "shift"``)."""
    if config.select_on != "shift":
        return None
    shifted = load_catalog(config.shift_catalog)
    shifted.require_column(config.shift_label)
    select, report = shift_halves(shifted, config.shift_group, config.shift_seed)
    emb = extract_image_embeddings(shifted.subset(list(select)), tower, workdir, progress=progress).embeddings
    ids = tuple(i for i in map(str, emb.ids) if i in set(select))
    features = torch.from_numpy(np.asarray(emb.vectors_for(list(ids)), dtype=np.float32))
    labels = shifted.items.loc[list(ids), config.shift_label].astype(str).to_numpy()
    groups = tuple(sorted(shifted.items.loc[list(ids), config.shift_group].astype(str).unique()))
    return SelectionSet(str(config.shift_catalog), ids, report, features, labels, groups)
