"""Figures for the notebooks and the report. Every function returns a ``Figure`` and never shows it.

Conventions:

* result frames are the search layer's DataFrames: one row per hit with ``item_id`` and ``score``
  (``rank`` order is the row order); labels are looked up in the catalog, so extra columns are optional;
* a hit (green border, ✓) is a result whose ``hit_column`` label equals the query's; a miss is red (✗);
* catalog images are 60x80: they are drawn with an antialiasing filter and no axes ticks;
* :func:`save_figure` writes ``<figures_dir>/<name>.png`` at 150 dpi.

Figures are built with the object API (``Figure`` without pyplot), so nothing stays alive in
pyplot's registry and no backend is needed.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .catalog import Catalog
from .images import ImageLoadError, load_rgb

HIT = "#1a9850"
MISS = "#d73027"
QUERY = "#2c5fa8"
NEUTRAL = "#9e9e9e"
DPI = 150
CELL_W, CELL_H = 1.12, 1.78  # inches per thumbnail cell: the image and two caption lines above it
IMG_W, IMG_H = 1.0, 1.333  # inches of the image box (catalog images are 60x80, 3:4)
OTHER = "other"

# -------------------------------------------------------------------------------- saving


def save_figure(fig: Figure, name: str, figures_dir: str | os.PathLike = "figures", dpi: int = DPI) -> Path:
    """Write ``fig`` as ``<figures_dir>/<name>.png`` and return the path."""
    directory = Path(figures_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{Path(name).stem}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    return path


# -------------------------------------------------------------------------------- image cells


def _thumbnail(source) -> np.ndarray:
    """Pixels of an image path or PIL image; a grey placeholder when it cannot be read."""
    if hasattr(source, "convert"):
        return np.asarray(source.convert("RGB"))
    try:
        return np.asarray(load_rgb(source))
    except ImageLoadError:
        return np.full((80, 60, 3), 200, dtype=np.uint8)


def _draw_image(ax: Axes, source, border: str | None = None, width: float = 4.0) -> None:
    ax.imshow(_thumbnail(source), interpolation="lanczos", interpolation_stage="rgba")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(border is not None)
        if border is not None:
            spine.set_edgecolor(border)
            spine.set_linewidth(width)


def _blank(ax: Axes) -> None:
    ax.axis("off")


def _short(text: str, width: int = 16) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _label_of(catalog: Catalog, item_id, column: str | None) -> str:
    if column is None:
        return ""
    return str(catalog.items.at[str(item_id), column])


def _result_ids_scores(frame: pd.DataFrame, k: int | None) -> tuple[list[str], list[float]]:
    if "item_id" not in frame.columns:
        raise ValueError(f"a result frame needs an item_id column; it has {', '.join(map(str, frame.columns))}")
    frame = frame.sort_values("rank") if "rank" in frame.columns else frame
    frame = frame if k is None else frame.head(k)
    scores = frame["score"].tolist() if "score" in frame.columns else [float("nan")] * len(frame)
    return [str(i) for i in frame["item_id"]], [float(s) for s in scores]


def _result_row(
    axes: Sequence[Axes],
    catalog: Catalog,
    ids: list[str],
    scores: list[float],
    caption_column: str | None,
    hit_column: str | None,
    target: str | None,
) -> tuple[int, int]:
    """Draw one row of results into ``axes``; returns (hits, shown)."""
    hits = 0
    for ax, item_id, score in zip(axes, ids, scores):
        border, mark, width = NEUTRAL, "", 1.0
        if hit_column is not None and target is not None:
            is_hit = _label_of(catalog, item_id, hit_column) == target
            hits += is_hit
            border, mark, width = (HIT, " ✓", 4.0) if is_hit else (MISS, " ✗", 4.0)
        _draw_image(ax, catalog.image_path(item_id), border, width)
        caption = _short(_label_of(catalog, item_id, caption_column)) if caption_column else _short(item_id)
        score_text = "" if np.isnan(score) else f"{score:.3f}"
        ax.set_title(f"{caption}\n{score_text}{mark}", fontsize=7.5, color="black" if border == NEUTRAL else border, pad=3)
    for ax in axes[len(ids) :]:
        _blank(ax)
    if not ids and len(axes):
        axes[0].text(0, 0.5, "no results", transform=axes[0].transAxes, fontsize=9, color=NEUTRAL, va="center")
    return hits, len(ids)


def _grid(n_rows: int, n_cols: int, title: str | None, left: float = 1.55) -> tuple[Figure, np.ndarray]:
    """Thumbnail cells laid out in inches (no layout engine), so rows sit close and captions never
    overlap: ``left`` inches are kept for the row labels drawn by :func:`_row_label`."""
    top = 0.5 if title else 0.1
    width = left + CELL_W * n_cols + 0.1
    height = top + CELL_H * n_rows + 0.05
    fig = Figure(figsize=(width, height))
    axes = np.empty((n_rows, n_cols), dtype=object)
    for r in range(n_rows):
        for c in range(n_cols):
            x0 = left + c * CELL_W + (CELL_W - IMG_W) / 2
            y0 = height - top - (r + 1) * CELL_H + 0.08
            axes[r, c] = fig.add_axes((x0 / width, y0 / height, IMG_W / width, IMG_H / height))
    if title:
        fig.suptitle(title, fontsize=11, fontweight="bold", y=1 - 0.12 / height, va="top")
    return fig, axes


def _row_label(ax: Axes, text: str) -> None:
    """A row's label, right-aligned in the left margin beside its first cell."""
    ax.annotate(text, xy=(0, 0.5), xycoords="axes fraction", xytext=(-10, 0), textcoords="offset points",
                ha="right", va="center", fontsize=8.5)


