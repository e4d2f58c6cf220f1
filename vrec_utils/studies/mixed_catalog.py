"""A mixed catalogue: studio shots and home photos searched in ONE index.

A gated fine-tune (:func:`vrec_utils.train.fit_in_domain_gate`) serves its tuned mix to images that
look like its training catalogue and the base embedding to all others, so a catalogue that mixes
studio shots and home photos holds vectors of two spaces side by side. :func:`mixed_catalog_check`
measures what that does to search, against the base model and the same tuned heads without the gate.

Relevance needs one taxonomy for both sides. Today each catalogue is evaluated on its own label
(fashion-small: ``articleType``; clothing-dev: ``label``, within its reported half); nothing maps one
onto the other. :func:`shared_kinds` does, coarsely (:data:`PHOTO_KINDS`, :data:`STUDIO_KINDS`):

* clothing-dev's T-Shirt, Longsleeve and Polo are one kind, because fashion-small files polos and
  long-sleeve tees under ``Tshirts`` (their titles say so); Top and Blouse are one kind (``Tops``);
* every footwear type of fashion-small is clothing-dev's ``Shoes``; Trousers, Jeans and Track Pants
  are ``Pants``; Jackets and Rain Jacket are ``Outwear``; Sweatshirts are ``Hoodie``; Caps and Hat are
  ``Hat``; Innerwear Vests are ``Undershirt``;
* kinds with no counterpart keep their own name, prefixed by side (``studio:Watches``,
  ``photo:Body``): relevant within their side only.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..catalog import Catalog, CatalogReport, split_catalog
from ..evaluation import evaluate_embeddings
from ..evaluation.candidates import duplicate_keys
from ..evaluation.config import UNFILTERED
from ..evaluation.statistics import bootstrap_ci
from ..metrics import ideal_from_counts, ndcg_at_k
from ..models import create_embedder
from ..models.local import inside_gate
from ..store import Embeddings, load_embeddings
from ..train import FinetuneConfig, extract_finetuned_embeddings, make_pairs, shift_halves
from ..train.feature_maps import extract_feature_maps
from .recipe_study import loses_at_most

#: clothing-dev ``label`` -> shared kind
PHOTO_KINDS = {
    "T-Shirt": "T-shirt", "Longsleeve": "T-shirt", "Polo": "T-shirt", "Shirt": "Shirt", "Pants": "Pants",
    "Shorts": "Shorts", "Dress": "Dress", "Skirt": "Skirt", "Outwear": "Outwear", "Blazer": "Blazer",
    "Hoodie": "Hoodie", "Hat": "Hat", "Top": "Top", "Blouse": "Top", "Undershirt": "Undershirt", "Shoes": "Shoes",
}  # fmt: skip
#: fashion-small ``articleType`` -> shared kind (footwear: every type whose masterCategory is Footwear)
STUDIO_KINDS = {
    "Tshirts": "T-shirt", "Shirts": "Shirt", "Trousers": "Pants", "Jeans": "Pants", "Track Pants": "Pants",
    "Shorts": "Shorts", "Dresses": "Dress", "Skirts": "Skirt", "Jackets": "Outwear", "Rain Jacket": "Outwear",
    "Blazers": "Blazer", "Sweatshirts": "Hoodie", "Caps": "Hat", "Hat": "Hat", "Tops": "Top", "Innerwear Vests": "Undershirt",
}  # fmt: skip
VARIANTS = ("base", "tuned, no gate", "tuned, gated (served)", "routed by the query's gate")
#: Which items the mixed index holds: "evaluation" (round 4's report: the studio evaluation split and
#: the photos' reported half) or "selection" (what a rule may read: the validation part of the studio
#: train split and the photos' selection half; never an evaluation item or a reported photo)
SETS = ("evaluation", "selection")
#: Serving modes the rule checks: the served vectors for everything, or routing by the query's gate
SERVING = {"served": VARIANTS[2], "routed": VARIANTS[3]}
MIXED_TOLERANCE = 0.005  # round 5's rule: photo -> studio and studio queries may lose at most this (mean nDCG@5)
COMPARISONS = ((VARIANTS[0], VARIANTS[1]), (VARIANTS[0], VARIANTS[2]), (VARIANTS[0], VARIANTS[3]), (VARIANTS[2], VARIANTS[3]))


def shared_kinds(items: pd.DataFrame, side: str) -> pd.Series:
    """The shared kind of each row of ``items``: ``side`` "studio" reads ``articleType`` (and
    ``masterCategory`` for footwear), "photo" reads ``label``; unmapped values become ``<side>:<value>``."""
    if side == "studio":
        kinds = items["articleType"].map(STUDIO_KINDS)
        if "masterCategory" in items:
            kinds = kinds.where(items["masterCategory"] != "Footwear", "Shoes")
        raw = items["articleType"]
    elif side == "photo":
        kinds, raw = items["label"].map(PHOTO_KINDS), items["label"]
    else:
        raise ValueError(f"side must be 'studio' or 'photo', got {side!r}")
    return kinds.fillna(side + ":" + raw.astype(str)).astype(str)


def _first_copies(catalog: Catalog, ids: tuple[str, ...]) -> list[str]:
    """``ids`` without later copies of byte-identical images (the evaluation's own rule, per catalogue)."""
    keep = ~duplicate_keys(catalog, list(ids)).duplicated(keep="first").to_numpy()
    return [i for i, k in zip(ids, keep) if k]


def mixed_ids(studio: Catalog, photos: Catalog, config: FinetuneConfig, sets: str = "evaluation") -> tuple[list[str], list[str]]:
    """The studio and photo ids of the mixed index (:data:`SETS`), later byte-identical copies dropped:
    "evaluation": ``studio``'s evaluation split and ``photos``' reported half; "selection": the
    validation part of ``studio``'s train split (:func:`make_pairs`) and ``photos``' selection half."""
    selection, reported = shift_halves(photos, config.shift_group, config.shift_seed)
    if sets == "evaluation":
        return _first_copies(studio, split_catalog(studio, config.eval_fraction, config.split_seed).eval), _first_copies(photos, reported)
    if sets == "selection":
        return _first_copies(studio, make_pairs(studio, config).val_ids), _first_copies(photos, selection)
    raise ValueError(f"sets must be one of {SETS}, got {sets!r}")


def mixed_items(studio: Catalog, studio_ids: list[str], photos: Catalog, photo_ids: list[str]) -> Catalog:
    """One catalogue of ``studio_ids`` (ids ``studio/<id>``) and ``photo_ids`` (``photo/<id>``)
    with columns ``kind`` (:func:`shared_kinds`) and ``domain``; images keep their own paths."""
    frames = []
    for side, catalog, ids in (("studio", studio, studio_ids), ("photo", photos, photo_ids)):
        rows = catalog.items.loc[list(ids)]
        frames.append(pd.DataFrame(
            {"image": rows["image"].to_numpy(), "title": "", "kind": shared_kinds(rows, side).to_numpy(), "domain": side},
            index=pd.Index([f"{side}/{i}" for i in ids], name="id"),
        ))  # fmt: skip
    items = pd.concat(frames)
    root = Path(studio.root).parent / f"mixed-{studio.name}+{photos.name}"
    return Catalog(items, root, root / "catalog.csv", ("kind", "domain"), CatalogReport(n_rows=len(items)))


def _stack(parts: list[tuple[str, Embeddings, list[str]]], name: str) -> Embeddings:
    ids = [f"{side}/{i}" for side, _, chosen in parts for i in chosen]
    vectors = np.concatenate([np.asarray(emb.vectors_for(chosen), dtype=np.float32) for _, emb, chosen in parts])
    return Embeddings(np.asarray(ids), vectors, {**parts[0][1].manifest, "model": name})


def _ungated(embedder, features: np.ndarray, maps: torch.Tensor | None = None) -> np.ndarray:
    """The tuned model's mix at its own coefficient on ``features`` (and, for a model that tunes
    the image tower's last block, the same rows' feature ``maps``), with the gate removed."""
    heads = copy.deepcopy(embedder.heads)
    heads.gate = None
    with torch.inference_mode():
        return heads.image(torch.from_numpy(features), embedder.alpha, maps).numpy()


def cross_domain_share(vectors: np.ndarray, domains: np.ndarray, k: int = 5) -> np.ndarray:
    """Per item, the share of its top-``k`` neighbours (itself excluded, cosine) from the other domain."""
    x = np.asarray(vectors, dtype=np.float32)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return (domains[top] != domains[:, None]).mean(axis=1)


def cross_domain_ndcg(queries: np.ndarray, query_kinds: np.ndarray, candidates: np.ndarray, candidate_kinds: np.ndarray, k: int = 5) -> np.ndarray:
    """nDCG@``k`` of each query searched among ``candidates`` only (cosine; relevant = same
    kind), for queries with at least one relevant candidate (the others are left out: NaN)."""
    sims = np.asarray(queries, dtype=np.float32) @ np.asarray(candidates, dtype=np.float32).T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(top, np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1], axis=1)
    rel = (candidate_kinds[top] == query_kinds[:, None]).astype(np.float64)
    n_rel = (candidate_kinds[None, :] == query_kinds[:, None]).sum(axis=1)
    values = ndcg_at_k(rel, ideal_from_counts(n_rel, k), k)
    return np.where(n_rel > 0, values, np.nan)


