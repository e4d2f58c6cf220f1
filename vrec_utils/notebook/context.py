"""The run context every notebook works with: :func:`prepare` (called after the parameters cell)
opens the catalog (optionally a seeded sample), resolves the profile (or takes the model list
``vrec report`` resolved once) and returns a :class:`RunContext` with the helpers the notebooks
share: extraction for every model, indexes, query picking, recommendation / visual / text search
rows, backend agreement and 2-D maps, so that the notebooks hold no logic of their own.

Profiles themselves (which models, how they resolve) are :mod:`vrec_utils.profiles`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..catalog import (
    Catalog,
    CatalogError,
    Split,
    hash_unit_interval,
    load_catalog,
    split_catalog,
)
from ..data import bundled_sample
from ..extract import extract_image_embeddings
from ..index import build_index
from ..models import create_embedder, get_model_entry
from ..models.local import local_model_dir
from ..plots import project_2d
from ..profiles import (
    ResolvedProfile,
    _local_model_json,
    display_name,
    get_profile,
    resolve_profile,
)
from ..search import recommend, search_by_image, search_by_text
from ..store import (
    DEFAULT_WORKDIR,
    EmbeddingsNotFoundError,
    list_caches,
    load_embeddings,
)
from ..train import extract_finetuned_embeddings
from .parameters import NotebookParameters


def training_split(models: Sequence[str], catalog: Catalog) -> Split | None:
    """The train/eval split of the first fine-tuned (``local:``) model, recomputed for ``catalog``
    (assignment hashes each id, so a sample of the catalog keeps every item's side); ``None``
    when no model was trained on this catalog."""
    for model in models:
        if local_model_dir(model) is not None:
            config = (_local_model_json(model) or {}).get("config") or {}
            return split_catalog(catalog, float(config.get("eval_fraction", 0.25)), int(config.get("split_seed", 0)))
    return None


# ------------------------------------------------------------------------------- catalogs


def open_catalog(catalog: str | os.PathLike | Catalog | None = None, sample_size: int | None = None, seed: int = 0) -> Catalog:
    """The catalog at ``catalog`` (default: the bundled sample), or a seeded sample of
    ``sample_size`` of its items (chosen by hashing ids, so it does not depend on row order)."""
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog if catalog not in (None, "") else bundled_sample())
    if sample_size is None or sample_size >= len(catalog):
        return catalog
    if sample_size < 10:
        raise ValueError(f"sample_size must be at least 10 (or None for the whole catalog), got {sample_size}")
    keys = pd.Series(hash_unit_interval(catalog.items.index, f"sample-{seed}"), index=catalog.items.index)
    chosen = set(keys.nsmallest(sample_size).index)
    return catalog.subset([i for i in catalog.items.index if i in chosen])


def label_overview(catalog: Catalog, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per label column: distinct values, the most frequent one and its share, empties."""
    rows = []
    for column in columns or catalog.label_columns:
        values = catalog.items[catalog.require_column(column)].astype(str)
        counts = values.value_counts()
        rows.append(
            {
                "column": column,
                "distinct values": int(counts.size),
                "most frequent": counts.index[0] if len(counts) else "",
                "share of most frequent": round(float(counts.iloc[0]) / len(values), 3) if len(counts) else 0.0,
                "singletons": int((counts == 1).sum()),
                "empty": int((values.str.strip() == "").sum()),
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- the context


@dataclass
class RunContext:
    """What one notebook run works with: the catalog, the models, where things go."""

    catalog: Catalog
    workdir: Path
    models: list[str]
    profile: str
    requested_profile: str
    notes: list[str] = field(default_factory=list)
    split: Split | None = None
    device: str | None = "auto"
    progress: bool = True
    #: local weights per model name (``vrec report --weights``); other models load as registered
    weights: dict[str, str] = field(default_factory=dict)
    _indexes: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)
    _embedders: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- naming --------------------------------------------------------------------------
    @property
    def query_ids(self) -> list[str]:
        """Items that may serve as queries: the eval split when a model was trained on this
        catalog (its titles were never seen), else every item."""
        if self.split is None:
            return self.catalog.ids
        inside = set(self.catalog.items.index)
        return [i for i in self.split.eval if i in inside]

    def summary(self) -> pd.DataFrame:
        rows = []
        for model in self.models:
            entry, _ = get_model_entry(model)
            rows.append({"model": display_name(model), "registry name": model, "text tower": self._has_text(model), "description": entry.description})
        return pd.DataFrame(rows)

    def markdown(self) -> str:
        """A Markdown paragraph for the top of a notebook: profile, models, catalog, notes."""
        lines = [
            f"**Profile `{self.profile}`**: {get_profile(self.profile).description}.",
            f"**Models:** {', '.join(f'`{display_name(m)}`' for m in self.models)}.",
            "**Weights:** " + "; ".join(f"`{display_name(m)}`: {self.embedder(m).describe_weights()}" for m in self.models) + ".",
            f"**Catalog:** `{self.catalog.name}`, {len(self.catalog)} items"
            + (f"; queries come from the {len(self.query_ids)} held-out evaluation items (never trained on)." if self.split is not None else "."),
        ]
        lines += [f"> **Note:** {note}" for note in self.notes]
        return "\n\n".join(lines)

    def column(self, preferred: str, fallback: str) -> str:
        """``preferred`` when the catalog has that label column, else ``fallback``."""
        return preferred if preferred in self.catalog.label_columns else self.catalog.require_column(fallback)

    def embedder(self, model: str):
        """The model, built once per context."""
        if model not in self._embedders:
            self._embedders[model] = create_embedder(model, weights=self.weights.get(model), device=self.device)
        return self._embedders[model]

    def text_models(self) -> list[str]:
        """The models with a text tower (text-to-image search)."""
        return [m for m in self.models if self._has_text(m)]

    def _has_text(self, model: str) -> bool:
        if local_model_dir(model) is not None:  # a fine-tune keeps its base's towers: ask the model
            return bool(self.embedder(model).has_text)
        return get_model_entry(model)[0].has_text

    # -- extraction --------------------------------------------------------------------------
    def extract(self, *, batch_size: int = 64, progress: bool | None = None) -> pd.DataFrame:
        """Embed the catalog with every model (what is cached is reused): one row per model with
        counts, seconds and images/s."""
        progress = self.progress if progress is None else progress
        rows = []
        for model in self.models:
            started = time.perf_counter()
            embedder = self.embedder(model)
            load_seconds = time.perf_counter() - started
            if local_model_dir(model) is not None and embedder.has_output_mix:  # a fine-tune: only its heads run
                rows.append(self._extract_finetuned(model, load_seconds, batch_size, progress))
                continue
            result = extract_image_embeddings(self.catalog, embedder, self.workdir, batch_size=batch_size, progress=progress)
            rows.append(_extract_row(model, embedder.dim, result.n_requested, result.n_new, result.n_cached, len(result.skipped), load_seconds, result.seconds, str(result.cache_dir)))
        return pd.DataFrame(rows)

    def _extract_finetuned(self, model: str, load_seconds: float, batch_size: int, progress: bool) -> dict[str, Any]:
        before = _cached_count(self.workdir, self.catalog, model)
        started = time.perf_counter()
        embeddings = extract_finetuned_embeddings(self.catalog, model, self.workdir, device=self.device, batch_size=batch_size, progress=progress)
        seconds = time.perf_counter() - started
        inside = embeddings.restrict(self.catalog.ids)
        new = max(0, len(inside) - before)
        caches = list_caches(self.workdir, self.catalog)
        path = caches.loc[caches["model"] == model, "path"]
        return _extract_row(model, embeddings.dim, len(self.catalog), new, len(inside) - new, len(self.catalog) - len(inside), load_seconds, seconds, path.iloc[0] if len(path) else "")

    def embeddings(self, model: str, ids: Sequence[str] | None = None):
        """``model``'s cached vectors for ``ids`` (default: the catalog's items that have one)."""
        return load_embeddings(self.workdir, self.catalog, model).restrict(ids if ids is not None else self.catalog.ids)

    # -- indexes and queries ------------------------------------------------------------------
    def index(self, model: str, backend: str = "faiss", **config: Any):
        """``model``'s index on ``backend``, built once per settings and reused by every search
        (an Elasticsearch index object is not reopened, nor its backfill checked, per query)."""
        key = (model, backend, tuple(sorted((k, repr(v)) for k, v in config.items())))
        if key not in self._indexes:
            self._indexes[key] = build_index(self.workdir, self.catalog, model, backend=backend, **config)
        return self._indexes[key]

    def pick_query(self, filters: Mapping[str, str | Sequence[str]], fallback: Mapping[str, str | Sequence[str]] | None = None, seed: int = 0) -> str:
        """A query item matching every ``column: value(s)`` of ``filters`` (e.g. a red dress), drawn
        with ``seed`` among :attr:`query_ids`; if none matches, one matching ``fallback`` (e.g. any
        dress), else any query item."""
        items = self.catalog.items.loc[self.query_ids]
        for wanted in (filters, fallback or {}, {}):
            mask = pd.Series(True, index=items.index)
            for column, value in wanted.items():
                if column not in items.columns:
                    mask &= False
                    continue
                values = [value] if isinstance(value, str) else list(value)
                mask &= items[column].isin(values)
            if mask.any():
                keys = pd.Series(hash_unit_interval(items.index[mask], f"query-{seed}"), index=items.index[mask])
                return str(keys.idxmin())
        raise CatalogError(f"catalog {self.catalog.name!r} has no query items")

    def pick_queries(self, n: int, column: str, seed: int = 0, min_items: int = 6) -> list[str]:
        """``n`` query items of ``n`` different ``column`` values, drawn with ``seed`` among the
        values that have at least ``min_items`` items (so a top-5 can be all hits)."""
        items = self.catalog.items.loc[self.query_ids]
        counts = self.catalog.items[self.catalog.require_column(column)].value_counts()
        values = [v for v in counts.index[counts >= min_items] if (items[column] == v).any()] or list(items[column].unique())
        keys = pd.Series(hash_unit_interval(values, f"classes-{seed}"), index=values)
        return [self.pick_query({column: value}, seed=seed) for value in keys.nsmallest(n).index]

    def index_table(self, backend: str = "faiss", **config: Any) -> pd.DataFrame:
        """Build (or load) each model's index; one row per model: size, dimensions, settings,
        whether it was loaded from disk and how long it took."""
        rows = []
        for model in self.models:
            started = time.perf_counter()
            index = self.index(model, backend, **config)
            described = index.describe()
            rows.append({
                "model": display_name(model),
                "backend": described.pop("backend", backend),
                "items": described.pop("size", None),
                "dim": described.pop("dim", None),
                "loaded from disk": bool(index.info.get("reused", False)),
                "seconds": round(time.perf_counter() - started, 3),
                "settings": ", ".join(f"{k}={v}" for k, v in described.items() if k not in ("model", "filter_columns")),
            })
        return pd.DataFrame(rows)

    def backend_agreement(self, backend: str, n_queries: int = 50, k: int = 5, filter_column: str | None = None, seed: int = 0) -> pd.DataFrame:
        """Mean overlap@k between FAISS exact search and ``backend`` (e.g. Elasticsearch) on
        ``n_queries`` items, per model, unfiltered and (with ``filter_column``) filtered."""
        ids = pd.Series(hash_unit_interval(self.query_ids, f"agree-{seed}"), index=self.query_ids).nsmallest(n_queries).index.tolist()
        rows = []
        for model in self.models:
            other = self.index(model, backend)
            for column in [None, filter_column] if filter_column else [None]:
                a = recommend(self.catalog, self.workdir, model, ids, k, same_category=column, index=self.index(model))
                b = recommend(self.catalog, self.workdir, model, ids, k, same_category=column, index=other)
                overlap = [_overlap(a.loc[a["query_id"] == q, "item_id"], b.loc[b["query_id"] == q, "item_id"]) for q in ids]
                rows.append({"model": display_name(model), "filter": column or "none", "queries": len(ids), f"overlap@{k}": round(float(sum(overlap) / len(overlap)), 4)})
        return pd.DataFrame(rows)

    def map_2d(self, column: str, n: int = 1500, method: str = "auto", seed: int = 0) -> tuple[dict[str, tuple[Any, list[str]]], str]:
        """2-D coordinates of each model's embeddings of the same ``n`` query items (seeded),
        with their ``column`` labels, for :func:`vrec_utils.plots.embedding_map`."""
        ids = self._common_ids(n, seed)
        labels = self.catalog.items.loc[ids, self.catalog.require_column(column)].astype(str).tolist()
        coords, used = {}, method
        for model in self.models:
            xy, used = project_2d(self.embeddings(model, ids).vectors, method, seed)
            coords[display_name(model)] = (xy, labels)
        return coords, used

    def label_silhouette(self, column: str, n: int = 1500, seed: int = 0) -> pd.DataFrame:
        """Cosine silhouette of the ``column`` classes in each model's full embedding space (higher:
        classes form tighter, better separated groups); classes with one item are left out."""
        from sklearn.metrics import silhouette_score

        ids = self._common_ids(n, seed)
        labels = self.catalog.items.loc[ids, self.catalog.require_column(column)].astype(str)
        counts = labels.map(labels.value_counts())
        ids = [i for i, c in zip(ids, counts) if c > 1]
        labels = labels.loc[ids]
        rows = []
        for model in self.models:
            vectors = self.embeddings(model, ids).vectors
            score = silhouette_score(vectors, labels.to_numpy(), metric="cosine") if labels.nunique() > 1 else float("nan")
            rows.append({"model": display_name(model), "items": len(ids), "classes": int(labels.nunique()), f"silhouette ({column})": round(float(score), 4)})
        return pd.DataFrame(rows)

    def _common_ids(self, n: int, seed: int) -> list[str]:
        """Up to ``n`` query items (seeded) that every model has a vector for."""
        ids = list(self.query_ids)
        for model in self.models:
            have = set(map(str, self.embeddings(model, ids).ids))
            ids = [i for i in ids if i in have]
        if len(ids) > n:
            keys = pd.Series(hash_unit_interval(ids, f"map-{seed}"), index=ids)
            chosen = set(keys.nsmallest(n).index)
            ids = [i for i in ids if i in chosen]
        return ids

    def recommendation_rows(self, query_id: str, k: int = 5, filter_column: str | None = None, filtered_models: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
        """Rows for :func:`vrec_utils.plots.recommendation_grid`, in the article's order: each
        model unfiltered, and right after the models in ``filtered_models`` (default: the first
        model) the same model with the ``filter_column`` filter (filtered kNN)."""
        if filtered_models is None:
            filtered_models = self.models[:1]
        rows: dict[str, pd.DataFrame] = {}
        for model in self.models:
            name = display_name(model)
            rows[name] = recommend(self.catalog, self.workdir, model, query_id, k, index=self.index(model))
            if filter_column and model in filtered_models:
                rows[f"{name} + {filter_column} filter"] = recommend(
                    self.catalog, self.workdir, model, query_id, k, same_category=filter_column, index=self.index(model)
                )
        return rows

    def visual_search_rows(self, image, k: int = 5, exclude_id: str | None = None) -> dict[str, pd.DataFrame]:
        """Visual search with ``image`` (a path or PIL image) for every model. ``exclude_id`` removes
        that catalog item from a copy of each index first, so a catalog photo acts as an image
        from outside the index."""
        rows = {}
        for model in self.models:
            index = self.index(model)
            if exclude_id is not None:
                index = build_index(self.workdir, self.catalog, model)  # a fresh copy: the cached one stays whole
                index.delete([exclude_id])
            rows[display_name(model)] = search_by_image(self.catalog, self.workdir, model, image, k, embedder=self.embedder(model), index=index)
        return rows

    def text_search_rows(self, queries: Sequence[str], k: int = 5) -> tuple[dict[str, dict[str, pd.DataFrame]], list[str]]:
        """``results[query][model]`` for every model with a text tower, and the image-only models left out."""
        text_models = self.text_models()
        results: dict[str, dict[str, pd.DataFrame]] = {q: {} for q in queries}
        for model in text_models:
            frame = search_by_text(self.catalog, self.workdir, model, list(queries), k, embedder=self.embedder(model), index=self.index(model))
            for number, query in enumerate(queries):
                results[query][display_name(model)] = frame[frame["query"] == number]
        return results, [display_name(m) for m in self.models if m not in text_models]


def _overlap(a: pd.Series, b: pd.Series) -> float:
    """Shared items over the longer list (a filtered search may return fewer than k)."""
    longest = max(len(a), len(b))
    return len(set(a) & set(b)) / longest if longest else 1.0


def _cached_count(workdir: Path, catalog: Catalog, model: str) -> int:
    try:
        return len(load_embeddings(workdir, catalog, model).restrict(catalog.ids))
    except EmbeddingsNotFoundError:
        return 0


def _extract_row(model, dim, n, new, cached, skipped, load_seconds, seconds, cache_dir) -> dict[str, Any]:
    return {
        "model": display_name(model),
        "dim": int(dim),
        "items": int(n),
        "embedded now": int(new),
        "from cache": int(cached),
        "skipped": int(skipped),
        "load s": round(load_seconds, 2),
        "extract s": round(seconds, 2),
        "images/s": round(new / seconds, 1) if new and seconds > 0 else None,
        "cache": cache_dir,
    }


def prepare(
    catalog: str | os.PathLike | Catalog | None = None,
    profile: str = "offline",
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    models: Sequence[str] | None = None,
    notes: Sequence[str] = (),
    sample_size: int | None = None,
    fallback: bool = True,
    seed: int = 0,
    device: str | None = "auto",
    progress: bool = True,
    weights: Mapping[str, str] | None = None,
) -> RunContext:
    """Open the catalog and resolve the models: the first call of every notebook.

    ``models`` (e.g. injected by ``vrec report``, which resolves the profile once) skips the
    resolution; ``notes`` are carried along to be shown at the top. ``weights``: local weights
    per model name (``{"siglip-base": DIR}``), instead of the hub or torch caches.
    """
    get_profile(profile)
    opened = open_catalog(catalog, sample_size, seed)
    if models:
        resolved = ResolvedProfile(profile, profile, list(models), list(notes))
    else:
        resolved = resolve_profile(profile, opened, workdir, fallback=fallback, device=device, progress=progress, weights=weights, train=True)
        resolved = ResolvedProfile(resolved.name, resolved.requested, resolved.models, [*notes, *resolved.notes])
    return RunContext(
        catalog=opened,
        workdir=Path(workdir),
        models=resolved.models,
        profile=resolved.name,
        requested_profile=resolved.requested,
        notes=list(resolved.notes),
        split=training_split(resolved.models, opened),
        device=device,
        progress=progress,
        weights=dict(weights or {}),
    )


def prepare_from(parameters: NotebookParameters | Mapping[str, Any], *, device: str | None = "auto") -> RunContext:
    """:func:`prepare` with a notebook's common parameters (:class:`NotebookParameters`, or the
    notebook's ``globals()`` from which they are read)."""
    if not isinstance(parameters, NotebookParameters):
        parameters = NotebookParameters.from_namespace(parameters)
    return prepare(
        parameters.catalog,
        parameters.profile,
        parameters.workdir,
        models=parameters.models,
        notes=parameters.profile_notes,
        sample_size=parameters.sample_size,
        fallback=parameters.fallback,
        seed=parameters.seed,
        device=device,
        progress=parameters.progress,
        weights=parameters.weights,
    )