def _wrap(text: str, width: int = 20) -> str:
    return "\n".join(textwrap.wrap(str(text), width, break_on_hyphens=False)) or str(text)


def image_grid(
    catalog: Catalog,
    ids: Sequence[str] | None = None,
    *,
    n: int = 24,
    ncols: int = 8,
    caption_column: str | None = "articleType",
    title: str | None = None,
    seed: int = 0,
) -> Figure:
    """A grid of catalog items (``ids``, or ``n`` drawn at random with ``seed``), captioned by a label."""
    if ids is None:
        rng = np.random.default_rng(seed)
        ids = rng.choice(catalog.items.index.to_numpy(), size=min(n, len(catalog)), replace=False).tolist()
    ids = [str(i) for i in ids]
    if not ids:
        raise ValueError("image_grid needs at least one item id")
    n_rows = -(-len(ids) // ncols)
    fig, axes = _grid(n_rows, ncols, title, left=0.05)
    axes = axes.ravel()
    for ax, item_id in zip(axes, ids):
        _draw_image(ax, catalog.image_path(item_id))
        caption = _label_of(catalog, item_id, caption_column) if caption_column else item_id
        ax.set_title(_short(caption), fontsize=8, pad=3)
    for ax in axes[len(ids) :]:
        _blank(ax)
    return fig


# -------------------------------------------------------------------------------- result grids


def recommendation_grid(
    rows: Mapping[str, pd.DataFrame],
    query_id: str,
    catalog: Catalog,
    *,
    hit_column: str | None = "articleType",
    caption_column: str | None = None,
    k: int | None = None,
    title: str | None = None,
) -> Figure:
    """Side-by-side "similar items": one row per model or setting (the dict's keys, in order).

    Each row starts with the query item, then its top-k results, captioned with their
    ``caption_column`` label (default: ``hit_column``) and score; the border is green when the
    result's ``hit_column`` equals the query's, red otherwise. The row label reports hits/k.
    """
    if not rows:
        raise ValueError("recommendation_grid needs at least one row of results")
    query_id = catalog.require_id(query_id)
    caption_column = caption_column or hit_column
    target = _label_of(catalog, query_id, hit_column) if hit_column else None
    parsed = {name: _result_ids_scores(frame, k) for name, frame in rows.items()}
    n_cols = 1 + max(max((len(ids) for ids, _ in parsed.values()), default=0), 1)
    if title is None:
        query_text = f"{target} (id {query_id})" if target else f"item {query_id}"
        title = f"Similar items for: {query_text}"
    fig, axes = _grid(len(rows), n_cols, title)
    for r, (name, (ids, scores)) in enumerate(parsed.items()):
        _draw_image(axes[r, 0], catalog.image_path(query_id), QUERY, width=3)
        axes[r, 0].set_title(f"query\n{_short(_label_of(catalog, query_id, caption_column) or query_id)}", fontsize=7.5, color=QUERY, pad=3, fontweight="bold")
        hits, shown = _result_row(axes[r, 1:], catalog, ids, scores, caption_column, hit_column, target)
        row_label = _wrap(name) + (f"\n{hits}/{shown} same {hit_column}" if hit_column and shown else "")
        _row_label(axes[r, 0], row_label)
    return fig


def search_grid(
    rows: Mapping[str, pd.DataFrame],
    query_image,
    catalog: Catalog,
    *,
    expected: str | None = None,
    hit_column: str | None = "articleType",
    caption_column: str | None = None,
    k: int | None = None,
    title: str = "Visual search",
    query_caption: str = "query image",
) -> Figure:
    """Visual search with an image (path or PIL image) that need not be in the catalog.

    ``expected`` is the ``hit_column`` label the query shows (e.g. its articleType when known);
    without it results are drawn without hit/miss marks.
    """
    if not rows:
        raise ValueError("search_grid needs at least one row of results")
    caption_column = caption_column or hit_column
    parsed = {name: _result_ids_scores(frame, k) for name, frame in rows.items()}
    n_cols = 1 + max(max((len(ids) for ids, _ in parsed.values()), default=0), 1)
    fig, axes = _grid(len(rows), n_cols, title)
    use_hits = hit_column if expected is not None else None
    for r, (name, (ids, scores)) in enumerate(parsed.items()):
        _draw_image(axes[r, 0], query_image, QUERY, width=3)
        axes[r, 0].set_title(f"{query_caption}\n{_short(expected or '')}", fontsize=7.5, color=QUERY, pad=3, fontweight="bold")
        hits, shown = _result_row(axes[r, 1:], catalog, ids, scores, caption_column, use_hits, expected)
        row_label = _wrap(name) + (f"\n{hits}/{shown} {expected}" if use_hits and shown else "")
        _row_label(axes[r, 0], row_label)
    return fig


def text_search_grid(
    results: Mapping[str, Mapping[str, pd.DataFrame]],
    catalog: Catalog,
    *,
    caption_column: str | None = "articleType",
    expected: Mapping[str, str] | None = None,
    hit_column: str | None = "articleType",
    k: int | None = None,
    title: str = "Text-to-image search",
) -> Figure:
    """Top results for text queries: ``results[query][model] -> result frame``, one row per pair.

    The first cell of each row shows the query text and the model. ``expected[query]`` (optional)
    is the ``hit_column`` label a good result carries, which turns on hit/miss borders.
    """
    pairs = [(q, m, frame) for q, per_model in results.items() for m, frame in per_model.items()]
    if not pairs:
        raise ValueError("text_search_grid needs at least one (query, model) result")
    parsed = [(q, m, *_result_ids_scores(frame, k)) for q, m, frame in pairs]
    n_cols = 1 + max(max((len(ids) for *_, ids, _ in parsed), default=0), 1)
    fig, axes = _grid(len(parsed), n_cols, title, left=0.1)
    for r, (query, model, ids, scores) in enumerate(parsed):
        ax = axes[r, 0]
        _blank(ax)
        ax.text(0.5, 0.55, _wrap(f"“{query}”", 14), ha="center", va="center", fontsize=9, fontweight="bold",
                color=QUERY, transform=ax.transAxes)
        ax.text(0.5, 0.12, _wrap(model, 16), ha="center", va="center", fontsize=8, color="#333333", transform=ax.transAxes)
        target = (expected or {}).get(query)
        _result_row(axes[r, 1:], catalog, ids, scores, caption_column, hit_column if target else None, target)
    return fig


# -------------------------------------------------------------------------------- charts


def label_distribution(catalog: Catalog, column: str = "articleType", top: int = 25, title: str | None = None) -> Figure:
    """Horizontal bars: item count per label (the ``top`` most frequent, the rest summed as "other")."""
    column = catalog.require_column(column)
    counts = catalog.items[column].value_counts()
    shown = counts.head(top)
    if len(counts) > top:
        shown = pd.concat([shown, pd.Series({f"{OTHER} ({len(counts) - top} labels)": counts.iloc[top:].sum()})])
    fig = Figure(figsize=(7, 0.24 * len(shown) + 1.2), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(shown)), shown.to_numpy(), color=QUERY)
    ax.set_yticks(range(len(shown)), [_short(s, 30) for s in shown.index], fontsize=8)
    ax.invert_yaxis()
    for y, value in enumerate(shown.to_numpy()):
        ax.text(value, y, f" {value}", va="center", fontsize=7)
    ax.set_xlabel("items")
    ax.set_title(title or f"{column}: {len(counts)} labels over {len(catalog)} items", fontsize=11)
    ax.margins(x=0.12)
    return fig