def _photo_to_studio(variants: dict[str, Embeddings], items: pd.DataFrame) -> tuple[pd.Index, dict[str, np.ndarray]]:
    """Photo queries searched among the studio items only ("which catalogue product is this
    photo?"): the queries with a relevant studio item, and their nDCG@5 per variant."""
    photo, studio = items.index[items["domain"] == "photo"], items.index[items["domain"] == "studio"]
    q_kinds, c_kinds = items.loc[photo, "kind"].to_numpy(), items.loc[studio, "kind"].to_numpy()
    scores = {v: cross_domain_ndcg(e.vectors_for(photo), q_kinds, e.vectors_for(studio), c_kinds) for v, e in variants.items()}
    keep = ~np.isnan(next(iter(scores.values())))
    return photo[keep], {v: s[keep] for v, s in scores.items()}


def _mean(values: np.ndarray) -> float:
    """Mean of a query group; NaN for an empty group (without numpy's empty-slice warning)."""
    return float(values.mean()) if len(values) else float("nan")


def _paired_rows(queries: str, values: dict[str, np.ndarray], n_bootstrap: int) -> list[dict]:
    """Paired nDCG@5 differences (:data:`COMPARISONS`) over one query group, bootstrap (BCa) 95% CIs."""
    rows = []
    for a, b in COMPARISONS:
        diff = values[b] - values[a]
        low, high = bootstrap_ci(diff, n_resamples=n_bootstrap, seed=0)
        rows.append({
            "queries": queries, "comparison": f"{b} vs {a}", "ndcg@5 a": _mean(values[a]), "ndcg@5 b": _mean(values[b]),
            "diff": _mean(diff), "ci_low": float(low), "ci_high": float(high), "n_queries": len(diff),
        })  # fmt: skip
    return rows


