"""Scoring on the validation pairs: which epoch the run keeps and which output mix (alpha) it saves."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..catalog import Catalog
from ..metrics import ideal_from_counts, ndcg_at_k
from .config import FinetuneConfig
from .loss import SigmoidLoss, sigmoid_loss
from .pair_models import PairModel

ALPHA_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # mix coefficients tried (output mix or WiSE-FT)


@dataclass
class BestEpoch:
    """The best epoch so far (its score by ``by``, trainable and loss tensors) and the epochs since."""

    score: float | None = None
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None
    loss_state: dict[str, torch.Tensor] | None = None
    since: int = 0
    by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``best`` entry (no deep copy: the tensors are already clones)."""
        return {f: getattr(self, f) for f in ("score", "epoch", "state", "loss_state", "since", "by")}


def label_ndcg(vectors: np.ndarray, labels: Sequence[str], k: int = 5) -> float:
    """Mean image-to-image nDCG@k among ``vectors`` (query excluded from its candidates),
    relevant = same label; queries with no relevant candidate are left out."""
    labels = np.asarray(labels, dtype=object)
    n = len(labels)
    if n < 2:
        return float("nan")
    _, codes, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
    n_rel = counts[codes] - 1
    sims = np.asarray(vectors, dtype=np.float32) @ np.asarray(vectors, dtype=np.float32).T
    np.fill_diagonal(sims, -np.inf)
    depth = min(k, n - 1)
    top = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]
    order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)
    rel = (codes[top] == codes[:, None]).astype(np.float64)
    values = ndcg_at_k(rel, ideal_from_counts(n_rel, k), k)
    mask = n_rel > 0
    return float(values[mask].mean()) if mask.any() else float("nan")


def val_labels(catalog: Catalog, val_ids: Sequence[str], label: str | None, stacklevel: int = 3) -> np.ndarray | None:
    """The ``label`` of each validation item, or None (select by loss) when there is no such column."""
    if label is None or len(val_ids) < 2:
        return None
    if label not in catalog.items.columns:
        warnings.warn(
            f"label {label!r} is not a column of catalog {catalog.name!r}: the epoch is chosen by validation loss "
            "and alpha falls back to 0.5 (set label to a category column to choose them by validation nDCG@5)",
            stacklevel=stacklevel,
        )
        return None
    return catalog.items.loc[list(val_ids), label].astype(str).to_numpy()


@torch.no_grad()
def val_loss(model: PairModel, val_pos: np.ndarray, loss_fn: SigmoidLoss, batch_size: int) -> float:
    """Mean sigmoid loss over ``val_pos`` in batches of ``batch_size`` (a lone last pair is skipped)."""
    total, count = 0.0, 0
    for batch in model.batches(val_pos, batch_size):
        img, txt = model.forward(batch)
        if img.shape[0] < 2:
            continue
        total += float(sigmoid_loss(img, txt, loss_fn.t_prime, loss_fn.bias, normalize=False)) * img.shape[0]
        count += img.shape[0]
    return total / count if count else float("nan")


def update_best(
    best: BestEpoch, row: dict[str, Any], config: FinetuneConfig, has_labels: bool, model: PairModel, loss_fn: SigmoidLoss
) -> bool:
    """Keep ``row``'s epoch in ``best`` when it scores higher by ``config.select_by`` (falling back
    to val_loss without labels, to the last epoch without a val loss); returns whether it did."""
    by = config.select_by
    if by == "val_ndcg" and (not has_labels or math.isnan(row["val_ndcg@5"])):
        by = "val_loss"
    if by == "val_loss" and math.isnan(row["val_loss"]):
        by = "last"
    score = {"val_ndcg": row["val_ndcg@5"], "val_loss": -row["val_loss"], "last": float(row["epoch"])}[by]
    improved = best.score is None or score > best.score
    if improved:
        loss_state = {k: v.detach().clone() for k, v in loss_fn.state_dict().items()}
        best.score, best.epoch, best.state, best.loss_state, best.since, best.by = score, row["epoch"], model.train_state(), loss_state, 0, by
    else:
        best.since += 1
    return improved


def choose_alpha(
    model: PairModel, val_pos: np.ndarray, labels: np.ndarray | None, config: FinetuneConfig
) -> tuple[float | None, pd.DataFrame]:
    """The mix coefficient of a model that has one (mini-siglip; output mix alpha or WiSE-FT
    weight, ``config.mix``) and the table it was chosen from (``alpha``, ``val_ndcg@5`` and, when
    the model has a shifted selection set, ``shift_select_ndcg@5``).

    * ``config.alpha`` when set;
    * in-domain only (``select_on="val"``): the smallest coefficient in :data:`ALPHA_GRID` whose
      validation nDCG@5 is within ``config.alpha_tolerance`` of the best (prefer the base when
      tuning buys little: the guard against forgetting); without labels 0.5;
    * with a selection set (``select_on="shift"``): among the coefficients whose nDCG@5 on the
      shifted *selection half* is at least the base's (coefficient 0) minus
      ``config.shift_tolerance`` (that constraint is the guard here), the one with the best
      validation nDCG@5; the reported half is never scored here.
    """
    if not model.supports_alpha():
        return None, pd.DataFrame(columns=["alpha", "val_ndcg@5"])
    selection = model.selection
    rows = []
    if labels is not None or selection is not None:
        for a in ALPHA_GRID:
            row = {"alpha": a, "val_ndcg@5": label_ndcg(model.image_embeddings(val_pos, a), labels) if labels is not None else float("nan")}
            if selection is not None:
                with torch.no_grad():
                    vectors = model.embed_features(selection.features, a, selection.maps).cpu().numpy()
                row["shift_select_ndcg@5"] = label_ndcg(vectors, selection.labels)
            rows.append(row)
    table = pd.DataFrame(rows, columns=["alpha", "val_ndcg@5"] + (["shift_select_ndcg@5"] if selection is not None else []))
    if config.alpha is not None:
        return float(config.alpha), table
    if selection is None:
        if table.empty or table["val_ndcg@5"].isna().all():
            return 0.5, table
        best = table["val_ndcg@5"].max()
        return float(table.loc[table["val_ndcg@5"] >= best - config.alpha_tolerance, "alpha"].min()), table
    floor = table.loc[table["alpha"] == 0.0, "shift_select_ndcg@5"].item() - config.shift_tolerance
    allowed = table[table["shift_select_ndcg@5"] >= floor]  # never empty: coefficient 0 is the base
    if allowed["val_ndcg@5"].isna().all():
        return float(allowed["alpha"].max()), table
    return float(allowed.loc[allowed["val_ndcg@5"].idxmax(), "alpha"]), table
