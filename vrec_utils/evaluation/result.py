"""The result of an evaluation: per-query values of every (model, setting) row, and what is
derived from them (summaries with intervals, paired comparisons, per-category means, the JSON)."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..metrics import parse_metric
from .config import UNFILTERED
from .statistics import (
    col_mean,
    interval,
    jackknife_acceleration,
    mean_jackknife,
    paired_permutation_pvalue,
    resample_means,
)

RowKey = tuple[str, str]  # (model, setting)


@dataclass
class EvaluationResult:
    """Per-query metric values for every (model, setting) row, and everything derived from them.

    ``values[(model, setting)][metric]`` is an array aligned with ``query_ids``;
    ``candidate_ids`` are the items every query was searched among.
    """

    query_ids: np.ndarray
    candidate_ids: np.ndarray
    query_items: pd.DataFrame  # the catalog rows of the queries (labels, for per-category views)
    values: dict[RowKey, dict[str, np.ndarray]]
    metrics: list[str]
    dims: dict[RowKey, int]
    config: dict[str, Any]
    report: dict[str, Any]
    category_column: str | None = None
    _boot: np.ndarray | None = field(default=None, repr=False)

    # -- basics ---------------------------------------------------------------------------
    @property
    def rows(self) -> list[RowKey]:
        return list(self.values)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.values))

    @property
    def settings(self) -> list[str]:
        return list(dict.fromkeys(s for _, s in self.values))

    @property
    def n_queries(self) -> int:
        return len(self.query_ids)

    @property
    def per_query(self) -> pd.DataFrame:
        """Long frame: query_id, model, setting, metric, value."""
        frames = [
            pd.DataFrame({"query_id": self.query_ids, "model": m, "setting": s, "metric": metric, "value": v})
            for (m, s), per_metric in self.values.items()
            for metric, v in per_metric.items()
        ]
        return pd.concat(frames, ignore_index=True)

    def _matrix(self) -> tuple[np.ndarray, list[tuple[RowKey, str]]]:
        columns = [(row, metric) for row in self.values for metric in self.metrics]
        return np.column_stack([self.values[row][metric] for row, metric in columns]), columns

    def _resampled(self) -> np.ndarray:
        """Bootstrap means (n_bootstrap, rows * metrics), one shared set of resamples."""
        if self._boot is None:
            matrix, _ = self._matrix()
            self._boot = resample_means(matrix, self.config["n_bootstrap"], np.random.default_rng(self.config["seed"]))
        return self._boot

    def _column(self, row: RowKey, metric: str) -> int:
        if row not in self.values:
            raise KeyError(f"no row {row}; rows: {', '.join(map(str, self.values))}")
        if metric not in self.metrics:
            raise KeyError(f"metric {metric!r} was not computed; computed: {', '.join(self.metrics)}")
        return list(self.values).index(row) * len(self.metrics) + self.metrics.index(metric)

    def _resolve(self, row: RowKey | str) -> RowKey:
        key = (row, UNFILTERED) if isinstance(row, str) else tuple(row)
        if key not in self.values:
            raise KeyError(f"no row {key}; rows: {', '.join(map(str, self.values))}")
        return key

    # -- summaries --------------------------------------------------------------------------
    def summary(self) -> pd.DataFrame:
        """model, setting, metric, mean, ci_low, ci_high, n_queries (one row per metric)."""
        matrix, columns = self._matrix()
        theta_b = self._resampled()
        method = self.config["ci_method"]
        accel = jackknife_acceleration(mean_jackknife(matrix)) if method == "bca" else None
        low, high = interval(col_mean(matrix), theta_b, accel, self.config["confidence"], method)
        return pd.DataFrame(
            {
                "model": [r[0] for r, _ in columns],
                "setting": [r[1] for r, _ in columns],
                "metric": [m for _, m in columns],
                "mean": col_mean(matrix),
                "ci_low": low,
                "ci_high": high,
                "n_queries": self.n_queries,
            }
        )

    def table(self) -> pd.DataFrame:
        """Wide summary, one row per (model, setting) grouped by model: ``model, setting, dims,
        n_queries``, then per metric its mean (``ndcg@5``) and CI (``ndcg@5_low``, ``ndcg@5_high``)."""
        summary = self.summary().set_index(["model", "setting", "metric"])
        records = []
        for model in self.models:
            for setting in (s for s in self.settings if (model, s) in self.values):
                record: dict[str, Any] = {"model": model, "setting": setting, "dims": self.dims[(model, setting)], "n_queries": self.n_queries}
                for metric in self.metrics:
                    row = summary.loc[(model, setting, metric)]
                    record.update({metric: row["mean"], f"{metric}_low": row["ci_low"], f"{metric}_high": row["ci_high"]})
                records.append(record)
        return pd.DataFrame(records)

    def compare(self, a: RowKey | str, b: RowKey | str, metrics: Sequence[str] | None = None) -> pd.DataFrame:
        """Paired comparison of row b against row a (a model name means its unfiltered row)."""
        return self._compare_pairs([(self._resolve(a), self._resolve(b))], metrics)

    def default_pairs(self) -> list[tuple[RowKey, RowKey]]:
        """Every pair of models (earlier-listed first, as the baseline) in each non-PCA setting;
        with a filter, each earlier model *filtered* against each later model *unfiltered* (the
        article's "ResNet + filtered kNN" vs "SigLIP unfiltered"), and each model unfiltered
        against itself filtered (what the filter buys)."""
        models = self.models
        settings = [s for s in self.settings if not s.startswith("pca")]
        pairs = [((a, s), (b, s)) for s in settings for a, b in itertools.combinations(models, 2)]
        for s in (s for s in settings if s.startswith("filtered:")):
            pairs += [((a, s), (b, UNFILTERED)) for a, b in itertools.combinations(models, 2)]
            pairs += [((m, UNFILTERED), (m, s)) for m in models]
        return [(a, b) for a, b in pairs if a in self.values and b in self.values]

    def comparisons(self, metrics: Sequence[str] | None = None) -> pd.DataFrame:
        """:meth:`compare` for every pair of :meth:`default_pairs`."""
        return self._compare_pairs(self.default_pairs(), metrics)

    def _compare_pairs(self, pairs: list[tuple[RowKey, RowKey]], metrics: Sequence[str] | None) -> pd.DataFrame:
        metrics = [str(parse_metric(m)) for m in (metrics or self.metrics)]
        columns = [
            "model_a", "setting_a", "model_b", "setting_b", "metric", "mean_a", "mean_b", "diff",
            "diff_ci_low", "diff_ci_high", "p_value", "rel_improvement_pct", "rel_ci_low", "rel_ci_high", "n_queries",
        ]  # fmt: skip
        if not pairs:
            return pd.DataFrame(columns=columns)
        theta_b = self._resampled()
        conf, method = self.config["confidence"], self.config["ci_method"]
        cols_a = [self._column(a, m) for a, b in pairs for m in metrics]
        cols_b = [self._column(b, m) for a, b in pairs for m in metrics]
        va = np.column_stack([self.values[a][m] for a, b in pairs for m in metrics])
        vb = np.column_stack([self.values[b][m] for a, b in pairs for m in metrics])
        mean_a, mean_b = col_mean(va), col_mean(vb)
        d = vb - va
        boot_a, boot_b = theta_b[:, cols_a], theta_b[:, cols_b]
        d_acc = jackknife_acceleration(mean_jackknife(d)) if method == "bca" else None
        d_low, d_high = interval(col_mean(d), boot_b - boot_a, d_acc, conf, method)
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = 100.0 * (mean_b / mean_a - 1.0)
            rel_b = 100.0 * (boot_b / boot_a - 1.0)
            rel_jack = 100.0 * (mean_jackknife(vb) / mean_jackknife(va) - 1.0)
        ok = np.isfinite(rel) & np.isfinite(rel_b).all(axis=0) & np.isfinite(rel_jack).all(axis=0)
        r_low, r_high = np.full(len(rel), np.nan), np.full(len(rel), np.nan)
        if ok.any():
            r_acc = jackknife_acceleration(rel_jack[:, ok]) if method == "bca" else None
            r_low[ok], r_high[ok] = interval(rel[ok], rel_b[:, ok], r_acc, conf, method)
        p = paired_permutation_pvalue(
            d, n_permutations=self.config["n_permutations"], seed=np.random.default_rng([self.config["seed"], 1])
        )
        rows = []
        for j, ((a, b), metric) in enumerate((pair, m) for pair in pairs for m in metrics):
            rows.append(
                [a[0], a[1], b[0], b[1], metric, mean_a[j], mean_b[j], mean_b[j] - mean_a[j], d_low[j], d_high[j],
                 p[j], rel[j] if np.isfinite(rel[j]) else np.nan, r_low[j], r_high[j], self.n_queries]
            )  # fmt: skip
        return pd.DataFrame(rows, columns=columns)

    def per_category(
        self, column: str | None = None, metric: str = "ndcg@5", setting: str = UNFILTERED, baseline: str | None = None
    ) -> pd.DataFrame:
        """Mean ``metric`` per value of ``column`` (default: the relevance's finest label column):
        ``<column>, n_queries, <model>..., "<model> - <baseline>"...``, sorted by the first
        difference (largest gain first). ``baseline`` defaults to the first model."""
        column = column or self.category_column
        if column is None:
            raise ValueError("per_category needs a column (relevance from interactions has no default)")
        if column not in self.query_items.columns:
            available = ", ".join(c for c in self.query_items.columns)
            raise ValueError(f"column {column!r} is not in the catalog; available: {available}")
        metric = str(parse_metric(metric))
        models = [m for m in self.models if (m, setting) in self.values]
        if not models:
            raise KeyError(f"no rows with setting {setting!r}; settings: {', '.join(self.settings)}")
        baseline = baseline or models[0]
        frame = pd.DataFrame({column: self.query_items[column].to_numpy()})
        for m in models:
            frame[m] = self.values[(m, setting)][metric]
        grouped = frame.groupby(column, sort=True)
        out = grouped[models].mean()
        out.insert(0, "n_queries", grouped.size())
        diffs = [f"{m} - {baseline}" for m in models if m != baseline]
        for m, name in zip([m for m in models if m != baseline], diffs):
            out[name] = out[m] - out[baseline]
        out = out.reset_index()
        sort_by = [diffs[0], column] if diffs else ["n_queries", column]
        ascending = [False, True]
        return out.sort_values(sort_by, ascending=ascending, kind="stable", ignore_index=True)

    def dims_curve(self, metric: str = "ndcg@5") -> pd.DataFrame:
        """``metric`` against embedding dimensions: every pca row plus the full-dimension
        unfiltered row of each model (fusions have no pca rows). Columns model, dims, setting,
        ``<metric>`` (the mean), ci_low, ci_high, n_queries: ready for plots.ndcg_vs_dims."""
        metric = str(parse_metric(metric))
        summary = self.summary()
        keep = (summary["metric"] == metric) & summary["setting"].map(lambda s: s == UNFILTERED or s.startswith("pca"))
        summary = summary[keep].rename(columns={"mean": metric})
        summary = summary.assign(dims=[self.dims[(m, s)] for m, s in zip(summary["model"], summary["setting"])])
        return summary[["model", "dims", "setting", metric, "ci_low", "ci_high", "n_queries"]].sort_values(
            ["model", "dims"], kind="stable", ignore_index=True
        )

    # -- export ---------------------------------------------------------------------------
    def to_json(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Everything but the per-query values, as a JSON-ready dict (written to ``path`` if given).

        ``results``: one entry per (model, setting) with each metric's mean, ``ci95`` (a dict
        metric -> [low, high]) and ``n_queries``; ``comparisons``: the default paired comparisons."""
        summary = self.summary()
        results = []
        for (m, s), group in summary.groupby(["model", "setting"], sort=False):
            entry: dict[str, Any] = {"model": m, "setting": s, "dims": self.dims[(m, s)], "n_queries": self.n_queries}
            entry.update({metric: _num(v) for metric, v in zip(group["metric"], group["mean"])})
            entry["ci95" if self.config["confidence"] == 0.95 else "ci"] = {
                metric: [_num(lo), _num(hi)] for metric, lo, hi in zip(group["metric"], group["ci_low"], group["ci_high"])
            }
            results.append(entry)
        comparisons = [
            {key: (_num(v) if isinstance(v, float) else v) for key, v in row.items()}
            for row in self.comparisons().to_dict(orient="records")
        ]
        payload = {"config": self.config, "report": self.report, "results": results, "comparisons": comparisons}
        payload = json.loads(json.dumps(payload, default=_json_default))
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False))
        return payload


def _num(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return _num(value)
    if isinstance(value, (np.ndarray, tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = ["EvaluationResult", "RowKey"]
