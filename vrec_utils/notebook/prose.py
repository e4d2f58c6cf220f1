"""Prose, tables and figures for the notebooks: what a notebook cell calls to show a result.

Sentences are computed from numbers (:func:`comparison_markdown`, :func:`per_category_markdown`,
:func:`difference_sentence`), so a written observation holds for whichever profile ran; tables
come back as DataFrames with display names (:func:`evaluation_table`, :func:`comparison_table`)
and :func:`save_table` / :func:`publish` write them beside the report. Heavy display imports
(IPython, PIL) are deferred: the CLI imports this module without Jupyter installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image as PILImage

from ..plots import save_figure
from ..profiles import display_name


def _markdown(text: str):
    from IPython.display import (
        Markdown,  # display-only, deferred: the CLI has no Jupyter
    )

    return Markdown(text)


def publish(fig, name: str, figures_dir: str | os.PathLike, width: int | None = None):
    """Save ``fig`` as ``<figures_dir>/<name>.png`` and return it as an IPython image of the saved
    file (what the notebook and the HTML show is exactly the PNG)."""
    from IPython.display import Image  # display-only, deferred

    path = save_figure(fig, name, figures_dir)
    image = Image(filename=str(path), embed=True)
    if width is None:
        with PILImage.open(path) as im:
            width = min(im.width, 1100)  # pixel for pixel, at most the width of the report's page
    image.width = width
    return image


def evaluation_table(result, metric: str = "ndcg@5", others: Sequence[str] | None = None, include_pca: bool = True) -> pd.DataFrame:
    """One row per (model, setting): ``metric`` with its 95% CI, the other metrics' means and the
    number of queries. Columns: model, setting, <metric>, ci95_low, ci95_high, <others...>, n_queries.
    ``include_pca=False`` leaves out the PCA-reduced rows (see :func:`dims_table`)."""

    summary = result.summary()
    if not include_pca:
        summary = summary[~summary["setting"].str.startswith("pca")]
    main = summary[summary["metric"] == metric]
    if main.empty:
        raise ValueError(f"metric {metric!r} was not computed; computed: {', '.join(summary['metric'].unique())}")
    table = main[["model", "setting", "mean", "ci_low", "ci_high", "n_queries"]].rename(
        columns={"mean": metric, "ci_low": "ci95_low", "ci_high": "ci95_high"}
    )
    others = [m for m in (others if others is not None else summary["metric"].unique()) if m != metric]
    if others:
        wide = summary[summary["metric"].isin(others)].pivot_table(index=["model", "setting"], columns="metric", values="mean", sort=False)
        table = table.merge(wide[[m for m in others if m in wide.columns]].reset_index(), on=["model", "setting"], how="left")
    table = table[["model", "setting", metric, "ci95_low", "ci95_high", *[m for m in others if m in table.columns], "n_queries"]]
    table["model"] = table["model"].map(display_name)
    return table.round(4).reset_index(drop=True)


def _fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def comparison_markdown(comparisons: pd.DataFrame, metric: str = "ndcg@5"):
    """Sentences, computed from the paired comparisons, that say who wins and whether the 95%
    interval of the difference excludes zero (an IPython Markdown object)."""
    rows = comparisons[comparisons["metric"] == metric] if "metric" in comparisons else comparisons
    if rows.empty:
        return _markdown("_Only one model: there is no paired comparison to make._")
    out = []
    for row in rows.itertuples(index=False):
        a = f"`{display_name(row.model_a)}` ({row.setting_a})"
        b = f"`{display_name(row.model_b)}` ({row.setting_b})"
        sign = "+" if row.diff >= 0 else ""
        rel = "" if pd.isna(row.rel_improvement_pct) else f", {sign}{row.rel_improvement_pct:.1f}% relative"
        if row.diff_ci_low > 0 or row.diff_ci_high < 0:
            verdict = f"the 95% interval excludes zero, so {b if row.diff > 0 else a} is better on these queries"
        else:
            verdict = "the 95% interval includes zero, so these queries do not separate the two"
        out.append(
            f"- {b} vs {a}: {metric} {row.mean_b:.3f} vs {row.mean_a:.3f}, difference {sign}{row.diff:.3f} "
            f"(95% CI {row.diff_ci_low:+.3f} to {row.diff_ci_high:+.3f}; paired permutation {_fmt_p(row.p_value)}{rel}); "
            f"{verdict}."
        )
    return _markdown("\n".join(out))


def per_category_markdown(frame: pd.DataFrame, delta: str, category: str, n: int = 3, min_queries: int = 3):
    """The ``n`` largest per-category gains and losses in one sentence (categories with at least
    ``min_queries`` queries)."""
    data = frame[frame["n_queries"] >= min_queries].sort_values(delta)
    if data.empty:
        return _markdown(f"_No {category} has {min_queries} or more queries._")
    gains = data[data[delta] > 0].tail(n).iloc[::-1]
    losses = data[data[delta] < 0].head(n)
    share = float((data[delta] > 0).mean())
    return _markdown(
        f"Among the {len(data)} {category} values with at least {min_queries} queries, {share:.0%} gain. "
        f"Largest gains: {_list_changes(gains, category, delta)}. Largest losses: {_list_changes(losses, category, delta)}."
    )


def _list_changes(part: pd.DataFrame, category: str, delta: str) -> str:
    return ", ".join(f"{r[category]} ({r[delta]:+.3f}, {int(r['n_queries'])} queries)" for _, r in part.iterrows()) or "none"


def save_table(frame: pd.DataFrame, name: str, tables_dir: str | os.PathLike) -> pd.DataFrame:
    """Write ``frame`` as ``<tables_dir>/<name>.csv`` and return it (to display)."""
    directory = Path(tables_dir)
    directory.mkdir(parents=True, exist_ok=True)
    frame.to_csv(directory / f"{name}.csv", index=False)
    return frame


def extraction_markdown(timings: pd.DataFrame):
    """What the extraction step did, computed from :meth:`RunContext.extract`'s table."""
    lines = []
    for row in timings.to_dict(orient="records"):
        if row["embedded now"] == 0:
            lines.append(f"- `{row['model']}`: all {row['from cache']} items came from the cache (nothing recomputed).")
        else:
            lines.append(
                f"- `{row['model']}`: {row['embedded now']} items embedded in {row['extract s']:.1f} s "
                f"({row['images/s']} images/s), {row['from cache']} from the cache."
            )
    return _markdown("\n".join(lines))