def _column(frame: pd.DataFrame, *candidates: str) -> str | None:
    return next((c for c in candidates if c in frame.columns), None)


def metric_bars_with_ci(
    table: pd.DataFrame,
    metric: str = "ndcg@5",
    *,
    label: str | Sequence[str] | None = None,
    low: str | None = None,
    high: str | None = None,
    title: str | None = None,
) -> Figure:
    """One bar per row (model / setting) with its 95% CI as an error bar.

    ``label`` names the column(s) that identify a row (default: ``model`` and ``setting`` where
    present, else the index); ``low``/``high`` the CI bounds (default: ``<metric>_low``/``_high``,
    ``ci_low``/``ci_high`` or a ``ci95`` column holding [low, high]).
    """
    if metric not in table.columns:
        raise ValueError(f"metric column {metric!r} is not in the table; columns: {', '.join(map(str, table.columns))}")
    values = table[metric].astype(float).to_numpy()
    labels = _row_labels(table, label)
    lows, highs = _ci_bounds(table, metric, low, high)
    fig = Figure(figsize=(max(5.0, 1.1 * len(table) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(table))
    # one colour per model; settings other than "unfiltered" (a filter, a reduction) are hatched
    models = table["model"].astype(str).tolist() if "model" in table.columns else labels
    colour_of = {m: _palette(i) for i, m in enumerate(dict.fromkeys(models))}
    settings = table["setting"].astype(str).tolist() if "setting" in table.columns else ["unfiltered"] * len(table)
    hatched = [s != "unfiltered" for s in settings]
    ax.bar(x, values, color=[colour_of[m] for m in models], width=0.65, hatch=["//" if h else "" for h in hatched],
           edgecolor="white", linewidth=0)
    handles = []
    if lows is not None:
        err = np.vstack([values - lows, highs - values])
        handles.append(ax.errorbar(x, values, yerr=np.clip(err, 0, None), fmt="none", ecolor="black", capsize=5, lw=1.2, label="95% CI"))
    if any(hatched):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor=NEUTRAL, hatch="//", edgecolor="white", label="filtered / reduced setting"))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.9)
    for xi, v in zip(x, values):
        ax.text(xi, v / 2, f"{v:.3f}", ha="center", va="center", fontsize=8, fontweight="bold",
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "none", "alpha": 0.9})
    ax.set_xticks(x, ["\n".join(textwrap.wrap(s, 22, break_long_words=False)) for s in labels], fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, min(1.05, max(float(np.nanmax(highs if lows is not None else values)) * 1.12, 0.1)))
    ax.set_title(title or f"{metric} per model and setting (95% CI)", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _row_labels(table: pd.DataFrame, label: str | Sequence[str] | None) -> list[str]:
    if label is None:
        label = [c for c in ("model", "setting") if c in table.columns]
    elif isinstance(label, str):
        label = [label]
    if not label:
        return [str(i) for i in table.index]
    return [" · ".join(str(v) for v in row if str(v) not in ("", "nan", "None")) for row in table[list(label)].itertuples(index=False)]


def _ci_bounds(table: pd.DataFrame, metric: str, low: str | None, high: str | None):
    low = low or _column(table, f"{metric}_low", f"{metric}_ci_low", "ci_low", "low")
    high = high or _column(table, f"{metric}_high", f"{metric}_ci_high", "ci_high", "high")
    if low and high:
        return table[low].astype(float).to_numpy(), table[high].astype(float).to_numpy()
    ci = _column(table, f"{metric}_ci95", "ci95")
    if ci:
        bounds = np.array([list(v) for v in table[ci]], dtype=float)
        return bounds[:, 0], bounds[:, 1]
    return None, None


def per_category_delta(
    frame: pd.DataFrame,
    *,
    category: str | None = None,
    delta: str | None = None,
    n: str | None = "n_queries",
    top: int = 15,
    title: str | None = None,
    xlabel: str = "Δ nDCG@5 (B − A)",
) -> Figure:
    """Horizontal bars of a per-category difference: the ``top`` largest gains and losses.

    ``category``/``delta`` default to the first column that looks like one (``category``,
    ``articleType``, ``label`` / ``delta``, ``diff``, ``difference``).
    """
    category = category or _column(frame, "category", "articleType", "label", "class", "group")
    delta = delta or _column(frame, "delta", "diff", "difference", "gain")
    if category is None or delta is None:
        raise ValueError(f"per_category_delta needs a category and a delta column; columns: {', '.join(map(str, frame.columns))}")
    data = frame[[category, delta] + ([n] if n and n in frame.columns else [])].dropna(subset=[delta])
    data = data.sort_values(delta)
    if len(data) > 2 * top:
        data = pd.concat([data.head(top), data.tail(top)])
    fig = Figure(figsize=(7, 0.26 * len(data) + 1.3), layout="constrained")
    ax = fig.subplots()
    values = data[delta].astype(float).to_numpy()
    ax.barh(range(len(data)), values, color=[HIT if v > 0 else MISS if v < 0 else NEUTRAL for v in values])
    names = [_short(c, 24) + (f" (n={int(k)})" if n and n in data.columns else "") for c, k in zip(data[category], data[n] if n and n in data.columns else data[category])]
    ax.set_yticks(range(len(data)), names, fontsize=7.5)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title or "Per-category change: gains (green) and losses (red)", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return fig


def ndcg_vs_dims(
    frame: pd.DataFrame,
    *,
    metric: str | None = None,
    dims: str = "dims",
    model: str = "model",
    title: str | None = None,
) -> Figure:
    """A curve per model: metric (default the first ``ndcg@k`` column) against embedding dimensions
    (log2 axis), with a CI band when ``<metric>_low``/``_high`` or ``ci_low``/``ci_high`` exist."""
    metric = metric or next((c for c in frame.columns if str(c).startswith("ndcg@") and not str(c).endswith(("_low", "_high"))), None)
    if metric is None or dims not in frame.columns:
        raise ValueError(f"ndcg_vs_dims needs {dims!r} and an ndcg@k column; columns: {', '.join(map(str, frame.columns))}")
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    groups = frame.groupby(model, sort=False) if model in frame.columns else [("", frame)]
    for i, (name, group) in enumerate(groups):
        group = group.sort_values(dims)
        x, y = group[dims].astype(float).to_numpy(), group[metric].astype(float).to_numpy()
        ax.plot(x, y, marker="o", color=_palette(i), label=str(name))
        low, high = _ci_bounds(group, metric, None, None)
        if low is not None:
            ax.fill_between(x, low, high, color=_palette(i), alpha=0.18)
    ax.set_xscale("log", base=2)
    ticks = sorted(frame[dims].astype(int).unique())
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("embedding dimensions (PCA; rightmost = full)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs embedding dimensions", fontsize=11)
    ax.grid(alpha=0.3)
    if model in frame.columns:
        ax.legend(fontsize=8)
    return fig


def loss_curve(history: pd.DataFrame, *, x: str | None = None, title: str = "Training loss") -> Figure:
    """Loss against step/epoch; every column whose name contains ``loss`` is a curve."""
    x = x or _column(history, "step", "epoch", "iteration")
    curves = [c for c in history.columns if "loss" in str(c).lower()]
    if not curves:
        raise ValueError(f"loss_curve needs a column named like *loss*; columns: {', '.join(map(str, history.columns))}")
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    xs = history[x].to_numpy() if x else np.arange(len(history))
    for i, column in enumerate(curves):
        data = history[column].astype(float)
        mask = data.notna().to_numpy()
        ax.plot(xs[mask], data[mask], marker="o" if mask.sum() < 30 else None, ms=3, color=_palette(i), label=str(column))
    ax.set_xlabel(x or "step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# -------------------------------------------------------------------------------- embedding maps


def project_2d(vectors: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of ``vectors`` and the method used: ``umap`` (if installed), ``tsne`` or ``pca``.

    ``auto`` picks UMAP when ``umap-learn`` is installed, else t-SNE (after a PCA to 50 dims).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if method not in ("auto", "umap", "tsne", "pca"):
        raise ValueError(f"method must be auto, umap, tsne or pca, got {method!r}")
    if len(vectors) < 5:
        raise ValueError(f"a 2-D map needs at least 5 vectors, got {len(vectors)}")
    if method in ("auto", "umap"):
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise ImportError("UMAP needs umap-learn: pip install 'vrec[umap]' (or use method='tsne' or 'pca')") from None
            method = "tsne"
        else:
            reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(vectors) - 1))
            return reducer.fit_transform(vectors), "UMAP"
    from sklearn.decomposition import PCA

    reduced = PCA(n_components=min(50, *vectors.shape), random_state=seed).fit_transform(vectors)
    if method == "pca":
        return reduced[:, :2], "PCA"
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(vectors) - 1) // 3)))
    coords = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity, max_iter=500).fit_transform(reduced)
    return coords, "t-SNE"


