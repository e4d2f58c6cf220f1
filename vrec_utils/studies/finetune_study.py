"""The before/after study of a fine-tune (notebook 07, ``benchmarks/bench_finetune.py``).

Sits above evaluation: it trains (or reuses) runs through :mod:`vrec_utils.train` and measures
them with :mod:`vrec_utils.evaluate`, :mod:`vrec_utils.search` and an in-memory index.

* :func:`finetune_plan` -> :class:`FinetunePlan`: what a profile fine-tunes, against which model;
* :func:`measure_finetune` -> :class:`FinetuneMeasurement`: paired nDCG@5 checks in-domain, on a
  real shifted catalog (clothing-dev's reported half), under a category shift (held-out
  categories) and a *synthetic* photo shift (:func:`photo_shift_image`),
  plus an alpha sweep and text queries (:func:`text_queries`, :func:`label_text_precision`);
* :func:`run_markdown`, ``FinetunePlan.markdown``, ``FinetuneMeasurement.markdown``: the prose.

IPython is imported inside the Markdown helpers only: it comes with the ``notebooks`` extra.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageEnhance, ImageFilter

from ..catalog import Catalog, Split, load_catalog, split_catalog
from ..evaluation import evaluate_embeddings, evaluate_models
from ..images import load_rgb
from ..index import create_index
from ..models import create_embedder, resolve_device
from ..models.local import serving_mode
from ..search import recommend, search_by_text
from ..store import DEFAULT_WORKDIR, Embeddings, load_embeddings, slugify
from ..train import (
    ALPHA_GRID,
    FinetuneConfig,
    ensure_finetuned,
    extract_finetuned_embeddings,
    load_result,
    parse_exclude,
    recipe_config,
    shift_halves,
)
from ..train.feature_maps import extract_feature_maps
from ..train.recipes import DEFAULT_RECIPE
from .recipe_study import SIDE_COLUMNS, default_shift_catalog, routed_in_domain, verdict

MIN_CHECK_ITEMS = 10  # evaluation items a shift check needs on each side

#: Text queries for the demo, with the articleType a sensible answer carries.
DEFAULT_TEXT_QUERIES = {
    "black watch": "Watches",
    "red dress": "Dresses",
    "running shoes": "Sports Shoes",
    "women handbag": "Handbags",
    "blue jeans": "Jeans",
    "sunglasses": "Sunglasses",
    "white formal shirt": "Shirts",
    "perfume": "Perfume and Body Mist",
}
#: Categories held out of training for the category-shift check on fashion-small.
DEFAULT_HOLDOUT = ("masterCategory=Accessories", "masterCategory=Personal Care")



def photo_shift_image(image):
    """A "differently shot" version of a catalogue photo: tighter framing (centre 80 % zoomed
    back), a grey-beige backdrop instead of white, softer focus, duller colours."""
    w, h = image.size
    box = (round(w * 0.1), round(h * 0.1), round(w * 0.9), round(h * 0.9))
    shot = image.crop(box).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(shot, dtype=np.uint8).copy()
    backdrop = (pixels >= 235).all(axis=-1)
    pixels[backdrop] = (196, 188, 172)
    shot = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.7))
    shot = ImageEnhance.Color(shot).enhance(0.6)
    return ImageEnhance.Brightness(shot).enhance(0.92)


def photo_shift_catalog(catalog: Catalog, ids: Sequence[str], directory: str | os.PathLike) -> Catalog:
    """A generic-layout catalog of ``ids`` whose images are :func:`photo_shift_image` copies
    (same ids, titles and labels) in ``directory``; reused when already written."""
    directory = Path(directory)
    csv = directory / "catalog.csv"
    ids = [str(i) for i in ids]
    if csv.is_file() and pd.read_csv(csv, dtype=str, keep_default_na=False)["id"].tolist() == ids:
        return load_catalog(csv)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for item_id in ids:
        photo_shift_image(load_rgb(catalog.image_path(item_id))).save(directory / "images" / f"{item_id}.jpg", quality=90)
    rows = catalog.items.loc[ids].drop(columns=["image"]).reset_index()
    rows.insert(1, "image", [f"images/{i}.jpg" for i in ids])
    rows.to_csv(csv, index=False)
    return load_catalog(csv)


def text_queries(
    catalog: Catalog,
    workdir: str | os.PathLike,
    model: str,
    queries: Sequence[str],
    *,
    ids: Sequence[str] | None = None,
    k: int = 5,
    label: str | None = "articleType",
    device: str | torch.device | None = "auto",
) -> pd.DataFrame:
    """Text-to-image search among ``ids`` (default: every cached item): one row per
    (query, rank) with query_text, rank, item_id, score, title and ``label``."""
    embeddings = load_embeddings(workdir, catalog, model)
    if ids is not None:
        embeddings = embeddings.restrict(ids)
    frame = search_by_text(catalog, workdir, model, list(queries), k, device=device, index=_index_of(embeddings))
    return _result_columns(frame, "query_text", label)


def _index_of(embeddings):
    """An exact in-memory FAISS index of ``embeddings`` (not saved: these pools are subsets)."""
    index = create_index("faiss", model=embeddings.model, dim=embeddings.dim)
    index.add(embeddings.ids, embeddings.vectors)
    return index


def _result_columns(frame: pd.DataFrame, query_column: str, label: str | None) -> pd.DataFrame:
    columns = [query_column, "rank", "item_id", "score", "title"] + ([label] if label is not None else [])
    return frame[[c for c in columns if c in frame.columns]].reset_index(drop=True)


def similar_among(
    catalog: Catalog,
    workdir: str | os.PathLike,
    model: str,
    query_ids: Sequence[str],
    ids: Sequence[str],
    *,
    k: int = 5,
    label: str | None = "articleType",
) -> pd.DataFrame:
    """"Similar items" restricted to ``ids`` (e.g. the evaluation split, so that no trained-on
    item shows up): one row per (query_id, rank) with item_id, score, title and ``label``."""
    pool = _index_of(load_embeddings(workdir, catalog, model).restrict(ids))
    return _result_columns(recommend(catalog, workdir, model, list(query_ids), k, index=pool), "query_id", label)


def label_text_precision(
    catalog: Catalog,
    workdir: str | os.PathLike,
    model: str,
    ids: Sequence[str],
    *,
    label: str = "articleType",
    k: int = 5,
    min_items: int = 10,
    device: str | torch.device | None = "auto",
) -> pd.DataFrame:
    """Each label value with at least ``min_items`` items among ``ids``, used as a text query
    (lower-cased, e.g. "casual shoes"): precision@k of items carrying that label."""
    counts = catalog.items.loc[list(ids), label].value_counts()
    values = [v for v, n in counts.items() if n >= min_items and str(v).strip()]
    if not values:
        return pd.DataFrame(columns=[label, f"precision@{k}", "n_items"])
    hits = text_queries(catalog, workdir, model, [v.lower() for v in values], ids=ids, k=k, label=label, device=device)
    hits["expected"] = hits["query_text"].map({v.lower(): v for v in values})
    table = (
        hits.assign(hit=hits[label] == hits["expected"])
        .groupby("expected", sort=False)["hit"].mean().rename(f"precision@{k}").reset_index()
        .rename(columns={"expected": label})
    )
    table["n_items"] = table[label].map(counts).astype(int)
    return table

@dataclass(frozen=True)
class FinetunePlan:
    """What notebook 07 fine-tunes for a profile, and against which model it measures."""

    profile: str
    base: str
    base_model: str
    config: FinetuneConfig
    note: str = ""
    shift_catalog: Path | None = None  # the real shifted catalog measured (and, per the recipe, selected on)

    def markdown(self):
        from IPython.display import Markdown  # deferred: the notebooks extra

        c = self.config
        text = (
            f"Fine-tuning **{self.base}** (profile `{self.profile}`) with the sigmoid loss; before = `{self.base_model}`. "
            f"Trainable: {c.trainable}; {c.epochs} epochs, batch {c.batch_size}, AdamW lr {c.lr:g} ({c.schedule}, "
            f"{c.warmup_steps} warm-up steps), weight decay {c.weight_decay:g}, grad clip {c.grad_clip}, seed {c.seed}. "
            f"Evaluation split: {c.eval_fraction:.0%} of the items (split seed {c.split_seed}), never trained on; "
            f"validation: {c.val_fraction:.0%} of the train split."
        )
        if self.base == "mini-siglip":
            chosen = "the selection half (by sender) of the shifted catalog and validation" if c.select_on == "shift" else "validation"
            text += f" Recipe **{c.recipe}** (mix: {c.mix}; coefficient chosen on {chosen})."
        if self.shift_catalog is not None:
            text += f" Real shifted catalog: `{self.shift_catalog}` (reported half only)."
        return Markdown(text + (f"\n\n> {self.note}" if self.note else ""))


def finetune_plan(
    profile: str = "offline",
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = "auto",
) -> FinetunePlan:
    """The base, the "before" model and the config for a profile (``None`` overrides keep the
    defaults, so the offline profile reuses the model :func:`ensure_finetuned` trained):

    * ``offline``: mini-siglip vs efficientnet-lite0 with :data:`~vrec_utils.train.recipes.DEFAULT_RECIPE`
      (its coefficient chosen on clothing-dev's selection half when that catalog is present);
    * ``smoke``: tiny-siglip vs itself, 2 epochs (exercises the SigLIP path; numbers mean nothing);
    * ``article``: siglip-base vs itself (last block + heads, lr 1e-5, the model's own logit
      scale/bias) when a CUDA GPU is present, else the offline plan with a note.
    """
    overrides = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None}
    note = ""
    if profile == "smoke":
        config = dataclasses.replace(FinetuneConfig(epochs=2, batch_size=64, trainable="last", warmup_steps=2), **overrides)
        return FinetunePlan(profile, "tiny-siglip", "tiny-siglip", config, "Tiny random models: the numbers mean nothing.")
    if profile == "article":
        if resolve_device(device).type == "cuda":
            config = dataclasses.replace(
                FinetuneConfig(trainable="last", epochs=3, batch_size=128, lr=1e-5, warmup_steps=50, loss_init="model"), **overrides
            )
            return FinetunePlan(profile, "siglip-base", "siglip-base", config)
        note = (
            "Fine-tuning SigLIP-base (the paper's setting) needs a GPU; without one this notebook fine-tunes "
            "the offline mini-SigLIP instead (`vrec finetune --base siglip-base` runs the SigLIP path)."
        )
    elif profile != "offline":
        raise KeyError(f"unknown profile {profile!r}; profiles: offline, article, smoke")
    shift = default_shift_catalog()
    config = recipe_config(DEFAULT_RECIPE, dataclasses.replace(FinetuneConfig(), **overrides), shift, fallback=True)
    return FinetunePlan(profile, "mini-siglip", "efficientnet-lite0", config, note, shift)



@dataclass(frozen=True)
class FinetuneMeasurement:
    """Before/after numbers of a fine-tune (see :func:`measure_finetune`)."""

    base_model: str
    tuned_model: str
    shift_model: str | None
    checks: pd.DataFrame  # one row per check: base vs tuned nDCG@5, paired diff + 95% CI, p-value
    alpha_sweep: pd.DataFrame  # eval split, for the report only (alpha is chosen on validation)
    text_results: pd.DataFrame
    text_precision: pd.DataFrame
    runs: dict[str, dict[str, Any]]  # result.json of each fine-tuning run
    eval_ids: tuple[str, ...] = ()
    workdir: Path = DEFAULT_WORKDIR
    label: str = "articleType"
    notes: tuple[str, ...] = ()  # checks that were skipped, and why

    def checks_table(self) -> pd.DataFrame:
        """One row per check: base and tuned nDCG@5, the paired difference with its 95% CI, p-value."""
        table = self.checks[
            ["check", "mean_a", "mean_b", "diff", "diff_ci_low", "diff_ci_high", "p_value", "rel_improvement_pct", "n_queries"]
        ].rename(columns={"mean_a": f"{self.base_model} ndcg@5", "mean_b": "tuned ndcg@5", "rel_improvement_pct": "rel_%"})
        return table.round(4).reset_index(drop=True)

    def sides(self) -> pd.DataFrame:
        """Both sides, side by side: the in-domain row and the real-photo row (when measured), in
        the columns of :func:`~vrec_utils.studies.recipe_study.both_sides`."""
        picks = [("in-domain", "in-domain"), ("shift", "real photo shift")]
        rows = []
        for side, prefix in picks:
            for r in self.checks[self.checks["check"].str.startswith(prefix)].itertuples(index=False):
                rows.append({
                    "model": self.tuned_model, "side": side, "set": r.check, "base ndcg@5": r.mean_a, "tuned ndcg@5": r.mean_b,
                    "diff": r.diff, "ci_low": r.diff_ci_low, "ci_high": r.diff_ci_high, "p_value": r.p_value, "n_queries": r.n_queries,
                })  # fmt: skip
        return pd.DataFrame(rows, columns=["model", *SIDE_COLUMNS])

    @property
    def serving(self) -> str:
        """How the tuned model is served, as its saved model records (:func:`serving_mode`)."""
        return serving_mode(self.tuned_model)

    def verdict(self) -> str:
        """:func:`~vrec_utils.studies.recipe_study.verdict` of :meth:`sides` (a routed model: its routed in-domain row)."""
        return verdict(self.sides())

    def summary(self) -> str:
        lines = []
        for row in self.checks.itertuples(index=False):
            lines.append(
                f"{row.check}: {row.model_a} {row.mean_a:.4f} -> {row.model_b_label} {row.mean_b:.4f} "
                f"(diff {row.diff:+.4f}, 95% CI [{row.diff_ci_low:+.4f}, {row.diff_ci_high:+.4f}], p={row.p_value:.4f}, "
                f"{row.rel_improvement_pct:+.1f}%, {row.n_queries} queries)"
            )
        return "\n".join(lines + list(self.notes))

    def markdown(self):
        """The checks as sentences that say whether each 95% interval excludes zero (IPython Markdown)."""
        from IPython.display import Markdown  # deferred: the notebooks extra

        out = []
        for row in self.checks.itertuples(index=False):
            if row.diff_ci_low > 0:
                verdict = "**a significant gain** (the 95% interval excludes zero)"
            elif row.diff_ci_high < 0:
                verdict = "**a significant loss** (the 95% interval excludes zero)"
            else:
                verdict = "no significant change (the 95% interval includes zero)"
            out.append(
                f"- *{row.check}* ({row.n_queries} queries): {self.base_model} {row.mean_a:.3f} → {row.model_b_label} "
                f"{row.mean_b:.3f}, difference {row.diff:+.3f} (95% CI {row.diff_ci_low:+.3f} to {row.diff_ci_high:+.3f}, "
                f"p = {row.p_value:.3g}, {row.rel_improvement_pct:+.1f}% relative): {verdict}."
            )
        out += [f"- _{note}_" for note in self.notes]
        return Markdown("\n".join(out))

    def example_queries(self, catalog: Catalog, n: int = 3, seed: int = 0) -> list[str]:
        """``n`` evaluation items of different frequent labels (seeded), for side-by-side grids."""
        items = catalog.items.loc[list(self.eval_ids)]
        common = items[self.label].value_counts()
        labels = [v for v in common.index if str(v).strip()][: max(n * 3, n)]
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(labels), size=min(n, len(labels)), replace=False)
        picks = []
        for i in sorted(chosen):
            pool = items.index[items[self.label] == labels[i]].to_numpy()
            picks.append(str(rng.choice(pool)))
        return picks

    def similar_rows(self, catalog: Catalog, query_id: str, k: int = 5) -> dict[str, pd.DataFrame]:
        """Top-k similar evaluation items of ``query_id`` before and after fine-tuning."""
        return {
            f"{self.base_model} (before)": similar_among(catalog, self.workdir, self.base_model, [query_id], self.eval_ids, k=k, label=self.label),
            "fine-tuned (after)": similar_among(catalog, self.workdir, self.tuned_model, [query_id], self.eval_ids, k=k, label=self.label),
        }

    def text_rows(self) -> dict[str, dict[str, pd.DataFrame]]:
        """``{query: {"fine-tuned": frame}}`` for :func:`vrec_utils.plots.text_search_grid`."""
        return {q: {"fine-tuned": frame} for q, frame in self.text_results.groupby("query_text", sort=False)}

    def expected_labels(self) -> dict[str, str]:
        return dict(zip(self.text_results["query_text"], self.text_results["expected"]))


def _compare(catalog, workdir, base_model, tuned, split, label, n_bootstrap, check, tuned_label) -> dict[str, Any]:
    result = evaluate_models(
        catalog, workdir, [base_model, tuned], label=label, split=split, ks=(5,), metrics=["ndcg@5"], n_bootstrap=n_bootstrap,
    )
    row = result.compare(base_model, tuned, ["ndcg@5"]).iloc[0].to_dict()
    return {"check": check, "model_b_label": tuned_label, **row}


def measure_finetune(
    catalog: Catalog,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    config: FinetuneConfig | None = None,
    base: str = "mini-siglip",
    base_model: str = "efficientnet-lite0",
    holdout: Sequence[str] | dict[str, str | Sequence[str]] | None = DEFAULT_HOLDOUT,
    photo_shift: bool = True,
    shift_catalog: str | os.PathLike | None = None,
    queries: dict[str, str] | None = None,
    label: str = "articleType",
    n_bootstrap: int = 2000,
    device: str | torch.device | None = "auto",
    progress: bool = True,
) -> FinetuneMeasurement:
    """Train (or reuse) the fine-tunes and measure them against ``base_model`` on nDCG@5, one
    check after another in the order of the report's table:

    * **in-domain**: the catalog's evaluation split (never trained on), all categories;
    * **real photo shift** (``shift_catalog``, e.g. clothing-dev): the in-domain model on the
      shifted catalog's *reported half* (split by ``config.shift_group``; the other half may
      have chosen the mix coefficient), label ``config.shift_label``;
    * **category shift** (``holdout``: ``"column=value"`` entries or ``{column: [values]}``): a
      second model trained without the ``holdout`` categories, evaluated on the held-out
      categories' evaluation items and, side by side, on the seen categories' ones;
    * **synthetic photo shift** (``photo_shift``): the evaluation items re-shot
      (:func:`photo_shift_image`), with a note of how far it is from the real-photo result.

    Every comparison is paired (same queries) with a bootstrap 95% CI of the difference.
    Also returns an alpha sweep on the evaluation split (reporting only) and text queries.
    """
    config = config or FinetuneConfig()
    workdir = Path(workdir)
    queries = DEFAULT_TEXT_QUERIES if queries is None else queries
    if isinstance(holdout, dict):
        holdout = [f"{c}={v}" for c, values in holdout.items() for v in ([values] if isinstance(values, str) else values)]
    split = split_catalog(catalog, config.eval_fraction, config.split_seed)
    if len(split.eval) < MIN_CHECK_ITEMS:
        raise ValueError(
            f"catalog {catalog.name!r} has {len(split.eval)} evaluation items ({config.eval_fraction:.0%} of {len(catalog)}); "
            f"measuring a fine-tune needs at least {MIN_CHECK_ITEMS}"
        )
    ctx = _Context(catalog, workdir, config, base, base_model, split, label, n_bootstrap, device, progress)
    runs: dict[str, dict[str, Any]] = {}
    tuned = ensure_finetuned(catalog, workdir, base, config=config, device=device, progress=progress)
    runs["in-domain"] = load_result(tuned)["result"]
    for model in (tuned, base_model):  # cached: a quick check
        extract_finetuned_embeddings(catalog, model, workdir, device=device, progress=progress)
    checks = _in_domain_checks(ctx, tuned)
    notes: list[str] = []
    if shift_catalog is not None:
        checks.append(_real_shift_check(ctx, tuned, shift_catalog))
    shift_model, unseen, names = _category_shift_checks(ctx, holdout, checks, notes, runs) if holdout else (None, (), "")
    if photo_shift:
        checks.append(_synthetic_shift_check(ctx, tuned))
        real = [c for c in checks if c["check"].startswith("real photo shift")]
        if real:
            gap = checks[-1]["diff"] - real[0]["diff"]
            notes.append(
                f"The synthetic photo shift says {checks[-1]['diff']:+.3f}, the real photos {real[0]['diff']:+.3f}: the synthetic "
                f"check is {abs(gap):.3f} {'more optimistic' if gap > 0 else 'more pessimistic'} than real photos."
            )
    alpha_sweep = _sweeps(ctx, tuned, shift_model, unseen, names, checks)
    text_results = text_queries(catalog, workdir, tuned, list(queries), ids=split.eval, k=5, label=label, device=device)
    text_results["expected"] = text_results["query_text"].map(queries)
    text_precision = label_text_precision(catalog, workdir, tuned, split.eval, label=label, device=device)
    return FinetuneMeasurement(
        base_model=base_model, tuned_model=tuned, shift_model=shift_model, checks=pd.DataFrame(checks),
        alpha_sweep=alpha_sweep, text_results=text_results, text_precision=text_precision, runs=runs,
        eval_ids=tuple(split.eval), workdir=workdir, label=label, notes=tuple(notes),
    )


@dataclass(frozen=True)
class _Context:
    """The fixed arguments of one :func:`measure_finetune` call, for its check helpers."""

    catalog: Catalog
    workdir: Path
    config: FinetuneConfig
    base: str
    base_model: str
    split: Split
    label: str
    n_bootstrap: int
    device: Any
    progress: bool


def _in_domain_checks(ctx: _Context, tuned: str) -> list[dict[str, Any]]:
    """The evaluation split, in the mode the model is served in (:func:`serving_mode`): a routed
    model's routed row first (what ``vrec search`` gives users, and what the verdict reads), then
    its served vectors' row; a served model's row alone."""
    mode = serving_mode(tuned)
    served = _compare(ctx.catalog, ctx.workdir, ctx.base_model, tuned, ctx.split, ctx.label, ctx.n_bootstrap, "in-domain (eval split), served", "tuned")
    if mode != "routed":
        return [served]
    served["check"] = "in-domain (eval split), served vectors for every query"
    table = routed_in_domain(ctx.catalog, ctx.workdir, tuned, config=ctx.config, base_model=ctx.base_model, label=ctx.label, n_bootstrap=ctx.n_bootstrap)
    routed = table[table["mode"] == "routed"].drop(columns=["mode", "share inside the gate"]).iloc[0].to_dict()
    return [{"check": "in-domain (eval split), routed as served to users", "model_b_label": "tuned, routed", **routed}, served]


def _real_shift_check(ctx: _Context, tuned: str, shift_catalog: str | os.PathLike) -> dict[str, Any]:
    """The in-domain model on the reported half (split by sender) of a real shifted catalog."""
    shifted = load_catalog(shift_catalog)
    for model in (tuned, ctx.base_model):
        extract_finetuned_embeddings(shifted, model, ctx.workdir, device=ctx.device, progress=ctx.progress)
    _, report = shift_halves(shifted, ctx.config.shift_group, ctx.config.shift_seed)
    half = Split((), report, ctx.config.shift_seed, 0.5)
    name = f"real photo shift: {shifted.name} reported half"
    return _compare(shifted, ctx.workdir, ctx.base_model, tuned, half, ctx.config.shift_label, ctx.n_bootstrap, name, "tuned")


def _synthetic_shift_check(ctx: _Context, tuned: str) -> dict[str, Any]:
    """The in-domain model on re-shot copies of the evaluation photos (:func:`photo_shift_image`)."""
    catalog = ctx.catalog
    shifted = photo_shift_catalog(catalog, ctx.split.eval, ctx.workdir / "shifted" / f"{slugify(catalog.name)}-{catalog.fingerprint()[:8]}-photo")
    for model in (tuned, ctx.base_model):
        extract_finetuned_embeddings(shifted, model, ctx.workdir, device=ctx.device, progress=ctx.progress)
    return _compare(shifted, ctx.workdir, ctx.base_model, tuned, None, ctx.label, ctx.n_bootstrap, "synthetic photo shift (eval re-shot)", "tuned")


def _category_shift_checks(ctx: _Context, holdout: Sequence[str], checks: list, notes: list, runs: dict) -> tuple[str | None, tuple[str, ...], str]:
    """A model trained without the ``holdout`` categories, on the held-out and the seen
    evaluation items (appended to ``checks``); returns (model, held-out ids, held-out names)."""
    unseen, seen, names = _holdout_ids(ctx.catalog, holdout, ctx.split)
    if min(len(unseen), len(seen)) < MIN_CHECK_ITEMS:
        notes.append(
            f"Category-shift check skipped: holdout {list(holdout)} leaves {len(unseen)} held-out and {len(seen)} seen "
            f"evaluation items, and each side needs at least {MIN_CHECK_ITEMS} (a larger catalog or other categories)."
        )
        return None, (), names
    shift_config = dataclasses.replace(ctx.config, exclude=tuple(holdout))
    shift_model = ensure_finetuned(ctx.catalog, ctx.workdir, ctx.base, config=shift_config, device=ctx.device, progress=ctx.progress)
    runs["category-shift"] = load_result(shift_model)["result"]
    extract_finetuned_embeddings(ctx.catalog, shift_model, ctx.workdir, device=ctx.device, progress=ctx.progress)
    for ids, check in ((unseen, f"category shift: held-out {names}"), (seen, "category shift: seen categories")):
        part = Split((), ids, ctx.split.seed, ctx.split.eval_fraction)
        checks.append(_compare(ctx.catalog, ctx.workdir, ctx.base_model, shift_model, part, ctx.label, ctx.n_bootstrap, check, "tuned w/o held-out"))
    return shift_model, unseen, names


def _sweeps(ctx: _Context, tuned: str, shift_model: str | None, unseen: tuple[str, ...], names: str, checks: list) -> pd.DataFrame:
    """Alpha sweeps on the evaluation split (and the held-out categories); inserts the
    "no guard (alpha=1)" category-shift row into ``checks``."""
    sweep, _ = _alpha_sweep(ctx.catalog, ctx.workdir, tuned, ctx.base_model, ctx.split, ctx.label, ctx.device, ctx.n_bootstrap)
    sweeps = [] if sweep is None else [sweep.assign(check="in-domain (eval split)")]
    if shift_model is not None:
        unseen_split = Split((), unseen, ctx.split.seed, ctx.split.eval_fraction)
        sweep, result = _alpha_sweep(ctx.catalog, ctx.workdir, shift_model, ctx.base_model, unseen_split, ctx.label, ctx.device, ctx.n_bootstrap)
        if sweep is not None:
            sweeps.append(sweep.assign(check=f"category shift: held-out {names}"))
            row = result.compare("alpha=0", "alpha=1", ["ndcg@5"]).iloc[0].to_dict()
            row.update(model_a=ctx.base_model, model_b=shift_model)
            at = next(i for i, c in enumerate(checks) if c["check"] == f"category shift: held-out {names}") + 1
            checks.insert(at, {"check": f"category shift: held-out {names}, no guard (alpha=1)", "model_b_label": "tuned w/o held-out, alpha=1", **row})
    columns = ["check", "alpha", "mean", "ci_low", "ci_high", "n_queries"]
    return pd.concat(sweeps, ignore_index=True)[columns] if sweeps else pd.DataFrame(columns=columns)


def _holdout_ids(catalog: Catalog, holdout: Sequence[str], split: Split) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """The evaluation items in the ``holdout`` categories (unseen), the others (seen), and the
    held-out values joined by ``+`` for check names."""
    held = pd.Series(False, index=catalog.items.index)
    for column, value in parse_exclude(holdout):
        catalog.require_column(column)
        held |= catalog.items[column].astype(str) == value
    eval_ids = pd.Index(split.eval)
    unseen = tuple(eval_ids[held.loc[eval_ids].to_numpy()])
    seen = tuple(eval_ids[~held.loc[eval_ids].to_numpy()])
    return unseen, seen, "+".join(v for _, v in parse_exclude(holdout))


def _alpha_sweep(catalog, workdir, tuned, base_model, split, label, device, n_bootstrap=1000):
    """nDCG@5 on ``split.eval`` for each alpha of :data:`ALPHA_GRID` (reporting only) and the
    evaluation result (rows ``alpha=<a>``; ``alpha=0`` is the base model). (None, None) for
    models without an output mix."""
    embedder = create_embedder(tuned, device="cpu")
    if not embedder.has_output_mix:
        return None, None
    base = load_embeddings(workdir, catalog, base_model).restrict(split.eval)
    x = torch.from_numpy(np.asarray(base.vectors, dtype=np.float32))
    maps = extract_feature_maps(catalog, embedder.feature_model, workdir, progress=False).tensor(list(map(str, base.ids)), catalog) if embedder.needs_maps else None
    with torch.inference_mode():
        variants = {
            f"alpha={a:g}": Embeddings(base.ids, embedder.image_from_features(x, a, maps=maps).numpy(), {**base.manifest, "model": f"alpha={a:g}"})
            for a in ALPHA_GRID
        }
    result = evaluate_embeddings(catalog, variants, label=label, split=split, ks=(5,), metrics=["ndcg@5"], n_bootstrap=n_bootstrap)
    table = result.summary()
    table["alpha"] = [float(m.split("=")[1]) for m in table["model"]]
    return table[["alpha", "mean", "ci_low", "ci_high", "n_queries"]].reset_index(drop=True), result


def run_markdown(result: dict[str, Any]):
    """A finished run's ``result.json`` as a sentence (IPython Markdown)."""
    from IPython.display import Markdown  # deferred: the notebooks extra

    alpha, recipe = result.get("alpha"), result.get("recipe") or {}
    what = "WiSE-FT weight" if recipe.get("mix") == "weights" else "output mix α"
    chosen = recipe.get("chosen_by", "validation")
    mix = f"; recipe `{recipe.get('name', 'alpha-mix')}`, {what} = {alpha:g} (chosen on {chosen})" if alpha is not None else ""
    gate = recipe.get("gate")
    if gate:
        photos = f", {gate['selection_inside']:.1%} of the shift selection half" if "selection_inside" in gate else ""
        mix += (
            f"; in-domain gate: the mix applies only to images within the {gate['quantile']:.0%} quantile of validation "
            f"Mahalanobis distances ({gate['val_inside']:.1%} of validation{photos}), all others get the base embedding"
        )
    features = result.get("feature_seconds")
    feat = f"; frozen-tower features {features:.0f} s (cached, reused afterwards)" if features else ""
    return Markdown(
        f"Trained **{result['base']}** on **{result['n_train']:,} image-title pairs** of the train split "
        f"({result['n_val']:,} more for validation; {result['n_no_title']} without a title skipped, "
        f"{result['n_excluded']} excluded, {result['n_dropped']} without features). Best epoch "
        f"{result['best_epoch']} of {result['epochs_run']}{mix}. Training took **{result['train_seconds']:.0f} s** "
        f"on {result['device']} ({result['torch_threads']} threads){feat}. Model: `{result['model']}`."
    )


__all__ = [
    "DEFAULT_HOLDOUT", "DEFAULT_TEXT_QUERIES", "MIN_CHECK_ITEMS", "FinetuneMeasurement", "FinetunePlan", "finetune_plan",
    "label_text_precision", "measure_finetune", "photo_shift_catalog", "photo_shift_image", "run_markdown", "similar_among",
    "text_queries",
]  # fmt: skip