def labels_of(catalog, item_id: str | None, columns: Sequence[str]) -> dict[str, str]:
    """``{column: value}`` of a catalog item for the ``columns`` the catalog has (``{}`` for None)."""
    if item_id is None:
        return {}
    return {c: str(catalog.items.at[str(item_id), c]) for c in dict.fromkeys(columns) if c in catalog.items.columns}


def describe_item(catalog, item_id: str, columns: Sequence[str] = (), note: str = "", image: str | os.PathLike | None = None):
    """One line naming a catalog item: id, title and the given labels (or the ``image`` file when
    the query is an image from outside the catalog)."""
    if image:
        return _markdown(f"Query image: `{image}` (not a catalog item).")
    labels = ", ".join(f"{c}: {v}" for c, v in labels_of(catalog, item_id, columns).items())
    title = str(catalog.items.at[str(item_id), "title"]) or "(no title)"
    extra = f", {note}" if note else ""
    return _markdown(f"Query: item `{item_id}`{extra}: **{title}**" + (f" ({labels})." if labels else "."))


def results_table(rows: Mapping[str, pd.DataFrame], catalog, columns: Sequence[str] = ("title",)) -> pd.DataFrame:
    """The rows of results as one table (row, rank, item_id, score and catalog ``columns``)."""
    frames = []
    for name, frame in rows.items():
        ids = [str(i) for i in frame["item_id"]]
        part = pd.DataFrame({"row": name, "rank": frame["rank"].to_numpy() if "rank" in frame else range(1, len(ids) + 1), "item_id": ids, "score": frame["score"].to_numpy()})
        for column in columns:
            if column in catalog.items.columns:
                part[column] = catalog.items.loc[ids, column].to_numpy()
        frames.append(part)
    return pd.concat(frames, ignore_index=True).round({"score": 4})


def elasticsearch_url() -> str | None:
    """``VREC_ES_URL`` when set (the Elasticsearch server the live comparison uses)."""
    return os.environ.get("VREC_ES_URL") or None


def elasticsearch_skipped():
    return _markdown(
        "`VREC_ES_URL` is not set, so the Elasticsearch comparison was skipped. Start a server with "
        "`docker compose up -d elasticsearch` (or a throwaway one with `bash scripts/es-test-node.sh start`, "
        "which prints its URL) and set `VREC_ES_URL` (e.g. `http://localhost:9200`) to run it."
    )


def catalog_markdown(catalog):
    """Size, validation report and label columns of a catalog (or of a sample of it)."""
    size = f"{len(catalog)} items"
    if len(catalog) < catalog.report.n_rows:
        size += f" (a seeded sample of the {catalog.report.n_rows} in `{catalog.source}`)"
    problems = catalog.report.summary().split("; ", 1)[1:] if not catalog.report.ok or catalog.report.empty_titles else []
    labels = ", ".join(f"`{c}`" for c in catalog.label_columns)
    text = f"**{catalog.name}**: {size}. Label columns: {labels}."
    if problems:
        text += f" Validation: {problems[0]}."
    return _markdown(text)


