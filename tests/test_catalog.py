from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hostile import make_hostile_catalog
from vrec_utils.catalog import CatalogError, Split, load_catalog, split_catalog


def test_fashion_layout_keeps_literal_na_and_titles(fashion_small_dir):
    catalog = load_catalog(fashion_small_dir)
    assert len(catalog) == 12_000
    assert catalog.report.ok
    # 91 rows carry the literal string "NA" in usage; pandas would turn it into NaN by default
    assert (catalog.items["usage"] == "NA").sum() == 91
    assert catalog.items["usage"].isna().sum() == 0
    # names with commas are kept whole (id 3413 is one of the six in this subset)
    assert "," in catalog.items.at["3413", "title"]
    assert "articleType" in catalog.label_columns and "productDisplayName" not in catalog.label_columns
    assert Path(catalog.image_path("39386")).is_file()


def test_generic_csv_report(tmp_path, sample_catalog):
    csv = make_hostile_catalog(tmp_path / "cat", [Path(p) for p in sample_catalog.items["image"].iloc[:2]])
    catalog = load_catalog(csv)
    # the row whose path leaves the catalog folder is refused, the missing file is reported but kept
    assert "escape" not in catalog.items.index
    assert catalog.report.escaping_paths == ("escape",)
    assert catalog.report.missing_files == ("missing",)
    assert "missing" in catalog.items.index
    assert catalog.items.at["na_usage", "articleType"] == "NA"
    assert catalog.report.empty_titles == 1
    summary = catalog.report.summary()
    assert "leaves the catalog folder" in summary and "missing" in summary


def test_catalog_folder_with_catalog_csv(tmp_path, sample_catalog):
    make_hostile_catalog(tmp_path / "cat", [Path(p) for p in sample_catalog.items["image"].iloc[:2]])
    assert len(load_catalog(tmp_path / "cat")) == len(load_catalog(tmp_path / "cat" / "catalog.csv"))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("a", "x.jpg"), ("a", "y.jpg")], "duplicate id"),
        ([("", "x.jpg")], "empty id"),
    ],
)
def test_bad_ids_are_refused(tmp_path, rows, message):
    pd.DataFrame(rows, columns=["id", "image"]).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(CatalogError, match=message):
        load_catalog(tmp_path / "c.csv")


def test_missing_columns_and_paths_are_named(tmp_path):
    pd.DataFrame({"id": ["a"], "path": ["x.jpg"]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(CatalogError, match="lacks column.*image"):
        load_catalog(tmp_path / "c.csv")
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "nope")
    with pytest.raises(CatalogError, match="neither styles.csv"):
        load_catalog(tmp_path)


def test_require_column_lists_available(sample_catalog):
    with pytest.raises(CatalogError, match="available: .*articleType"):
        sample_catalog.require_column("category")
    with pytest.raises(KeyError, match="not in catalog"):
        sample_catalog.require_id("no-such-id")


def test_split_is_deterministic_disjoint_and_order_free(sample_catalog, tmp_path):
    split = split_catalog(sample_catalog, eval_fraction=0.25, seed=0)
    assert set(split.train).isdisjoint(split.eval)
    assert set(split.train) | set(split.eval) == set(sample_catalog.ids)
    assert 0.18 < len(split.eval) / len(sample_catalog) < 0.32
    shuffled = sample_catalog.subset(sample_catalog.items.sample(frac=1, random_state=1).index)
    assert set(split_catalog(shuffled, 0.25, 0).eval) == set(split.eval)
    assert set(split_catalog(sample_catalog, 0.25, 1).eval) != set(split.eval)
    # an item keeps its side when the catalog shrinks or grows
    half = sample_catalog.head(700)
    assert set(split_catalog(half, 0.25, 0).eval) == set(split.eval) & set(half.ids)
    assert Split.load(split.save(tmp_path / "split.json")) == split
    with pytest.raises(ValueError, match="eval_fraction"):
        split_catalog(sample_catalog, 1.5)
