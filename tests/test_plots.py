"""Figures: layout (axes per cell), captions, hit/miss colours, saving; real catalog images."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vrec_utils import plots


def _results(ids, scores=None) -> pd.DataFrame:
    scores = scores if scores is not None else np.linspace(0.9, 0.5, len(ids))
    return pd.DataFrame({"rank": range(1, len(ids) + 1), "item_id": list(ids), "score": scores})


def _visible_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.axison]


def _border(ax) -> str:
    return mcolors.to_hex(ax.spines["top"].get_edgecolor())


@pytest.fixture(scope="module")
def labelled(small_catalog):
    items = small_catalog.items
    shirt_ids = items.index[items["articleType"] == "Tshirts"].tolist()
    other_ids = items.index[items["articleType"] != "Tshirts"].tolist()
    return small_catalog, shirt_ids, other_ids


def test_recommendation_grid_layout_and_hit_colours(labelled):
    catalog, shirts, others = labelled
    query = shirts[0]
    rows = {
        "model A": _results([shirts[1], others[0], shirts[2], others[1], shirts[3]]),
        "model A + subCategory filter": _results(shirts[1:6]),
        "model B": _results(others[2:5]),  # fewer than k results: the rest of the row stays empty
    }
    fig = plots.recommendation_grid(rows, query, catalog, hit_column="articleType")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3 * 6  # 3 rows x (query + 5 results)
    assert len(_visible_axes(fig)) == 3 + 5 + 5 + 3
    assert fig._suptitle is not None and query in fig._suptitle.get_text()
    grid = np.array(fig.axes).reshape(3, 6)
    assert {_border(grid[r, 0]) for r in range(3)} == {plots.QUERY}
    first = [_border(ax) for ax in grid[0, 1:]]
    assert first == [plots.HIT, plots.MISS, plots.HIT, plots.MISS, plots.HIT]
    assert all(_border(ax) == plots.HIT for ax in grid[1, 1:])
    assert grid[0, 1].get_title().startswith("Tshirts") and "0.900" in grid[0, 1].get_title() and "✓" in grid[0, 1].get_title()
    assert "✗" in grid[0, 2].get_title()
    row_labels = [t.get_text() for ax in grid[:, 0] for t in ax.texts]
    assert any("3/5 same articleType" in t for t in row_labels)
    assert any("5/5 same articleType" in t for t in row_labels)
    assert any("0/3 same articleType" in t for t in row_labels)
    assert not grid[2, 4].axison and not grid[2, 5].axison


def test_recommendation_grid_rejects_bad_input(labelled):
    catalog, shirts, _ = labelled
    with pytest.raises(ValueError, match="at least one row"):
        plots.recommendation_grid({}, shirts[0], catalog)
    with pytest.raises(ValueError, match="item_id"):
        plots.recommendation_grid({"a": pd.DataFrame({"id": shirts[:2]})}, shirts[0], catalog)
    with pytest.raises(KeyError, match="not in catalog"):
        plots.recommendation_grid({"a": _results(shirts[:2])}, "no-such-item", catalog)


def test_captions_do_not_overlap(labelled):
    catalog, shirts, others = labelled
    rows = {"a rather long model name that wraps": _results(others[:5]), "b": _results(shirts[:5])}
    fig = plots.recommendation_grid(rows, shirts[0], catalog)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.axison]
    images = [ax.get_window_extent(renderer) for ax in fig.axes if ax.axison]
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes):
            if i < j:
                assert not a.overlaps(b), (i, j)
        for img in images:
            assert not (a.overlaps(img) and a.y0 < img.y1 - 1), "a caption runs into an image"


def test_search_grid_marks_hits_only_with_an_expected_label(labelled):
    catalog, shirts, others = labelled
    image = catalog.image_path(shirts[0])
    rows = {"m": _results([shirts[1], others[0]])}
    marked = plots.search_grid(rows, image, catalog, expected="Tshirts", hit_column="articleType")
    grid = np.array(marked.axes).reshape(1, 3)
    assert [_border(ax) for ax in grid[0, 1:]] == [plots.HIT, plots.MISS]
    plain = plots.search_grid(rows, image, catalog)
    grid = np.array(plain.axes).reshape(1, 3)
    assert {_border(ax) for ax in grid[0, 1:]} == {plots.NEUTRAL}


def test_text_search_grid_one_row_per_query_and_model(labelled):
    catalog, shirts, others = labelled
    results = {"red t-shirt": {"m1": _results(shirts[:4]), "m2": _results(others[:4])}, "a watch": {"m1": _results(others[4:8])}}
    fig = plots.text_search_grid(results, catalog, expected={"red t-shirt": "Tshirts"})
    assert len(fig.axes) == 3 * 5
    grid = np.array(fig.axes).reshape(3, 5)
    assert "red t-shirt" in grid[0, 0].texts[0].get_text() and grid[0, 0].texts[1].get_text() == "m1"
    assert all(_border(ax) == plots.HIT for ax in grid[0, 1:])
    assert all(_border(ax) == plots.MISS for ax in grid[1, 1:])
    assert all(_border(ax) == plots.NEUTRAL for ax in grid[2, 1:])  # no expected label for "a watch"
    with pytest.raises(ValueError):
        plots.text_search_grid({"q": {}}, catalog)


def test_image_grid_and_label_distribution(small_catalog):
    fig = plots.image_grid(small_catalog, n=10, ncols=4, title="random")
    assert len(fig.axes) == 12 and len(_visible_axes(fig)) == 10
    again = plots.image_grid(small_catalog, n=10, ncols=4, title="random")
    assert [ax.get_title() for ax in fig.axes] == [ax.get_title() for ax in again.axes]  # seeded
    dist = plots.label_distribution(small_catalog, "articleType", top=5)
    ax = dist.axes[0]
    assert len(ax.patches) == 6  # 5 labels + "other"
    assert ax.get_xlabel() == "items" and "articleType" in ax.get_title()
    assert ax.get_yticklabels()[-1].get_text().startswith("other")


def test_metric_bars_with_ci_reads_every_ci_layout():
    table = pd.DataFrame({"model": ["a", "a", "b"], "setting": ["unfiltered", "filtered:x", "unfiltered"], "ndcg@5": [0.5, 0.8, 0.6],
                          "ci95_low": [0.45, 0.77, 0.55], "ci95_high": [0.55, 0.83, 0.65]})
    fig = plots.metric_bars_with_ci(table, "ndcg@5", low="ci95_low", high="ci95_high")
    ax = fig.axes[0]
    assert len(ax.patches) == 3 and ax.get_ylabel() == "ndcg@5"
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "a · unfiltered"
    assert ax.get_legend() is not None
    as_pairs = table.drop(columns=["ci95_low", "ci95_high"]).assign(ci95=[[0.45, 0.55], [0.77, 0.83], [0.55, 0.65]])
    assert plots.metric_bars_with_ci(as_pairs).axes[0].get_legend() is not None
    with pytest.raises(ValueError, match="not in the table"):
        plots.metric_bars_with_ci(table, "mrr@5")


def test_per_category_delta_colours_gains_and_losses():
    frame = pd.DataFrame({"articleType": ["a", "b", "c"], "delta": [0.2, -0.1, 0.0], "n_queries": [5, 6, 7]})
    ax = plots.per_category_delta(frame, category="articleType", delta="delta").axes[0]
    colours = [mcolors.to_hex(p.get_facecolor()) for p in ax.patches]
    assert colours == [plots.MISS, plots.NEUTRAL, plots.HIT]  # sorted by delta
    assert [t.get_text() for t in ax.get_yticklabels()] == ["b (n=6)", "c (n=7)", "a (n=5)"]


def test_ndcg_vs_dims_and_loss_curve():
    frame = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "dims": [16, 64, 1280] * 2, "ndcg@5": [0.3, 0.4, 0.5, 0.35, 0.45, 0.6],
                          "ci_low": [0.2] * 6, "ci_high": [0.7] * 6})
    ax = plots.ndcg_vs_dims(frame).axes[0]
    assert len(ax.lines) == 2 and ax.get_xscale() == "log" and ax.get_legend() is not None
    assert len(ax.collections) == 2  # one CI band per model
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [3.0, 2.0, 1.5], "val_loss": [3.1, 2.5, None]})
    ax = plots.loss_curve(history).axes[0]
    assert len(ax.lines) == 2 and ax.get_xlabel() == "epoch"


def test_embedding_map_colours_top_labels_and_other():
    rng = np.random.default_rng(0)
    labels = ["x"] * 30 + ["y"] * 20 + ["z"] * 5 + ["w"] * 5
    xy, method = plots.project_2d(rng.normal(size=(60, 8)), method="pca")
    assert xy.shape == (60, 2) and method == "PCA"
    fig = plots.embedding_map({"m1": (xy, labels), "m2": (xy, labels)}, method=method, top=2)
    assert len(fig.axes) == 2
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["x (n=30)", "y (n=20)", "other"]
    with pytest.raises(ValueError):
        plots.project_2d(rng.normal(size=(60, 8)), method="mds")


def test_save_figure_writes_a_png(tmp_path, small_catalog):
    path = plots.save_figure(plots.image_grid(small_catalog, n=4, ncols=4), "grid", tmp_path / "figs")
    assert path == tmp_path / "figs" / "grid.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
