"""The (image, title) pairs of a run, from the catalog's train split only."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..catalog import (
    FASHION_TITLE_COLUMN,
    Catalog,
    Split,
    hash_unit_interval,
    split_catalog,
)
from .config import FinetuneConfig, parse_exclude


@dataclass(frozen=True)
class PairSet:
    """The (image, title) pairs of a run: which items train, which validate, what was dropped."""

    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    split: Split
    n_no_title: int  # train-split items skipped because their title is empty
    n_excluded: int  # train-split items kept out by ``config.exclude``
    n_capped: int  # training pairs dropped by ``config.max_pairs``

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        payload = {
            "seed": self.split.seed,
            "eval_fraction": self.split.eval_fraction,
            "eval": list(self.split.eval),
            "train": list(self.split.train),
            "finetune_train": list(self.train_ids),
            "finetune_val": list(self.val_ids),
            "n_no_title": self.n_no_title,
            "n_excluded": self.n_excluded,
            "n_capped": self.n_capped,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))
        return path


def title_series(catalog: Catalog, column: str) -> pd.Series:
    """The titles (stripped strings); ``productDisplayName`` is the ``title`` column of a Fashion catalog."""
    if column == FASHION_TITLE_COLUMN and column not in catalog.items.columns:
        column = "title"
    catalog.require_column(column)
    return catalog.items[column].astype(str).str.strip()


def make_pairs(catalog: Catalog, config: FinetuneConfig) -> PairSet:
    """Training and validation pairs from the train split only (see :class:`FinetuneConfig`)."""
    split = split_catalog(catalog, eval_fraction=config.eval_fraction, seed=config.split_seed)
    items = catalog.items.loc[list(split.train)]
    titles = title_series(catalog, config.title_column).loc[items.index]
    keep = titles != ""
    n_no_title = int((~keep).sum())
    excluded = pd.Series(False, index=items.index)
    for column, value in parse_exclude(config.exclude):
        catalog.require_column(column)
        excluded |= items[column].astype(str) == value
    n_excluded = int((excluded & keep).sum())
    ids = items.index[keep & ~excluded]
    is_val = hash_unit_interval(ids, f"val-{config.seed}") < config.val_fraction
    train_ids, val_ids = ids[~is_val], ids[is_val]
    n_capped = 0
    if config.max_pairs is not None and len(train_ids) > config.max_pairs:
        order = np.argsort(hash_unit_interval(train_ids, f"subsample-{config.seed}"), kind="stable")
        chosen = np.sort(order[: config.max_pairs])
        n_capped = len(train_ids) - config.max_pairs
        train_ids = train_ids[chosen]
    if len(train_ids) < 2:
        raise ValueError(
            f"only {len(train_ids)} training pair(s) with a title in catalog {catalog.name!r} after the split "
            f"({n_no_title} without a title, {n_excluded} excluded); fine-tuning needs image-title pairs"
        )
    return PairSet(tuple(train_ids), tuple(val_ids), split, n_no_title, n_excluded, n_capped)
