"""Part 7: the verdict block. Each sentence is computed from the decision tables and names the
table (CSV beside the report) its numbers come from. Latencies and embedding speeds are
measurements of this CPU and change between runs; every other number is reproduced exactly by
the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd


def _f(x: float, digits: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _ci(row, low: str, high: str) -> str:
    return f"95% CI {_f(row[low], sign=True)} to {_f(row[high], sign=True)}"


def _better(r) -> str:
    return "better than" if r["diff_ci_low"] > 0 else "worse than" if r["diff_ci_high"] < 0 else "not distinguishable from"


def quality_sentence(comparison: pd.Series, label: str, n_queries: int, interactions: pd.Series | None = None) -> str:
    """What labels say (``comparison``) and, when a log was given, what interactions say."""
    r = comparison
    text = (f"**Quality:** labels (same {label}, {n_queries} queries) say {r['model_b']} is {_better(r)} {r['model_a']} on nDCG@5 "
            f"({_f(r['mean_b'])} vs {_f(r['mean_a'])}, difference {_f(r['diff'], sign=True)}, {_ci(r, 'diff_ci_low', 'diff_ci_high')}, "
            f"{_p(r['p_value'])}; {_f(r['rel_improvement_pct'], 1, sign=True)}% relative)")
    if interactions is None:
        return text + "; no interaction log was given, so users' behaviour is not in this verdict (--interactions). [decision_quality.csv]"
    i = interactions
    text += (f"; interactions ({int(i['n_queries'])} logged queries, graded by weight) say it is {_better(i)} it "
             f"({_f(i['mean_b'])} vs {_f(i['mean_a'])}, difference {_f(i['diff'], sign=True)}, {_ci(i, 'diff_ci_low', 'diff_ci_high')}, {_p(i['p_value'])})")
    agree = _better(r) == _better(i)
    return text + (": the two agree." if agree else ": they disagree, and the A/B test is what settles it.") + " [decision_quality.csv]"


def cost_sentence(frontier: pd.DataFrame, a: str, b: str) -> str:
    fa = frontier[(frontier["model"] == a) & (frontier["variant"] == "float32")].iloc[0]
    fb = frontier[(frontier["model"] == b) & (frontier["variant"] == "float32")].iloc[0]
    text = (f"**Cost:** as float32, {b} stores {fb['bytes_per_item']:.0f} bytes per item vs {fa['bytes_per_item']:.0f} for {a}; "
            f"search takes {_f(fb['latency_ms_per_query'])} vs {_f(fa['latency_ms_per_query'])} ms per query (measured here, varies between runs); "
            f"embedding runs at {_f(fb['images_per_s'], 1)} vs {_f(fa['images_per_s'], 1)} images/s.")
    merc = frontier[frontier["mercari_baseline"]]
    if len(merc):
        m = merc.iloc[0]
        cheaper = frontier[(frontier["model"] == b) & frontier["pareto"] & (frontier["ndcg@5_low"] > m["ndcg@5_high"])]
        cheaper = cheaper.sort_values("bytes_per_item", kind="stable")
        text += f" Mercari's baseline ({a} PCA-128, {m['bytes_per_item']:.0f} B) scores {_f(m['ndcg@5'])}"
        if len(cheaper):
            c = cheaper.iloc[0]
            text += f"; the smallest {b} variant on the front that beats it beyond both CIs is {c['variant']} ({c['bytes_per_item']:.0f} B, {_f(c['ndcg@5'])})."
        else:
            text += f"; no {b} variant on the front beats it beyond both CIs."
    return text + " [decision_frontier.csv]"


def serving_sentence(survival: pd.DataFrame) -> str:
    if survival.empty:
        return ""
    kept = survival[survival["setting"].str.startswith(("hnsw", "ivf", "es-default"))]
    exact = survival[survival["setting"] == "exact"].iloc[0]
    said = ("the second model is better" if exact["diff_ci_low"] > 0 else "the first model is better" if exact["diff_ci_high"] < 0
            else "the models are not distinguishable")
    holds = kept["same_conclusion_as_exact"]
    text = (f"**Serving index:** at exact search {said}; that conclusion holds in {int(holds.sum())} of {len(kept)} index settings "
            "(HNSW ef_search, IVF nprobe, Elasticsearch's default quantisation emulated; unfiltered and filtered)")
    hnsw = kept[kept["setting"] == "hnsw ef_search=64"]
    if len(hnsw):
        h = hnsw.iloc[0]
        text += f"; through HNSW at ef_search=64 the difference is {_f(h['diff'], sign=True)} ({_ci(h, 'diff_ci_low', 'diff_ci_high')})"
    lost = kept.loc[~holds, "setting"].tolist()
    if lost:
        text += f"; not in: {', '.join(lost[:6])}{' ...' if len(lost) > 6 else ''}"
    return text + ". [decision_fidelity_pairs.csv]"


def server_sentence(table: pd.DataFrame, pairs: pd.DataFrame, num_candidates: int = 100) -> str:
    """The measured Elasticsearch rows: recall and the paired difference under the server's default
    mapping at ``num_candidates`` (the largest swept value up to it), and in how many server
    settings the exact-search conclusion (on the same queries) holds."""
    measured = table[table["source"].str.startswith("measured")]
    if measured.empty or pairs.empty:
        return ""
    default = measured[measured["index_type"].str.startswith("default")]
    ref = default if len(default) else measured[measured["setting"].str.startswith(f"es {measured['setting'].iloc[0].split()[1]} ")]
    ref = ref[~ref["filtered"]]
    swept = sorted(ref["num_candidates"].unique())
    nc = max([n for n in swept if n <= num_candidates] or swept[:1])
    ref = ref[ref["num_candidates"] == nc]
    k = next(c for c in table.columns if c.startswith("recall@"))
    emulated = table[(table["source"] == "emulated") & ~table["filtered"]].set_index("model")[k]
    recalls = "; ".join(f"{r['model']} {_f(r[k])} (emulated quantiser: {_f(emulated.get(r['model'], math.nan))})" for _, r in ref.iterrows())
    kept = pairs[pairs["source"].str.startswith("measured")]
    holds = kept["same_conclusion_as_exact"]
    text = (f"**{measured['source'].iloc[0].replace('measured', 'Measured', 1)}** ({measured['queries'].iloc[0]}): with the mapping left to the server "
            f"({ref['index_type'].iloc[0].removeprefix('default=')}) at num_candidates={nc:g}, recall@{k.split('@')[1]} against exact search is {recalls}")
    same = kept[kept["setting"] == ref["setting"].iloc[0]]
    if len(same):
        p = same.iloc[0]
        text += f"; the nDCG@5 difference there is {_f(p['diff'], sign=True)} ({_ci(p, 'diff_ci_low', 'diff_ci_high')})"
    text += (f"; the exact-search conclusion on these queries holds in {int(holds.sum())} of {len(kept)} server settings "
             "(index types x num_candidates, unfiltered and filtered)")
    lost = kept.loc[~holds, "setting"].tolist()
    if lost:
        text += f"; not in: {', '.join(lost[:6])}{' ...' if len(lost) > 6 else ''}"
    return text + ". [decision_es.csv, decision_es_pairs.csv]"


def filter_sentence(table: pd.DataFrame, contrast: pd.DataFrame) -> str:
    if table.empty:
        return ""
    share = next(c for c in table.columns if c.startswith("violation_share@"))
    parts = [f"{r['model']} puts {100 * r[share]:.1f}% of its top-{share.split('@')[1]} outside the query's {r['category_column']} "
             f"and gains {_f(r['gap'], sign=True)} nDCG@5 from the filter ({_ci(r, 'gap_low', 'gap_high')})" for _, r in table.iterrows()]
    text = "**Category filter:** " + "; ".join(parts) + "."
    if len(contrast):
        cross = contrast.iloc[-1]
        text += f" {cross['quantity']}: {_f(cross['diff'], sign=True)} ({_ci(cross, 'diff_low', 'diff_high')})."
    return text + " [decision_filter.csv, decision_filter_contrast.csv]"


def categories_sentence(table: pd.DataFrame, a: str, b: str, correction: str) -> str:
    if table.empty:
        return ""
    name = "Holm" if correction == "holm" else "Benjamini-Hochberg"
    wins_b = table.loc[table["winner"] == b].iloc[:, 0].tolist()
    wins_a = table.loc[table["winner"] == a].iloc[:, 0].tolist()
    show = lambda xs: ", ".join(xs[:5]) + (" ..." if len(xs) > 5 else "") if xs else "none"
    return (f"**Where each wins** ({len(table)} {table.columns[0]} values, {name}-adjusted): {b} wins {len(wins_b)} ({show(wins_b)}), "
            f"{a} wins {len(wins_a)} ({show(wins_a)}). [decision_categories.csv]")


def ab_sentence(plan: pd.DataFrame) -> str:
    v = dict(zip(plan["quantity"], plan["value"]))
    text = (f"**A/B test:** detecting a {100 * v['mde_relative']:.1f}% relative lift on a {100 * v['baseline_rate']:.2f}% baseline rate "
            f"(alpha {v['alpha']}, power {v['power']}, {v['alternative']}) needs {int(v['users per arm']):,} users per arm, "
            f"{int(v['days'])} days at {int(v['daily_traffic']):,} users/day x {v['traffic_share']} of traffic (all assumptions in the table).")
    factor = next((float(x) for q, x in v.items() if str(q).startswith("offline-to-online factor")), math.nan)
    if math.isfinite(factor) and factor > 0:
        text += (f" The offline relative gain would match that lift only if {factor:.2f}x of it carried over online; "
                 "that factor is unknown, which is what the test measures.")
    return text + " [decision_ab_plan.csv, decision_ab_scenarios.csv]"


def verdict_lines(tables: Mapping[str, pd.DataFrame], a: str, b: str, label: str, n_queries: int, correction: str) -> list[str]:
    """The verdict sentences, in order; parts whose table is missing are left out."""
    lines = []
    quality = tables.get("quality")
    if quality is not None and len(quality):
        logged = quality[quality["relevance"].str.startswith("interactions")] if "relevance" in quality else quality.iloc[:0]
        lines.append(quality_sentence(quality.iloc[0], label, n_queries, logged.iloc[0] if len(logged) else None))
    if "frontier" in tables:
        lines.append(cost_sentence(tables["frontier"], a, b))
    if "fidelity_pairs" in tables:
        lines.append(serving_sentence(tables["fidelity_pairs"]))
    if "es_pairs" in tables:
        lines.append(server_sentence(tables["es"], tables["es_pairs"]))
    if "filter" in tables:
        lines.append(filter_sentence(tables["filter"], tables.get("filter_contrast", pd.DataFrame())))
    if "categories" in tables:
        lines.append(categories_sentence(tables["categories"], a, b, correction))
    if "ab_plan" in tables:
        lines.append(ab_sentence(tables["ab_plan"]))
    return [line for line in lines if line]


__all__ = ["ab_sentence", "categories_sentence", "cost_sentence", "filter_sentence", "quality_sentence", "server_sentence", "serving_sentence", "verdict_lines"]