@dataclass(frozen=True)
class MixedCheck:
    """:func:`mixed_catalog_check`'s paired comparisons (``table``) and neighbour mix (``neighbours``)."""

    table: pd.DataFrame  # queries, comparison, nDCG@5 of both, diff with its 95% CI, n_queries
    neighbours: pd.DataFrame  # queries, variant, nDCG@5, share of top-5 from the other domain
    n_studio: int
    n_photo: int
    sets: str = "evaluation"  # which items the index held (:data:`SETS`)

    def eligibility(self, tolerance: float = MIXED_TOLERANCE) -> pd.DataFrame:
        """Per serving mode (:data:`SERVING`): the photo -> studio and studio changes against the
        base (with CIs) and whether both means lose at most ``tolerance`` (round 5's rule)."""
        table = self.table.set_index(["queries", "comparison"])
        rows = []
        for mode, variant in SERVING.items():
            row = {"serving": mode}
            for queries in ("photo -> studio only", "studio"):
                got = table.loc[(queries, f"{variant} vs {VARIANTS[0]}")]
                name = queries.removesuffix(" only")
                row |= {f"{name} change": got["diff"], f"{name} CI": f"[{got['ci_low']:+.4f}, {got['ci_high']:+.4f}]"}
            row["mixed eligible"] = bool(loses_at_most(row["photo -> studio change"], tolerance) and loses_at_most(row["studio change"], tolerance))
            rows.append(row)
        return pd.DataFrame(rows)


