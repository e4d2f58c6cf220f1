"""The evaluation call: ``evaluate(catalog, embeddings, EvalConfig(...)) -> EvaluationResult``.

Candidates and queries (:mod:`.candidates`, :mod:`.relevance`), one retrieval per model and
setting (:mod:`.retrieval`), metrics per query (:mod:`vrec_utils.metrics`), and the config record
that the result and its JSON carry. :func:`evaluate_embeddings` and :func:`evaluate_models` take
the settings as keyword arguments (the CLI, notebooks and benchmarks call them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..catalog import Catalog, load_catalog
from ..index import VectorIndex, get_index_class, index_of_embeddings
from ..metrics import compute_metrics
from ..store import Embeddings, load_embeddings
from .candidates import pca_vectors, select_candidates, unit_rows
from .config import GAIN_FORMULAS, MATRIX, UNFILTERED, EvalConfig
from .relevance import (
    InteractionRelevance,
    LabelRelevance,
    interaction_queries,
    label_queries,
)
from .result import EvaluationResult, RowKey
from .retrieval import Retriever
from .sampling import stratified_sample


def evaluate(catalog: Catalog, embeddings: Mapping[str, Embeddings], config: EvalConfig | None = None) -> EvaluationResult:
    """Evaluate already-loaded embeddings (``{model name: Embeddings}``) as ``config`` says; see
    the :mod:`vrec_utils.evaluation` doc for the protocol."""
    config = config or EvalConfig()
    if not embeddings:
        raise ValueError("no models to evaluate")
    for column in config.label_columns + ([config.filter_column] if config.filter_column else []):
        catalog.require_column(column)
    for members in config.fusions:
        unknown = [m for m in members if m not in embeddings]
        if len(members) < 2 or unknown:
            raise ValueError(f"a fusion needs two or more evaluated models; got {list(members)} (models: {', '.join(embeddings)})")

    ids, report = select_candidates(catalog, embeddings, config.split, config.exclude_duplicates)
    n_cand, depth = len(ids), config.depth
    if depth > n_cand - 1:
        raise ValueError(
            f"k={depth} is larger than the candidate set: {n_cand} items, so at most {n_cand - 1} candidates per query "
            f"once the query itself is excluded; use k <= {n_cand - 1}"
        )
    cand_items = catalog.items.loc[ids]
    queries = _queries(catalog, config, ids, cand_items, report)
    scoring = _Scoring(config, queries, ids.to_numpy(dtype=str), cand_items[[config.filter_column]] if config.filter_column else None, catalog=catalog)
    notes = scoring.score_models(embeddings)
    if config.filter_column:
        notes.append(f"filtered:{config.filter_column} keeps candidates with the query's own {config.filter_column} (an oracle filter)")
        if config.interactions is None and config.filter_column == config.label_columns[-1]:
            notes.append(
                f"the filter column {config.filter_column} is the relevance label: every filtered result is relevant by "
                "construction; filter on a coarser column (e.g. subCategory for articleType relevance) to compare fairly"
            )
    label_cols = [c for c in catalog.items.columns if c not in ("image", "title")]
    return EvaluationResult(
        query_ids=scoring.ids[queries.positions],
        candidate_ids=scoring.ids,
        query_items=cand_items.iloc[queries.positions][label_cols].reset_index(drop=True),
        values=scoring.values,
        metrics=list(config.metrics),
        dims=scoring.dims,
        config=config_record(config, catalog, embeddings, queries.relevance.description, notes, scoring.indexes),
        report=report,
        category_column=queries.category_column,
    )


@dataclass(frozen=True)
class _Queries:
    """Relevance over the candidates, the queries' positions among them, and what they need."""

    relevance: LabelRelevance | InteractionRelevance
    positions: np.ndarray
    category_column: str | None
    n_relevant: np.ndarray
    ideal: np.ndarray


