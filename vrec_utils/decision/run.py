"""One call for the whole decision report: :func:`run_decision` computes the seven parts from the
cached embeddings and returns (and, with ``tables_dir``, writes as ``decision_<name>.csv``) every
table the verdict's numbers come from. The notebook ``08_decision`` and ``vrec decide`` call it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..catalog import Catalog, Split
from ..images import load_rgb
from ..index.es_requests import INDEX_TYPES, SERVER_DEFAULT
from ..store import Embeddings, load_embeddings
from .categories import CORRECTIONS, category_table
from .compression import (
    DEFAULT_OVERSAMPLE,
    DEFAULT_PCA_DIMS,
    QUANTISERS,
    frontier_rows,
    frontier_table,
    measure_latency,
    model_variants,
)
from .data import DecisionData, decision_data
from .es_server import ES_INDEX_TYPES, ES_NUM_CANDIDATES, ES_QUERIES, sampled, server_rows, server_table
from .fidelity import (
    HNSW_EF,
    IVF_NPROBE,
    fidelity_rows,
    fidelity_table,
    ranking_survival,
)
from .filtering import filter_contrast, filter_rows, filter_table
from .interactions import interaction_quality, read_log
from .power import ABPlan, ab_plan_table, offline_scenarios
from .protocols import protocol_table
from .verdict import verdict_lines


@dataclass(frozen=True)
class DecisionParams:
    """Settings of the decision report (defaults documented beside each)."""

    label: str = "articleType"  # relevance: same value of this column
    category_column: str | None = "subCategory"  # the filter of parts 2-4 (None: skip parts 3-4)
    pca_dims: Sequence[int] = DEFAULT_PCA_DIMS
    quantisers: Sequence[str] = QUANTISERS
    truncate_models: Sequence[str] = ()  # models trained for truncation (Matryoshka): also trunc<d> rows
    oversample: int = DEFAULT_OVERSAMPLE  # binary+rerank rescoring depth, x k
    hnsw_ef: Sequence[int] = HNSW_EF
    ivf_nprobe: Sequence[int] = IVF_NPROBE
    max_queries: int | None = None  # a seeded subset of the queries (None: all)
    latency_queries: int = 256
    seed: int = 0
    n_bootstrap: int = 1000
    n_permutations: int = 5000
    correction: str = "holm"  # or "fdr_bh"
    alpha: float = 0.05
    min_category_queries: int = 5
    ab: ABPlan = field(default_factory=ABPlan)
    # Elasticsearch measured on a server (part 2): "auto" when VREC_ES_URL is set, "on" (the
    # server of VREC_ES_* / localhost:9200 must answer), "off" (the es-default rows stay emulated)
    elasticsearch: str = "auto"
    es_index_types: Sequence[str] = ES_INDEX_TYPES  # "default": the mapping left to the server
    es_num_candidates: Sequence[int] = ES_NUM_CANDIDATES
    es_queries: int | None = ES_QUERIES  # a seeded subset of the queries sent to the server (None: all)
    es_keep: bool = False  # keep the report's indexes (reused by the next run while their content matches)

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {self.correction!r}")
        if self.elasticsearch not in ("auto", "on", "off"):
            raise ValueError(f"elasticsearch must be auto, on or off, got {self.elasticsearch!r}")
        unknown = [t for t in self.es_index_types if t not in INDEX_TYPES + (SERVER_DEFAULT,)]
        if unknown:
            raise ValueError(f"es_index_types: unknown {', '.join(unknown)}; known: {', '.join(INDEX_TYPES + (SERVER_DEFAULT,))}")

    @property
    def measure_es(self) -> bool:
        return self.elasticsearch == "on" or (self.elasticsearch == "auto" and bool(os.environ.get("VREC_ES_URL", "").strip()))


@dataclass
class DecisionReport:
    """Every table of the report, the verdict and the notes."""

    tables: dict[str, pd.DataFrame]
    verdict: list[str]
    notes: list[str]
    models: list[str]  # the labels shown (first = baseline)
    seconds: dict[str, float]
    written: list[Path] = field(default_factory=list)

    def table(self, name: str) -> pd.DataFrame:
        if name not in self.tables:
            raise KeyError(f"no decision table {name!r}; tables: {', '.join(self.tables)}")
        return self.tables[name]


def run_decision(
    catalog: Catalog,
    embeddings: Mapping[str, Embeddings] | None = None,
    *,
    workdir: str | os.PathLike | None = None,
    models: Sequence[str] = (),
    params: DecisionParams | None = None,
    split: Split | None = None,
    throughput: Mapping[str, float] | None = None,
    text_encoders: Mapping[str, Callable[[list[str]], np.ndarray]] | None = None,
    tables_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    es_client: Any = None,
    interactions: str | os.PathLike | pd.DataFrame | None = None,
) -> DecisionReport:
    """The decision report for ``embeddings`` (or the cached ones of ``models`` in ``workdir``;
    a model without a cache raises EmbeddingsNotFoundError naming the command that makes it).
    The first model is the baseline (the CNN), the second the candidate (the VLM).
    ``throughput``: images/s per model (e.g. from ``RunContext.extract``); ``text_encoders``:
    per model with a text tower, texts -> unit vectors (part 6's text protocols). Elasticsearch is
    measured as ``params.elasticsearch`` says, on the server of the ``VREC_ES_*`` settings (or
    ``es_client``, an ``elasticsearch.Elasticsearch`` client). ``interactions``: a log
    (``query_id,item_id[,weight]``) whose paired nDCG@5 difference joins the label one in the
    ``quality`` table and the verdict."""
    params = params or DecisionParams()
    say = progress or (lambda _: None)
    log = read_log(interactions) if interactions is not None else None  # a bad log fails before any work
    if embeddings is None:
        if workdir is None or not models:
            raise ValueError("give embeddings, or a workdir and models")
        embeddings = {m: load_embeddings(workdir, catalog, m) for m in dict.fromkeys(models)}
    data = decision_data(catalog, embeddings, label=params.label, category_column=params.category_column, split=split,
                         max_queries=params.max_queries, seed=params.seed, n_bootstrap=params.n_bootstrap,
                         n_permutations=params.n_permutations)
    tables: dict[str, pd.DataFrame] = {}
    seconds: dict[str, float] = {}
    notes = list(data.notes)

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        say(f"decision: {name} ...")
        start = time.perf_counter()
        out = fn()
        seconds[name] = round(time.perf_counter() - start, 2)
        return out

    timed("1 frontier", lambda: _frontier(data, params, throughput, tables, notes))
    if log is not None and len(data.models) > 1:
        row, note = timed("7 interactions", lambda: interaction_quality(data, *log))
        tables["quality"] = pd.concat([tables["quality"], row], ignore_index=True)
        notes.append(note)
    timed("2 fidelity", lambda: _fidelity(data, params, tables))
    if params.measure_es:
        timed("2 elasticsearch", lambda: _elasticsearch(data, params, tables, es_client))
    else:
        notes.append("Elasticsearch's default quantisation is emulated, not measured (set VREC_ES_URL to measure it on a server)")
    if data.category_column is not None:
        filter_result = timed("3 filter", lambda: _filter(data, tables))
        timed("4 categories", lambda: _categories(data, params, tables, filter_result))
    else:
        notes.append("parts 3-4 skipped: the catalog has no category column to filter on")
    timed("5 A/B plan", lambda: _ab(params, tables))
    protocols, protocol_notes = timed("6 protocols", lambda: protocol_table(data, text_encoders))
    tables["protocols"] = protocols
    notes += protocol_notes
    labels = [data.labels[m] for m in data.models]
    verdict = verdict_lines(tables, labels[0], labels[1], params.label, data.n_queries, params.correction) if len(labels) > 1 else []
    if len(labels) < 2:
        notes.append("one model only: no comparison, no verdict")
    report = DecisionReport(tables, verdict, notes, labels, seconds)
    if tables_dir is not None:
        report.written = write_tables(report, tables_dir)
    return report


def _frontier(data: DecisionData, params: DecisionParams, throughput, tables: dict, notes: list[str]) -> None:
    variants = []
    for model in data.models:
        variants += model_variants(data, model, params.pca_dims, params.quantisers, truncate=model in params.truncate_models,
                                   oversample=params.oversample)
    if not params.truncate_models:
        notes.append("no truncation rows: no model here was trained for truncated (Matryoshka) dimensions")
    values, dims = frontier_rows(data, variants)
    result = data.result(values, dims)
    latency = {(v.model, v.name): measure_latency(v, data.train[v.model], params.latency_queries, data.k, data.seed) for v in variants}
    tables["frontier"] = frontier_table(data, variants, result, latency, throughput)
    if len(data.models) > 1:
        a, b = data.models[0], data.models[1]
        quality = result.compare((a, "float32"), (b, "float32"), ["ndcg@5"])
        quality["model_a"], quality["model_b"] = data.labels[a], data.labels[b]
        quality["relevance"] = data.relevance.description
        tables["quality"] = quality


def _fidelity(data: DecisionData, params: DecisionParams, tables: dict) -> None:
    values, dims, records = fidelity_rows(data, params.hnsw_ef, params.ivf_nprobe)
    result = data.result(values, dims)
    tables["fidelity"] = fidelity_table(data, records, result)
    pairs = ranking_survival(data, result)
    if len(pairs):
        tables["fidelity_pairs"] = pairs


def _elasticsearch(data: DecisionData, params: DecisionParams, tables: dict, client) -> None:
    sample = sampled(data, params.es_queries)
    values, dims, records = server_rows(sample, params.es_index_types, params.es_num_candidates, client=client, keep=params.es_keep)
    result = sample.result(values, dims)
    tables["es"] = server_table(sample, records, result, data.n_queries)
    pairs = ranking_survival(sample, result)
    if len(pairs):
        source = dict(zip(tables["es"]["setting"], tables["es"]["source"]))
        pairs.insert(1, "source", pairs["setting"].map(source))
        pairs["queries"] = tables["es"]["queries"].iloc[0]
        tables["es_pairs"] = pairs


def _filter(data: DecisionData, tables: dict):
    values, dims, violations = filter_rows(data)
    result = data.result(values, dims)
    tables["filter"] = filter_table(data, result, violations)
    contrast = filter_contrast(data, result, violations)
    if len(contrast):
        tables["filter_contrast"] = contrast
    return result  # part 4 reuses its unfiltered rows


def _categories(data: DecisionData, params: DecisionParams, tables: dict, result) -> None:
    table = category_table(data, result, min_queries=params.min_category_queries, correction=params.correction, alpha=params.alpha)
    if len(table):
        tables["categories"] = table


def _ab(params: DecisionParams, tables: dict) -> None:
    plan = ab_plan_table(params.ab)
    quality = tables.get("quality")
    if quality is not None and len(quality):
        q = quality.iloc[0]
        scenarios = offline_scenarios(params.ab, q["rel_improvement_pct"], q["rel_ci_low"], q["rel_ci_high"])
        factor = scenarios.attrs["factor_for_mde"]
        plan = pd.concat([plan, pd.DataFrame([{
            "quantity": "offline-to-online factor at which the offline gain equals the MDE", "value": factor,
            "note": "100 * mde_relative / offline relative nDCG@5 gain %; hypothetical, not a known conversion"}])], ignore_index=True)
        tables["ab_scenarios"] = scenarios
    tables["ab_plan"] = plan


def embedding_throughput(embedder, catalog: Catalog, n: int = 64, seed: int = 0) -> float:
    """Images per second of ``embedder`` on ``n`` catalog images drawn with ``seed`` (decoding
    included, after one warm-up batch of 4): the cost of embedding, measured on this machine."""
    from .data import seeded_rows

    paths = catalog.items["image"].to_numpy()[seeded_rows(len(catalog), n, seed, "throughput")]
    embedder.embed_images([load_rgb(p) for p in paths[:4]])
    start = time.perf_counter()
    embedder.embed_images([load_rgb(p) for p in paths])
    return len(paths) / (time.perf_counter() - start)


def write_tables(report: DecisionReport, tables_dir: str | os.PathLike) -> list[Path]:
    """Each table as ``decision_<name>.csv`` and the verdict as ``decision_verdict.md``."""
    directory = Path(tables_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in report.tables.items():
        path = directory / f"decision_{name}.csv"
        frame.to_csv(path, index=False)
        written.append(path)
    path = directory / "decision_verdict.md"
    path.write_text("\n\n".join(report.verdict + [f"> {n}" for n in report.notes]) + "\n")
    written.append(path)
    return written


__all__ = ["DecisionParams", "DecisionReport", "embedding_throughput", "run_decision", "write_tables"]