def embedding_map(
    coords: Mapping[str, tuple[np.ndarray, Sequence[str]]],
    *,
    method: str = "",
    top: int = 10,
    title: str | None = None,
) -> Figure:
    """One 2-D scatter per model, coloured by label: ``coords[model] = (xy (n, 2), labels (n))``.

    The ``top`` most frequent labels (over all panels) get a colour each, the rest are grey
    "other"; one shared legend.
    """
    if not coords:
        raise ValueError("embedding_map needs at least one model's coordinates")
    all_labels = pd.Series([str(v) for _, labels in coords.values() for v in labels])
    kept = all_labels.value_counts().head(top).index.tolist()
    colors = {label: _palette(i) for i, label in enumerate(kept)}
    n = len(coords)
    fig = Figure(figsize=(5.2 * n + 2.2, 5.2), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, (xy, labels)) in zip(axes, coords.items()):
        xy = np.asarray(xy)
        labels = np.asarray([str(v) for v in labels])
        other = ~np.isin(labels, kept)
        ax.scatter(xy[other, 0], xy[other, 1], s=6, c=NEUTRAL, alpha=0.35, linewidths=0, label=OTHER)
        for label in kept:
            mask = labels == label
            ax.scatter(xy[mask, 0], xy[mask, 1], s=9, color=colors[label], alpha=0.85, linewidths=0, label=label)
        ax.set_title(f"{name}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{method} 1" if method else "")
        ax.set_ylabel(f"{method} 2" if method else "")
    handles = [
        axes[0].scatter([], [], s=30, color=colors[label], label=f"{label} (n={int((all_labels == label).sum() / n)})")
        for label in kept
    ] + [axes[0].scatter([], [], s=30, color=NEUTRAL, label=OTHER)]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False, markerscale=1.2)
    fig.suptitle(title or f"Embedding space ({method}), coloured by the {len(kept)} most frequent labels", fontsize=11, fontweight="bold")
    return fig