def _queries(catalog: Catalog, config: EvalConfig, ids: pd.Index, cand_items: pd.DataFrame, report: dict[str, Any]) -> _Queries:
    """Relevance and queries (the candidates with a relevant candidate); fills ``report``."""
    if config.interactions is not None:
        relevance, query_pos, report["interactions"] = interaction_queries(config.interactions, ids, catalog.items.index)
        report["no_relevant"] = {
            "count": report["interactions"]["logged_queries_without_relevant"],
            "classes": {},
            "note": "evaluated items logged as queries whose logged items are all outside the candidates (or themselves)",
        }
        category_column = config.filter_column
    else:
        relevance, query_pos, report["no_relevant"] = label_queries(cand_items, config.label_columns)
        category_column = config.label_columns[-1]
    if len(query_pos) == 0:
        raise ValueError("no query has a relevant candidate; nothing to evaluate")
    if config.sample_queries is not None:
        query_pos = _sample(config, query_pos, cand_items, category_column, report)
    n_rel = relevance.n_relevant(query_pos)
    report["queries"] = len(query_pos)
    return _Queries(relevance, query_pos, category_column, n_rel, relevance.ideal(query_pos, config.depth))


def _sample(config: EvalConfig, query_pos: np.ndarray, cand_items: pd.DataFrame, column: str | None, report: dict[str, Any]) -> np.ndarray:
    """``config.sample_queries`` of the queries (seeded, stratified by ``column``); recorded in ``report``."""
    labels = cand_items[column].to_numpy(dtype=str)[query_pos] if column else np.zeros(len(query_pos), dtype=str)
    sampled = stratified_sample(query_pos, labels, int(config.sample_queries), config.seed)
    report["query_sample"] = {
        "queries": len(sampled), "of": len(query_pos), "seed": int(config.seed), "stratified_by": column,
        "note": "sampled queries search every candidate; the bootstrap CIs include the sampling uncertainty",
    }  # fmt: skip
    return sampled


