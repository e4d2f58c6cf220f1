"""Part 2: index fidelity. Each model's serving index (the project's FAISS backend: HNSW with an
``ef_search`` sweep, which plays the role of Elasticsearch's ``num_candidates``, and IVF with an
``nprobe`` sweep), with and without the category filter: recall@k against exact search of the
same vectors, and nDCG@5 through the index, with the paired model difference through each
setting (does the ranking of the models survive the serving index?).

Elasticsearch 9.1+ quantises dense vectors by default: ``bbq_hnsw`` from 384 dimensions (one bit
per dimension, the top candidates rescored in float, oversample 3), ``int8_hnsw`` below. Without
a server this is emulated with the same quantisers as part 1 (exact search over the codes, so the
rows show the quantisation's effect alone; the graph's is in the HNSW rows). The emulated BBQ
quantises the query too (symmetric Hamming), which is harsher than Elasticsearch's 4-bit queries.

Filtered ANN rows set ``exact_filter_max=0``: the filter is applied inside the graph traversal
(as Elasticsearch does), not answered by exact search over a small category.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..index import create_index
from ..index.exact import neighbour_recall
from .compression import DEFAULT_OVERSAMPLE, Variant, model_variants, search_variant
from .data import DecisionData

HNSW_EF = (8, 16, 32, 64, 128)
IVF_NPROBE = (1, 2, 4, 8, 16)
ES_BBQ_MIN_DIMS = 384  # Elasticsearch 9.1+: dense_vector fields of 384+ dims default to bbq_hnsw


def es_default_quantiser(dims: int) -> str:
    """What Elasticsearch 9.1+ stores by default for a ``dense_vector`` of ``dims`` dimensions."""
    return "binary+rerank" if dims >= ES_BBQ_MIN_DIMS else "int8"


def _index_search(data: DecisionData, index, vectors: np.ndarray, k: int, filtered: bool, **params) -> tuple[np.ndarray, float]:
    """Top-k positions through the index (the query excluded by id) and ms per query."""
    q = data.query_pos
    filters = None
    if filtered:
        column = data.category_column
        values = data.catalog.items.loc[data.ids[q], column].astype(str).to_numpy()
        filters = [{column: v} for v in values]
    start = time.perf_counter()
    result = index.search(vectors[q], k, filters=filters, exclude_ids=list(data.ids[q]), **params)
    seconds = time.perf_counter() - start
    found = np.asarray(result.ids, dtype=str)
    positions = pd.Index(data.ids).get_indexer(found.ravel()).reshape(found.shape)
    return positions, 1000.0 * seconds / len(q)


def _build(data: DecisionData, model: str, ann: str):
    vectors = data.vectors[model]
    columns = [data.category_column] if data.category_column else []
    index = create_index("faiss", model=model, dim=vectors.shape[1], filter_columns=columns, ann=ann, exact_filter_max=0)
    meta = data.catalog.items.loc[data.ids, columns].astype(str) if columns else None
    index.add(data.ids, vectors, metadata=meta)
    return index


def fidelity_rows(data: DecisionData, hnsw_ef: Sequence[int] = HNSW_EF, ivf_nprobe: Sequence[int] = IVF_NPROBE,
                  es_default: bool = True) -> tuple[dict, dict, list[dict]]:
    """Per-query values (rows ``(model, setting)``), dims, and one record per (model, setting)
    with recall@k, latency and what the setting is."""
    k, values, dims, records = data.k, {}, {}, []
    filters = [False, True] if data.category_column else [False]
    for model in data.models:
        x = data.vectors[model]
        sweeps = [(ann, name, sweep) for ann, name, sweep in (("hnsw", "ef_search", hnsw_ef), ("ivf", "nprobe", ivf_nprobe)) if sweep]
        indexes = {ann: _build(data, model, ann) for ann, _, _ in sweeps}
        for filtered in filters:
            tag = " +filter" if filtered else ""
            exact = data.search(x, x, k, filtered=filtered)
            values[(model, f"exact{tag}")], dims[(model, f"exact{tag}")] = data.score(exact), x.shape[1]
            records.append({"model": model, "setting": f"exact{tag}", "index": "exact", "parameter": "", "value": np.nan,
                            "filtered": filtered, f"recall@{k}": 1.0, "latency_ms_per_query": np.nan})
            for ann, name, sweep in sweeps:
                for value in sweep:
                    found, ms = _index_search(data, indexes[ann], x, k, filtered, **{name: int(value)})
                    setting = f"{ann} {name}={value}{tag}"
                    values[(model, setting)], dims[(model, setting)] = data.score(found), x.shape[1]
                    records.append({"model": model, "setting": setting, "index": ann, "parameter": name, "value": value,
                                    "filtered": filtered, f"recall@{k}": neighbour_recall(found, exact).mean(), "latency_ms_per_query": ms})
            if es_default:
                kind = es_default_quantiser(x.shape[1])
                variant = next(v for v in model_variants(data, model, pca_dims=(), quantisers=(kind,)) if v.name == kind)
                found = search_variant(data, variant, filtered=filtered)
                setting = f"es-default{tag}"  # one name for both models (their quantisers may differ: see "note")
                values[(model, setting)], dims[(model, setting)] = data.score(found), x.shape[1]
                records.append({"model": model, "setting": setting, "index": f"es-default {'bbq' if kind != 'int8' else 'int8'} (emulated)", "parameter": "quantiser",
                                "value": np.nan, "filtered": filtered, f"recall@{k}": neighbour_recall(found, exact).mean(),
                                "latency_ms_per_query": np.nan, "note": _es_note(variant)})
    return values, dims, records


def _es_note(variant: Variant) -> str:
    if variant.family == "binary":
        return f"bbq emulated: centred sign bits, top {DEFAULT_OVERSAMPLE}k rescored in float32 ({variant.dims} dims >= {ES_BBQ_MIN_DIMS})"
    return f"int8_hnsw emulated: FAISS QT_8bit, no rescoring ({variant.dims} dims < {ES_BBQ_MIN_DIMS})"


def fidelity_table(data: DecisionData, records: list[dict], result, metric: str = "ndcg@5") -> pd.DataFrame:
    """The records with nDCG@5 and its CI through each setting."""
    summary = result.summary().set_index(["model", "setting", "metric"])
    frame = pd.DataFrame(records)
    stats = [summary.loc[(m, s, metric)] for m, s in zip(frame["model"], frame["setting"])]
    frame[metric] = [s["mean"] for s in stats]
    frame[f"{metric}_low"] = [s["ci_low"] for s in stats]
    frame[f"{metric}_high"] = [s["ci_high"] for s in stats]
    frame["model"] = frame["model"].map(data.labels)
    return frame


def ranking_survival(data: DecisionData, result, metric: str = "ndcg@5") -> pd.DataFrame:
    """Paired difference (second model - first) of ``metric`` in every setting both models have,
    with its bootstrap CI and permutation p; ``same_winner_as_exact`` compares the sign with exact
    search (unfiltered or filtered, alike); ``same_conclusion_as_exact`` also asks that the CI
    excludes 0 exactly when it does at exact search (the same verdict: better, worse or a tie)."""
    if len(data.models) < 2:
        return pd.DataFrame()
    a, b = data.models[0], data.models[1]
    settings = [s for m, s in result.values if m == a and (b, s) in result.values]
    frame = pd.concat([result.compare((a, s), (b, s), [metric]) for s in settings], ignore_index=True)
    frame["significant"] = (frame["diff_ci_low"] > 0) | (frame["diff_ci_high"] < 0)
    # the conclusion: +1 / -1 when the second / first model is better beyond the CI, 0 when not distinguishable
    conclusion = np.where(frame["significant"], np.sign(frame["diff"]), 0).astype(int)
    exact = dict(zip(frame["setting_a"], conclusion))
    reference = [exact["exact +filter" if s.endswith("+filter") else "exact"] for s in frame["setting_a"]]
    frame["same_winner_as_exact"] = [np.sign(d) == np.sign(r) for d, r in zip(frame["diff"], reference)]
    frame["same_conclusion_as_exact"] = conclusion == np.asarray(reference)
    frame["model_a"], frame["model_b"] = frame["model_a"].map(data.labels), frame["model_b"].map(data.labels)
    return frame.rename(columns={"setting_a": "setting"}).drop(columns=["setting_b"])


__all__ = ["ES_BBQ_MIN_DIMS", "HNSW_EF", "IVF_NPROBE", "es_default_quantiser", "fidelity_rows", "fidelity_table", "ranking_survival"]
