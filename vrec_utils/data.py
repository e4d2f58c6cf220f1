"""Datasets: the bundled sample, making a stratified sample, fetching the full Fashion dataset."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from .catalog import CatalogError, load_catalog

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_SAMPLE = REPO_ROOT / "data" / "sample"
KAGGLE_DATASET = "paramaggarwal/fashion-product-images-small"


def bundled_sample() -> Path:
    """The small Fashion Product Images sample shipped in ``data/sample`` (works offline)."""
    if not (BUNDLED_SAMPLE / "styles.csv").is_file():
        raise CatalogError(f"the bundled sample is missing at {BUNDLED_SAMPLE}; is this a full clone of the repository?")
    return BUNDLED_SAMPLE


def stratified_quota(counts: pd.Series, n: int) -> pd.Series:
    """Largest-remainder allocation of ``n`` slots proportional to ``counts`` (at least 1 per class
    while slots last, so rare classes stay represented)."""
    counts = counts.sort_index()
    n = min(n, int(counts.sum()))
    base = np.minimum(counts.to_numpy(), 1) if n >= len(counts) else np.zeros(len(counts), dtype=int)
    remaining = n - int(base.sum())
    spare = counts.to_numpy() - base
    exact = spare / spare.sum() * remaining if spare.sum() else np.zeros(len(counts))
    quota = base + np.floor(exact).astype(int)
    leftover = n - int(quota.sum())
    order = np.lexsort((-counts.to_numpy(), -(exact - np.floor(exact))))
    for i in order:
        if leftover == 0:
            break
        if quota[i] < counts.iloc[i]:
            quota[i] += 1
            leftover -= 1
    return pd.Series(quota, index=counts.index)


def make_sample(source: str | os.PathLike, out: str | os.PathLike, n: int = 1500, column: str = "articleType", seed: int = 0) -> Path:
    """Copy a stratified sample of a Fashion-layout catalog (styles.csv + images/) to ``out``."""
    catalog = load_catalog(source)
    column = catalog.require_column(column)
    items = catalog.items
    quota = stratified_quota(items[column].value_counts(), n)
    picked = [
        group.sample(n=int(quota[label]), random_state=seed)
        for label, group in items.groupby(column, sort=True)
        if quota[label] > 0
    ]
    chosen = set(pd.concat(picked).index)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    styles = pd.read_csv(catalog.source, dtype=str, keep_default_na=False)
    styles = styles[styles["id"].isin(chosen)]  # original row order and columns
    styles.to_csv(out / "styles.csv", index=False)
    meta_path = catalog.root / "image_meta.csv"
    if meta_path.is_file():
        meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
        meta[meta["id"].isin(chosen)].to_csv(out / "image_meta.csv", index=False)
    for item_id in styles["id"]:
        shutil.copy2(items.at[item_id, "image"], out / "images" / f"{item_id}.jpg")
    return out


def fetch_fashion(out: str | os.PathLike) -> Path:
    """Download the full "Fashion Product Images (Small)" dataset from Kaggle (needs internet
    and the ``kaggle`` CLI with credentials in ``~/.kaggle/kaggle.json``)."""
    out = Path(out)
    if shutil.which("kaggle") is None:
        raise RuntimeError(
            "the kaggle CLI is not installed: `pip install kaggle`, put your API token in "
            f"~/.kaggle/kaggle.json, then rerun; or download {KAGGLE_DATASET} by hand and unzip it into {out}"
        )
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["kaggle", "datasets", "download", "-d", KAGGLE_DATASET, "-p", str(out), "--unzip"], check=True)
    nested = out / "myntradataset"
    if nested.is_dir():  # the archive wraps everything in one folder
        for child in nested.iterdir():
            shutil.move(str(child), out / child.name)
        nested.rmdir()
    _fix_unquoted_commas(out / "styles.csv")
    return out


def _fix_unquoted_commas(styles_csv: Path) -> None:
    """The Kaggle styles.csv leaves commas inside productDisplayName unquoted; re-quote it."""
    lines = styles_csv.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    rows = []
    for line in lines[1:]:
        parts = line.split(",")
        if len(parts) > len(header):
            parts = parts[: len(header) - 1] + [",".join(parts[len(header) - 1 :])]
        rows.append(parts)
    pd.DataFrame(rows, columns=header).to_csv(styles_csv, index=False)