def _variants(studio: Catalog, studio_ids: list[str], photos: Catalog, photo_ids: list[str], workdir: Path, tuned: str, base_model: str) -> dict[str, Embeddings]:
    """Vectors of the mixed items: base, tuned without its gate, tuned as served (cached)."""
    base, served = [], []
    for side, catalog, ids in (("studio", studio, studio_ids), ("photo", photos, photo_ids)):
        for model in (base_model, tuned):
            extract_finetuned_embeddings(catalog, model, workdir, progress=False)
        base.append((side, load_embeddings(workdir, catalog, base_model), ids))
        served.append((side, load_embeddings(workdir, catalog, tuned), ids))
    x, out = _stack(base, VARIANTS[0]), _stack(served, VARIANTS[2])
    embedder = create_embedder(tuned, device="cpu")
    maps = None
    if embedder.needs_maps:  # rows in _stack's order: studio ids, then photo ids
        sides = ((studio, studio_ids), (photos, photo_ids))
        maps = torch.cat([extract_feature_maps(catalog, embedder.feature_model, workdir, progress=False).tensor(ids, catalog) for catalog, ids in sides])
    ungated = Embeddings(x.ids, _ungated(embedder, x.vectors, maps), {**out.manifest, "model": VARIANTS[1]})
    return {VARIANTS[0]: x, VARIANTS[1]: ungated, VARIANTS[2]: out}


