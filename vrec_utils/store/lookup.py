"""Finding a model's vectors for a catalog: the stores under a workdir, coverage checks, and the
``vrec extract`` command that fills what is missing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..catalog import Catalog
from .files import (
    MANIFEST,
    STORE_JSON,
    EmbeddingsNotFoundError,
    PartialCacheError,
    _note,
    slugify,
)
from .vectors import VectorStore
from .views import Embeddings, _catalog_embeddings, catalog_keys, view_directory


def _stores(workdir: str | os.PathLike, model: str | None = None, modality: str | None = None) -> list[tuple[VectorStore, dict[str, Any]]]:
    """The vector stores under ``workdir`` with their ``store.json``; with ``model`` (and
    ``modality``) only that model's, located by the layout of :func:`store_directory` rather than
    by reading every store."""
    root = Path(workdir) / "embeddings"
    if model is None:
        paths = sorted(root.glob(f"*/*/{STORE_JSON}"))
    else:
        folder = root / slugify(model)
        prefix = f"{modality}-" if modality else ""
        found = sorted(p for p in folder.iterdir() if p.name.startswith(prefix)) if folder.is_dir() else []
        paths = [p / STORE_JSON for p in found if (p / STORE_JSON).is_file()]
    out = []
    for path in paths:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            _note(f"{path}: unreadable; that cache is ignored")
            continue
        if model is None or info.get("model") == model:  # two names can share a slug
            out.append((VectorStore(path.parent), info))
    return out


def list_caches(workdir: str | os.PathLike, catalog: Catalog | None = None) -> pd.DataFrame:
    """Every vector store under ``workdir``, newest first; with ``catalog``, ``count`` is how many
    of its items have a vector there (stores with none are left out) and ``path`` its folder."""
    rows = []
    keys_by_modality: dict[str, pd.Series] = {}
    for store, info in _stores(workdir):
        view = store.view(info.get("dim"))
        path, count, complete = str(store.directory), len(view.keys), None
        if catalog is not None:
            modality = info.get("modality", "image")
            if modality not in keys_by_modality:
                keys_by_modality[modality] = catalog_keys(workdir, catalog, modality)
            keys = keys_by_modality[modality]
            embeddings = _catalog_embeddings(store, catalog, keys, info, view_directory(store, catalog))
            count, complete, path = len(embeddings), embeddings.manifest["complete"], embeddings.manifest["catalog_dir"]
            if not count:
                continue
        rows.append(
            {
                "model": info["model"],
                "modality": info.get("modality", "image"),
                "count": count,
                "dim": int(view.vectors.shape[1]) if len(view.keys) else info.get("dim"),
                "precision": info.get("precision"),
                "complete": complete,
                "updated": view.updated or info.get("created", ""),
                "path": path,
            }
        )
    frame = pd.DataFrame(rows, columns=["model", "modality", "count", "dim", "precision", "complete", "updated", "path"])
    return frame.sort_values("updated", ascending=False, ignore_index=True)


def load_embeddings(
    workdir: str | os.PathLike,
    catalog: Catalog,
    model: str,
    *,
    modality: str = "image",
    precision: str | None = None,
    source_column: str | None = None,
    allow_partial: bool = True,
) -> Embeddings:
    """``model``'s vectors for ``catalog``'s items, from the store that covers most of them
    (the most recently updated one on a tie).

    Raises :class:`EmbeddingsNotFoundError` naming the ``vrec extract`` command that makes them,
    and with ``allow_partial=False`` :class:`PartialCacheError` when items lack a vector (see
    :func:`check_coverage`).
    """
    best: Embeddings | None = None
    keys: pd.Series | None = None
    for store, info in _stores(workdir, model, modality):
        if info.get("modality", "image") != modality or (precision is not None and info.get("precision") != precision):
            continue
        if keys is None:
            keys = catalog_keys(workdir, catalog, modality, source_column)
        embeddings = _catalog_embeddings(store, catalog, keys, info, view_directory(store, catalog))
        rank = (len(embeddings), embeddings.manifest["updated"])
        if len(embeddings) and (best is None or rank > (len(best), best.manifest["updated"])):
            best = embeddings
    if best is None:
        have = sorted({info["model"] for _, info in _stores(workdir) if info.get("modality", "image") == modality} - {model})
        raise EmbeddingsNotFoundError(
            f"no cached {modality} embeddings of model {model!r} for catalog {catalog.name!r} in "
            f"{Path(workdir)}; make them with: {extract_command(catalog, model, workdir, modality)}"
            + (f" (cached models here: {', '.join(have)})" if have else "")
        )
    extra = _manifest_extra(best)
    if extra:
        best = Embeddings(best.ids, best.vectors, {**extra, **best.manifest})
    return check_coverage(best, catalog, workdir, allow_partial=allow_partial)


def _manifest_extra(embeddings: Embeddings) -> dict[str, Any]:
    """Fields a writer added to the catalog's manifest.json (e.g. ``features_from``)."""
    try:
        saved = json.loads((Path(embeddings.manifest["catalog_dir"]) / MANIFEST).read_text())
    except (OSError, ValueError, KeyError):
        return {}
    return {k: v for k, v in saved.items() if k not in embeddings.manifest}


def extract_command(catalog: Catalog, model: str, workdir: str | os.PathLike, modality: str = "image") -> str:
    text_flag = " --text" if modality == "text" else ""
    return f"vrec extract --catalog {catalog.source if catalog.source.name != 'styles.csv' else catalog.root} --model {model} --workdir {workdir}{text_flag}"


def check_coverage(embeddings: Embeddings, catalog: Catalog, workdir: str | os.PathLike, *, allow_partial: bool) -> Embeddings:
    """Refuse (or, with ``allow_partial``, note on stderr) catalog items without a vector.

    The rule: every item whose image could be read must have a vector. Items recorded as
    unreadable in skipped.csv (or whose file is missing) never will, and do not count; anything
    else missing means extraction has not finished (or a damaged part was dropped).
    """
    manifest = embeddings.manifest
    missing = int(manifest.get("missing", 0))
    if not missing:
        return embeddings
    total = len(embeddings) + missing + int(manifest.get("unreadable", 0))
    command = extract_command(catalog, manifest["model"], workdir, manifest.get("modality", "image"))
    text = f"{missing} of {total} catalog items have no cached {manifest['model']} vector yet (e.g. {', '.join(manifest.get('missing_examples', [])[:3])}); fill them with: {command}"
    if not allow_partial:
        raise PartialCacheError(text + f" (or pass --allow-partial to use the {len(embeddings)} that have one)")
    _note(text)
    return embeddings