@dataclass
class _Scoring:
    """Per-query metric values of every (model, setting) row, filled model by model."""

    config: EvalConfig
    queries: _Queries
    ids: np.ndarray  # the candidate ids
    metadata: pd.DataFrame | None  # the filter column of the candidates
    values: dict[RowKey, dict[str, np.ndarray]] = field(default_factory=dict)
    dims: dict[RowKey, int] = field(default_factory=dict)
    indexes: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> the index's settings (index backends)
    catalog: Catalog | None = None  # the catalog, for the saved indexes of its cache (see saved_index)

    def score(self, name: str, settings: list[tuple[str, str | None]], variant: str, vectors: np.ndarray, saved: VectorIndex | None = None) -> None:
        """Retrieve with ``vectors`` (through ``saved`` when given) and score each setting
        (setting name, filter column or None)."""
        config, q = self.config, self.queries
        retriever = Retriever(config.backend, variant, self.ids, vectors, self.metadata, config.index_options, index=saved)
        if retriever.index is not None:
            described = retriever.index.describe()
            self.indexes[variant] = {k: v for k, v in described.items() if k not in ("model", "filter_columns")}
            if saved is not None:
                self.indexes[variant].update(saved_index=saved.info.get("path"), reused=bool(saved.info.get("reused")))
        for setting, column in settings:
            rel = q.relevance.grades(q.positions, retriever.search(q.positions, config.depth, column))
            self.values[(name, setting)] = compute_metrics(rel, list(config.metrics), ideal=q.ideal, n_relevant=q.n_relevant, gain=config.gain)
            self.dims[(name, setting)] = vectors.shape[1]

    def score_models(self, embeddings: Mapping[str, Embeddings]) -> list[str]:
        """Every model and fusion (unfiltered, and filtered with a filter column), then the PCA
        rows; returns the notes on what was fitted or skipped."""
        config = self.config
        variants = {name: unit_rows(emb.vectors_for(self.ids), name, self.ids) for name, emb in embeddings.items()}
        for members in config.fusions:
            variants["+".join(members)] = np.hstack([variants[m] for m in members]) / np.float32(np.sqrt(len(members)))
        settings: list[tuple[str, str | None]] = [(UNFILTERED, None)]
        if config.filter_column:
            settings.append((f"filtered:{config.filter_column}", config.filter_column))
        notes: list[str] = []
        for name, vectors in variants.items():
            saved = self.saved_index(embeddings[name], notes) if name in embeddings else None
            self.score(name, settings, name, vectors, saved)
        return notes + (self.score_pca(embeddings, variants) if config.pca_dims else [])

    def saved_index(self, emb: Embeddings, notes: list[str]) -> VectorIndex | None:
        """For backends whose index ``vrec index`` saves next to the cache (``ivf-ondisk``): that
        index when its catalog fingerprint, model identity, vectors, labels and build settings
        match, else one built and saved there now (saying so); None (a temporary index per run,
        as before) for other backends or embeddings not loaded from a cache."""
        config = self.config
        if config.backend == MATRIX or not getattr(get_index_class(config.backend), "evaluation_reuses_saved", False):
            return None
        folder, catalog = emb.manifest.get("catalog_dir"), self.catalog
        if not folder or catalog is None or (config.filter_column and config.filter_column not in catalog.label_columns):
            return None
        cls, build = get_index_class(config.backend), dict(config.index_options)
        search = {k: build.pop(k) for k in cls.search_options + ("threads",) if k in build}  # this run's, not recorded in the index
        index = index_of_embeddings(emb, catalog, backend=config.backend, cache_dir=folder, **build)
        if search:  # reopened (memory-mapped: cheap) with this run's search settings
            reused, index = index.info.get("reused"), cls.load(index.info["path"], **search)
            index.info["reused"] = reused
        if index.info.get("reused"):
            notes.append(f"{emb.model}: searched the saved {config.backend} index {index.info.get('path')} (same catalog, model identity, vectors, labels and build settings)")
        else:
            notes.append(
                f"{emb.model}: no saved {config.backend} index matched this catalog, model identity, vectors, labels and build "
                f"settings; built one and saved it in {index.info.get('path')} (later runs reuse it)"
            )
        return index

    def score_pca(self, embeddings: Mapping[str, Embeddings], variants: dict[str, np.ndarray]) -> list[str]:
        """``pca<d>`` rows of every model (fitted on the split's train items, else on the candidates)."""
        config, dims = self.config, list(self.config.pca_dims)
        split = config.split
        notes = ["PCA fitted on the split's train items" if split is not None else "PCA fitted on the evaluated items themselves (no split given)"]
        for name, emb in embeddings.items():
            usable = [d for d in dims if d < emb.dim]
            if len(usable) < len(dims):
                notes.append(f"pca dims >= {emb.dim} skipped for {name} (it has {emb.dim} dimensions)")
            if not usable:
                continue
            train = emb.restrict(split.train).vectors.astype(np.float32) if split is not None else variants[name]
            usable = [d for d in usable if d <= len(train)]
            if not usable:
                notes.append(f"pca skipped for {name}: only {len(train)} training vectors")
                continue
            for d, reduced in pca_vectors(train, variants[name], usable, config.seed, self.ids).items():
                self.score(name, [(f"pca{d}", None)], f"{name}-pca{d}", reduced)
        return notes