def mixed_catalog_check(
    studio: Catalog,
    photos: Catalog,
    workdir: str | os.PathLike,
    tuned: str,
    *,
    config: FinetuneConfig | None = None,
    base_model: str = "efficientnet-lite0",
    n_bootstrap: int = 2000,
    sets: str = "evaluation",
) -> MixedCheck:
    """One index of ``studio``'s evaluation split and ``photos``' reported half (by sender) (or, with
    ``sets="selection"``, of the validation part and the selection half: :func:`mixed_ids`), every
    item a query, relevance = same :func:`shared_kinds`. Variants (:data:`VARIANTS`): ``base_model``
    for all, ``tuned`` without its gate, ``tuned`` as served (its cached vectors), and *routed*: a
    query the gate passes searches the served vectors, any other query searches every item's base
    vector (a per-query choice, so its values are the served or the base query's, exactly). Paired
    nDCG@5 differences with bootstrap CIs for all, studio and photo queries, and for photo queries
    searched among the studio items only (:func:`cross_domain_ndcg`)."""
    config = config or FinetuneConfig()
    studio_ids, photo_ids = mixed_ids(studio, photos, config, sets)
    mixed = mixed_items(studio, studio_ids, photos, photo_ids)
    variants = _variants(studio, studio_ids, photos, photo_ids, Path(workdir), tuned, base_model)
    result = evaluate_embeddings(mixed, variants, label="kind", ks=(5,), metrics=["ndcg@5"], exclude_duplicates=False, n_bootstrap=n_bootstrap)
    base = variants[VARIANTS[0]]
    inside = pd.Series(inside_gate(tuned, base.vectors), index=base.ids)  # as search routes, whatever mode the model records
    domains = mixed.items["domain"]
    shares = {v: pd.Series(cross_domain_share(e.vectors, domains.loc[list(e.ids)].to_numpy()), index=e.ids) for v, e in variants.items()}
    per_query = {v: pd.Series(result.values[(v, UNFILTERED)]["ndcg@5"], index=result.query_ids) for v in VARIANTS[:3]}
    cross_ids, cross = _photo_to_studio(variants, mixed.items)
    groups = {
        "all": (per_query, result.query_ids), "studio": (per_query, result.query_ids[domains.loc[result.query_ids] == "studio"]),
        "photo": (per_query, result.query_ids[domains.loc[result.query_ids] == "photo"]),
        "photo -> studio only": ({v: pd.Series(c, index=cross_ids) for v, c in cross.items()}, cross_ids),
    }  # fmt: skip
    shares[VARIANTS[3]] = shares[VARIANTS[2]].where(inside, shares[VARIANTS[0]])
    rows, neighbours = [], []
    for queries, (scores, ids) in groups.items():
        gate = inside.loc[list(ids)].to_numpy()
        values = {v: scores[v].loc[list(ids)].to_numpy() for v in VARIANTS[:3]}
        values[VARIANTS[3]] = np.where(gate, values[VARIANTS[2]], values[VARIANTS[0]])
        rows += _paired_rows(queries, values, n_bootstrap)
        if queries != "photo -> studio only":  # there every neighbour is a studio item by construction
            neighbours += [
                {"queries": queries, "variant": v, "ndcg@5": _mean(values[v]), "top-5 from the other domain": _mean(shares[v].loc[list(ids)].to_numpy())}
                for v in VARIANTS
            ]  # fmt: skip
    return MixedCheck(pd.DataFrame(rows), pd.DataFrame(neighbours), len(studio_ids), len(photo_ids), sets)


def choose_with_mixed_check(table: pd.DataFrame, tolerance: float, mixed: pd.DataFrame) -> tuple[str, str]:
    """Round 5's rule: ``(recipe, serving mode)``. ``table`` has one row per recipe (``recipe``,
    ``val gain``, ``selection change``), ``mixed`` one row per recipe and serving mode (``recipe``,
    ``serving``, ``mixed eligible``: :meth:`MixedCheck.eligibility` on the *selection* sets). Among
    pairs whose selection-half change is >= -``tolerance`` and that pass the mixed check, the best
    validation gain; ties: the earlier recipe, then "served" before "routed". Only validation,
    selection-half and selection-mixed columns are read."""
    rows = table[["recipe", "val gain", "selection change"]].reset_index(names="order").merge(mixed[["recipe", "serving", "mixed eligible"]], on="recipe")
    rows["mode order"] = rows["serving"].map({mode: n for n, mode in enumerate(SERVING)})
    ok = rows[rows["selection change"].notna() & loses_at_most(rows["selection change"], tolerance) & rows["mixed eligible"].astype(bool)]
    if ok.empty:
        raise ValueError(f"no recipe passes both the selection-half tolerance {tolerance:g} and the mixed-catalogue check")
    best = ok.sort_values(["val gain", "order", "mode order"], ascending=[False, True, True], kind="stable").iloc[0]
    return str(best["recipe"]), str(best["serving"])


__all__ = [
    "MIXED_TOLERANCE", "PHOTO_KINDS", "SERVING", "SETS", "STUDIO_KINDS", "VARIANTS", "MixedCheck", "choose_with_mixed_check",
    "cross_domain_ndcg", "cross_domain_share", "mixed_catalog_check", "mixed_ids", "mixed_items", "shared_kinds",
]  # fmt: skip
