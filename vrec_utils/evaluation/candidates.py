"""The evaluated items and their vectors: candidates shared by every model, duplicate images
left out, rows of unit length, PCA-reduced variants."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from ..catalog import Catalog, Split
from ..image_files import ImageSourceError, is_uri, read_bytes
from ..store import Embeddings


def duplicate_keys(catalog: Catalog, ids: Sequence[str]) -> pd.Series:
    """A key per id, equal for byte-identical images: ``dup_group_first_id`` from
    ``image_meta.csv`` beside the catalog where it lists the id, else the sha256 of the image
    file (an unreadable file gets a key of its own)."""
    groups: dict[str, str] = {}
    meta_path = catalog.root / "image_meta.csv"
    if meta_path.is_file():
        meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
        if {"id", "dup_group_first_id"} <= set(meta.columns):
            groups = dict(zip(meta["id"], meta["dup_group_first_id"]))
    def key(item_id: str) -> str:
        if item_id in groups:
            return f"meta:{groups[item_id]}"
        try:
            return "sha256:" + hashlib.sha256(read_bytes(catalog.items.at[item_id, "image"])).hexdigest()
        except ImageSourceError:
            return f"id:{item_id}"

    ids = list(ids)
    if any(is_uri(p) for p in catalog.items["image"].reindex(ids).astype(str)):
        with ThreadPoolExecutor(max_workers=16) as pool:  # object storage: a round trip per image
            keys = list(pool.map(key, ids))
    else:
        keys = [key(i) for i in ids]
    return pd.Series(keys, index=ids, name="dup_key")


def select_candidates(
    catalog: Catalog, embeddings: Mapping[str, Embeddings], split: Split | None, exclude_duplicates: bool
) -> tuple[pd.Index, dict[str, Any]]:
    """Eval items with a vector for every model, minus the copies of duplicate images."""
    items = catalog.items
    if split is not None:
        not_in_catalog = [i for i in split.eval if i not in items.index]
        if not_in_catalog:
            raise ValueError(f"{len(not_in_catalog)} eval id(s) of the split are not in catalog {catalog.name!r}, e.g. {not_in_catalog[:5]}")
        eval_ids = pd.Index(split.eval)
    else:
        eval_ids = items.index
    missing: dict[str, int] = {}
    keep = np.ones(len(eval_ids), dtype=bool)
    for name, emb in embeddings.items():
        has = eval_ids.isin(pd.Index(emb.ids.astype(str)))
        missing[name] = int((~has).sum())
        keep &= has
    ids = eval_ids[keep]
    duplicates = 0
    if exclude_duplicates:
        first = ~duplicate_keys(catalog, list(ids)).duplicated(keep="first").to_numpy()
        duplicates = int((~first).sum())
        ids = ids[first]
    if len(ids) < 2:
        raise ValueError(f"only {len(ids)} evaluable item(s) (eval items with vectors for every model); need at least 2")
    report = {"eval_items": len(eval_ids), "missing_embeddings": missing, "duplicates_excluded": duplicates, "candidates": len(ids)}
    return ids, report


def unit_rows(x: np.ndarray, name: str, ids: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (similarity = cosine), left as they are when already unit
    length to 1e-4, the rule the index layer applies, so both backends see the same vectors."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    zero = norms <= 1e-12
    if zero.any():
        raise ValueError(f"{name}: {int(zero.sum())} zero vector(s), e.g. ids {ids[zero][:5].tolist()}; cosine similarity is undefined for them")
    if np.all(np.abs(norms - 1.0) < 1e-4):
        return x
    return np.ascontiguousarray(x / norms[:, None], dtype=np.float32)


def pca_vectors(train: np.ndarray, vectors: np.ndarray, dims: list[int], seed: int, ids: np.ndarray) -> dict[int, np.ndarray]:
    """Project ``vectors`` onto the first d principal components of ``train`` (fitted once with
    the largest d: exact solvers give nested components), then re-normalise."""
    from sklearn.decomposition import PCA  # deferred: heavy to import (0.8 s), only PCA rows need it

    top = max(dims)
    solver = "covariance_eigh" if len(train) >= train.shape[1] else "full"
    pca = PCA(n_components=top, svd_solver=solver, random_state=seed).fit(train)
    projected = (vectors - pca.mean_) @ pca.components_.T
    return {d: unit_rows(projected[:, :d], f"pca{d}", ids) for d in dims}


__all__ = ["duplicate_keys", "pca_vectors", "select_candidates", "unit_rows"]
