"""Part 6: standard protocols, so numbers can be set against published ones.

On a Fashion Product Images catalog (the Kaggle set Marqo's fashion benchmark calls KAGL; the
layout of ``data/sample`` and fashion-small):

* **text-to-image** (Marqo, KAGL): each product's title (``productDisplayName``) queries all
  product images; the one relevant image is the product's own. Recall@1, Recall@10 and MRR (over
  the full ranking). Compare with Marqo-FashionSigLIP's KAGL text-to-image table.
* **category-to-product** / **sub-category-to-product** (Marqo, KAGL): the name of each
  ``articleType`` / ``subCategory`` value queries all images; relevant = the images with that
  value. P@1 and P@10, averaged over the values. Compare with Marqo's category tables.
* **image-to-image Recall@1** (MIEB's Stanford Online Products protocol, fixed): each image
  queries the others with the query excluded *by id* (an earlier MIEB version scored the query
  itself, giving every model a perfect top-1); relevant = same label (``articleType`` here, the
  product class in SOP). Copies of one image are counted once (as in the evaluation).

Text protocols need a text tower: image-only models (CNNs) get no row, with a note. Our catalogs
are samples of KAGL (fashion-small: 12,000 items) and our models are not Marqo's, so the numbers
show the protocol, not a reproduction of a published table.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..index.exact import exact_knn
from .data import DecisionData

PROTOCOLS = {
    "text-to-image": "title -> own image among all images; Recall@1/@10, MRR (full ranking); Marqo KAGL text-to-image",
    "category-to-product": "articleType name -> images of that type; P@1/P@10 over types; Marqo KAGL category-to-product",
    "sub-category-to-product": "subCategory name -> images of that sub-category; P@1/P@10; Marqo KAGL sub-category-to-product",
    "image-to-image": "image -> other images (query excluded by id), same label at rank 1; Recall@1; MIEB SOP retrieval (fixed)",
}


def own_item_ranks(queries: np.ndarray, images: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of image ``own[i]`` for query i among all ``images`` (float64 scores; equal
    scores count against it only from lower rows, the project's tie rule)."""
    ranks = np.empty(len(queries), dtype=np.int64)
    images64 = images.astype(np.float64)
    for start in range(0, len(queries), 1024):
        scores = queries[start : start + 1024].astype(np.float64) @ images64.T
        target = own[start : start + len(scores)]
        s_own = scores[np.arange(len(scores)), target][:, None]
        before = np.arange(len(images))[None, :] < target[:, None]
        ranks[start : start + len(scores)] = 1 + (scores > s_own).sum(axis=1) + ((scores == s_own) & before).sum(axis=1)
    return ranks


def text_to_image(title_vectors: np.ndarray, image_vectors: np.ndarray, has_title: np.ndarray) -> dict[str, float]:
    """Recall@1, Recall@10, MRR of each title (rows with ``has_title``) finding its own image (same row)."""
    rows = np.flatnonzero(has_title)
    if not len(rows):
        return {"recall@1": float("nan"), "recall@10": float("nan"), "mrr": float("nan"), "n_queries": 0}
    ranks = own_item_ranks(title_vectors[rows], image_vectors, rows)
    return {"recall@1": float(np.mean(ranks <= 1)), "recall@10": float(np.mean(ranks <= 10)), "mrr": float(np.mean(1.0 / ranks)),
            "n_queries": len(rows)}


def label_to_product(label_vectors: Mapping[str, np.ndarray], image_vectors: np.ndarray, labels: np.ndarray, ks=(1, 10)) -> dict[str, float]:
    """P@k of each label name's text against the images (relevant: images with that label), mean over labels."""
    names = list(label_vectors)
    if not names:
        return {f"p@{k}": float("nan") for k in ks} | {"n_queries": 0}
    queries = np.stack([label_vectors[n] for n in names]).astype(np.float32)
    _, rows = exact_knn(queries, np.ascontiguousarray(image_vectors, dtype=np.float32), max(ks))
    hits = labels[np.maximum(rows, 0)] == np.asarray(names, dtype=object)[:, None]
    hits &= rows >= 0
    return {f"p@{k}": float(hits[:, :k].mean()) for k in ks} | {"n_queries": len(names)}


def image_to_image_recall1(data: DecisionData, model: str) -> tuple[dict[str, float], np.ndarray]:
    """Recall@1 with the query excluded by id; also the top-1 positions (for checks)."""
    x = data.vectors[model]
    top1 = data.search(x, x, 1)[:, 0]
    labels = data.relevance.codes[0]
    hit = (top1 >= 0) & (labels[np.maximum(top1, 0)] == labels[data.query_pos])
    return {"recall@1": float(hit.mean()), "n_queries": int(data.n_queries)}, top1


def protocol_table(data: DecisionData, text_encoders: Mapping[str, object] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Every protocol for every model (text ones only for models with an encoder in
    ``text_encoders``: ``{model: callable(list[str]) -> unit vectors}``). Returns (table, notes)."""
    rows, notes = [], []
    items = data.catalog.items.loc[data.ids]
    for model in data.models:
        label = data.labels[model]
        metrics, _ = image_to_image_recall1(data, model)
        rows.append({"model": label, "protocol": "image-to-image", **metrics, "compare_with": PROTOCOLS["image-to-image"]})
        encode = (text_encoders or {}).get(model)
        if encode is None:
            notes.append(f"{label}: no text tower, so no text-to-image or category-to-product rows")
            continue
        titles = items["title"].astype(str).str.strip() if "title" in items.columns else pd.Series("", index=items.index)
        has_title = (titles != "").to_numpy()
        if has_title.any():
            vectors = np.zeros_like(data.vectors[model])
            vectors[has_title] = encode(titles[has_title].tolist())
            rows.append({"model": label, "protocol": "text-to-image", **text_to_image(vectors, data.vectors[model], has_title),
                         "compare_with": PROTOCOLS["text-to-image"]})
        else:
            notes.append("the catalog has no titles: no text-to-image rows")
        for protocol, column in (("category-to-product", "articleType"), ("sub-category-to-product", "subCategory")):
            if column not in items.columns:
                notes.append(f"the catalog has no {column} column: no {protocol} rows")
                continue
            values = sorted(v for v in items[column].astype(str).unique() if v.strip())
            label_vectors = dict(zip(values, encode(values))) if values else {}
            result = label_to_product(label_vectors, data.vectors[model], items[column].astype(str).to_numpy(dtype=object))
            rows.append({"model": label, "protocol": protocol, **result, "compare_with": PROTOCOLS[protocol]})
    return pd.DataFrame(rows), notes


__all__ = ["PROTOCOLS", "image_to_image_recall1", "label_to_product", "own_item_ranks", "protocol_table", "text_to_image"]