def config_record(
    config: EvalConfig, catalog: Catalog, embeddings: Mapping[str, Embeddings], relevance: str, notes: list[str],
    indexes: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The config as the result and its JSON record it (settings plus what they mean);
    ``indexes``: the settings of the index that answered each model's queries (index backends)."""
    split = config.split
    return {
        "relevance": relevance,
        "gain": config.gain,
        "gain_formula": GAIN_FORMULAS[config.gain],
        "discount": "1 / log2(rank + 1)",
        "ideal_dcg": "over all relevant items among the candidates",
        "map": "AP@k = sum_{i<=k} P@i * rel_i / min(k, n_relevant)",
        "ks": list(config.ks),
        "metrics": list(config.metrics),
        "ci_method": config.ci_method,
        "confidence": config.confidence,
        "n_bootstrap": int(config.n_bootstrap),
        "n_permutations": int(config.n_permutations),
        "pvalue": "two-sided paired sign-flip permutation test of the mean difference",
        "seed": int(config.seed),
        "backend": config.backend,
        "index_options": dict(config.index_options),
        "answered_by": answered_by(config, indexes),
        "index_settings": {name: dict(settings) for name, settings in (indexes or {}).items()},
        "sample_queries": config.sample_queries,
        "catalog": catalog.name,
        # which weights made each model's numbers (a digest; "random-init" marks test-only models)
        "weights": {name: weights_of(emb) for name, emb in embeddings.items()},
        "split": None if split is None else {"seed": split.seed, "eval_fraction": split.eval_fraction},
        "exclude_duplicates": bool(config.exclude_duplicates),
        "filter_column": config.filter_column,
        "pca_dims": list(config.pca_dims),
        "fusions": ["+".join(f) for f in config.fusions],
        "notes": notes,
    }


#: index settings worth naming in the one-line "answered by" (the rest are in index_settings)
_NAMED_SETTINGS = ("ann", "factory", "nlist", "nprobe", "ef_search", "memory_budget", "index_type")


def answered_by(config: EvalConfig, indexes: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """Which index answered the queries, in words: the settings asked for, or (given the built
    ``indexes``' descriptions) those the first model's index was built and searched with."""
    if config.backend == MATRIX:
        return "exact similarity-matrix blocks (matrix backend)"
    built = next(iter((indexes or {}).values()), None)
    if built is not None:
        named = {k: built[k] for k in _NAMED_SETTINGS if built.get(k) is not None}
        return f"{config.backend} index (" + ", ".join(f"{k}={v}" for k, v in named.items()) + ")" if named else f"{config.backend} index"
    options = ", ".join(f"{k}={v}" for k, v in sorted(config.index_options.items()))
    return f"{config.backend} index" + (f" ({options})" if options else " (default settings)")


def weights_of(embeddings: Embeddings) -> str:
    """The weights identity recorded in an embedding cache's manifest, flagged when random."""
    weights = str((embeddings.manifest.get("identity") or {}).get("weights") or "unknown")
    return f"{weights} (random weights: test only)" if weights.startswith("random-init") else weights


def evaluate_embeddings(catalog: Catalog, embeddings: Mapping[str, Embeddings], **options: Any) -> EvaluationResult:
    """:func:`evaluate` with the :class:`EvalConfig` fields as keyword arguments."""
    return evaluate(catalog, embeddings, EvalConfig(**options))


def evaluate_models(
    catalog: Catalog | str | os.PathLike,
    workdir: str | os.PathLike,
    models: Sequence[str],
    *,
    allow_partial: bool = False,
    **options: Any,
) -> EvaluationResult:
    """Evaluate the cached embeddings of ``models`` (loaded with :func:`load_embeddings`).

    Relevance: ``label="articleType"`` (default), ``hierarchy=["masterCategory",
    "subCategory", "articleType"]`` or ``interactions="log.csv"``. Other options:
    ``ks=(5, 10)``, ``metrics`` (default: ndcg, precision, recall, mrr, map at each k),
    ``split`` (evaluate on ``split.eval`` only), ``filter_column``, ``exclude_duplicates=True``,
    ``gain="exp2"`` or ``"linear"``, ``pca_dims=[32, 64, 128]``, ``fusions=[("m1", "m2")]``,
    ``n_bootstrap=2000``, ``n_permutations=10000``, ``ci_method="bca"`` or ``"percentile"``,
    ``confidence=0.95``, ``seed=0``, ``backend="matrix"`` (exact similarity-matrix blocks) or
    an index backend such as ``"faiss"`` (through vrec_utils.index, with ``index_options``)
    (the fields of :class:`EvalConfig`). Raises EmbeddingsNotFoundError for a model with no
    cache, CatalogError for a label column that does not exist, and PartialCacheError when
    catalog items lack a vector unless ``allow_partial`` (then items without a vector for every
    model are left out).
    """
    config = EvalConfig(**options)
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog)
    names = list(dict.fromkeys(models))
    if not names:
        raise ValueError("no models to evaluate")
    embeddings = {name: load_embeddings(workdir, catalog, name, allow_partial=allow_partial) for name in names}
    return evaluate(catalog, embeddings, config)


__all__ = ["answered_by", "config_record", "evaluate", "evaluate_embeddings", "evaluate_models", "weights_of"]