# tab10 without its grey (grey means "other"), then darker tones for more categories.
_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#393b79", "#637939", "#843c39", "#7b4173", "#3182bd", "#e6550d",
)


def _palette(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


FAMILY_MARKERS = {"float": "o", "pca": "s", "truncation": "D", "scalar": "^", "pq": "v", "binary": "X"}


def quality_cost_frontier(
    frame: pd.DataFrame, *, metric: str = "ndcg@5", cost: str = "bytes_per_item", title: str | None = None
) -> Figure:
    """Quality against storage: one point per (model, variant) of the decision report's frontier
    table (``model, variant, family, <cost>, <metric>, <metric>_low/_high, pareto,
    mercari_baseline``), CI bars, a marker per family, a colour per model; the Pareto front (no
    point both cheaper and better) is joined by a line and its points ringed; Mercari's
    production baseline (the CNN's 128-d PCA) is labelled."""
    missing = [c for c in ("model", "variant", "family", cost, metric, "pareto") if c not in frame.columns]
    if missing:
        raise ValueError(f"quality_cost_frontier needs column(s) {', '.join(missing)}; columns: {', '.join(map(str, frame.columns))}")
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    for i, (name, group) in enumerate(frame.groupby("model", sort=False)):
        color = _palette(i)
        for _, row in group.iterrows():
            x, y = float(row[cost]), float(row[metric])
            if f"{metric}_low" in row and np.isfinite(row[f"{metric}_low"]):
                ax.errorbar(x, y, yerr=[[y - row[f"{metric}_low"]], [row[f"{metric}_high"] - y]], color=color, alpha=0.5, lw=1, capsize=2)
            ax.scatter(x, y, marker=FAMILY_MARKERS.get(row["family"], "o"), color=color, s=46, zorder=3,
                       edgecolors="black" if row["pareto"] else "none", linewidths=1.2)
            ax.annotate(str(row["variant"]), (x, y), xytext=(4, -9), textcoords="offset points", fontsize=6.5, color=color)
        ax.plot([], [], color=color, marker="o", ls="", label=str(name))
    front = frame[frame["pareto"]].sort_values(cost)
    ax.step(front[cost].astype(float), front[metric].astype(float), where="post", color="black", lw=1, ls="--", alpha=0.6, label="Pareto front")
    if "mercari_baseline" in frame.columns and frame["mercari_baseline"].any():
        m = frame[frame["mercari_baseline"]].iloc[0]
        ax.annotate(f"Mercari baseline:\n{m['model']} PCA-128", (float(m[cost]), float(m[metric])), xytext=(-30, 34),
                    textcoords="offset points", fontsize=8, ha="right", arrowprops={"arrowstyle": "->", "lw": 0.8})
    for family, marker in FAMILY_MARKERS.items():
        if (frame["family"] == family).any():
            ax.plot([], [], color=NEUTRAL, marker=marker, ls="", label=family)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("bytes per item (log scale)")
    ax.set_ylabel(f"{metric} (95% CI)")
    ax.set_title(title or f"{metric} against storage per item (ringed: Pareto front)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncols=2)
    return fig