def result_hits(rows: Mapping[str, pd.DataFrame], catalog, target: Mapping[str, str]) -> pd.DataFrame:
    """Per row of results: how many results match each ``column: value`` of ``target``."""
    table = []
    for name, frame in rows.items():
        ids = [str(i) for i in frame["item_id"]]
        entry = {"row": name, "results": len(ids)}
        for column, value in target.items():
            if column in catalog.items.columns:
                entry[f"{column} = {value}"] = int((catalog.items.loc[ids, column] == value).sum())
        table.append(entry)
    return pd.DataFrame(table)


def hits_markdown(rows: Mapping[str, pd.DataFrame], catalog, target: Mapping[str, str]):
    """One sentence per row: "<row>: 3/5 articleType = Dresses, 4/5 gender = Women"."""
    if not target:
        return _markdown("_The query has no labels (an image from outside the catalog): no hits to count._")
    table = result_hits(rows, catalog, target)
    lines = []
    for record in table.to_dict(orient="records"):
        counts = [f"{record[c]}/{record['results']} with {c}" for c in table.columns if c not in ("row", "results")]
        lines.append(f"- **{record['row']}**: " + ", ".join(counts) + ".")
    return _markdown("\n".join(lines))


def evaluation_markdown(result) -> Any:
    """The evaluation protocol in numbers: queries, candidates, what was left out and why."""
    rep = result.report
    no_rel = rep.get("no_relevant", {})
    no_rel_count = no_rel.get("count", 0) if isinstance(no_rel, Mapping) else no_rel
    parts = [
        f"**{rep.get('queries', result.n_queries)} queries** searched among **{rep.get('candidates', len(result.candidate_ids))} candidates**"
        f" ({rep.get('eval_items', '?')} evaluation items",
        f"{rep.get('duplicates_excluded', 0)} byte-identical duplicate images excluded",
        f"{no_rel_count} items without any relevant candidate kept as distractors only).",
    ]
    notes = result.config.get("notes") or []
    text = ", ".join(parts[:2]) + ", " + parts[2]
    text += f" Relevance: {result.config.get('relevance', '')}; gain: {result.config.get('gain_formula', '')}."
    text += f" Intervals: {int(result.config.get('confidence', 0.95) * 100)}% {result.config.get('ci_method', '')} bootstrap over queries ({result.config.get('n_bootstrap')} resamples)."
    text += "".join(f"\n- {note}" for note in notes)
    return _markdown(text)


def comparison_table(comparisons: pd.DataFrame) -> pd.DataFrame:
    """The paired comparisons with display names, rounded, most useful columns first."""
    columns = ["model_a", "setting_a", "model_b", "setting_b", "metric", "mean_a", "mean_b", "diff", "diff_ci_low",
               "diff_ci_high", "p_value", "rel_improvement_pct", "rel_ci_low", "rel_ci_high", "n_queries"]  # fmt: skip
    table = comparisons[[c for c in columns if c in comparisons.columns]].copy()
    for column in ("model_a", "model_b"):
        table[column] = table[column].map(display_name)
    return table.round(4)


def per_category_table(result, column: str, metric: str = "ndcg@5", min_queries: int = 1) -> pd.DataFrame:
    """Mean ``metric`` per ``column`` value for each model (display names) and ``delta`` = second
    model minus first; ``attrs["delta_label"]`` says which."""

    frame = result.per_category(column, metric)
    frame = frame[frame["n_queries"] >= min_queries]
    models = [m for m in result.models if m in frame.columns]
    renamed = frame.rename(columns={m: display_name(m) for m in models})
    if len(models) >= 2:
        renamed = renamed.rename(columns={f"{models[1]} - {models[0]}": "delta"})
        keep = [column, "n_queries", *[display_name(m) for m in models], "delta"]
        renamed = renamed[keep].sort_values("delta", ascending=False, ignore_index=True)
        renamed.attrs["delta_label"] = f"Δ {metric}: {display_name(models[1])} − {display_name(models[0])}"
    return renamed.round(4)


def dims_table(result, metric: str = "ndcg@5") -> pd.DataFrame:
    """``metric`` against embedding dimensions per model (PCA rows + the full dimension)."""
    curve = result.dims_curve(metric)
    curve = curve.rename(columns={"mean": str(metric)})
    curve["model"] = curve["model"].map(display_name)
    return curve.round(4)
