"""A catalog's view of a vector store: its items' content keys, its folder, and the write path.

:class:`EmbeddingCache` opens a store for writing (holding its lock), files vectors under the
content digests of a catalog's items and records the catalog's coverage in its view folder
(``<store>/catalogs/<catalog>-<identity>/``: manifest.json, skipped.csv, saved indexes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from ..catalog import Catalog
from .files import (
    KEY_DTYPE,
    LOCK_TIMEOUT,
    MANIFEST,
    STORE_JSON,
    CacheBusyError,
    FileDigests,
    _now,
    _write_atomic,
    slugify,
    text_digest,
)
from .vectors import VectorStore, store_directory


@dataclass(frozen=True)
class Embeddings:
    """Vectors with their item ids, row i of ``vectors`` belongs to ``ids[i]``."""

    ids: np.ndarray
    vectors: np.ndarray
    manifest: dict[str, Any]

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: Iterable[str]) -> np.ndarray:
        """Row numbers of ``ids``; raises KeyError naming the first id that has no vector."""
        lookup = self._lookup()
        out = []
        for item_id in ids:
            try:
                out.append(lookup[str(item_id)])
            except KeyError:
                raise KeyError(f"item {item_id!r} has no cached {self.model} embedding") from None
        return np.asarray(out, dtype=np.int64)

    def vectors_for(self, ids: Iterable[str]) -> np.ndarray:
        return np.asarray(self.vectors[self.positions(ids)])

    def restrict(self, ids: Iterable[str]) -> "Embeddings":
        """The rows for ``ids`` that have vectors, in the order given."""
        lookup = self._lookup()
        keep = [lookup[i] for i in map(str, ids) if i in lookup]
        pos = np.asarray(keep, dtype=np.int64)
        return Embeddings(self.ids[pos], np.asarray(self.vectors[pos]), self.manifest)

    def _lookup(self) -> dict[str, int]:
        cached = self.__dict__.get("_lookup_cache")
        if cached is None:
            cached = {str(i): n for n, i in enumerate(self.ids)}
            object.__setattr__(self, "_lookup_cache", cached)
        return cached


def catalog_keys(workdir: str | os.PathLike, catalog: Catalog, modality: str = "image", source_column: str | None = None) -> pd.Series:
    """Content digest of every catalog item ('' where there is nothing to embed: a missing or
    unreadable file, an empty text), indexed by item id."""
    if modality == "text":
        texts = catalog.items[source_column or "title"].astype(str).str.strip()
        return pd.Series([text_digest(t) if t else "" for t in texts], index=catalog.items.index, dtype=object)
    memo = FileDigests(workdir)
    values = [d or "" for d in memo.digests([str(p) for p in catalog.items["image"].tolist()])]
    memo.save()
    return pd.Series(values, index=catalog.items.index, dtype=object)


def catalog_dir(catalog: Catalog) -> str:
    """Name of a catalog's view folder inside each store: a readable slug and the catalog's one
    identity, :meth:`Catalog.fingerprint` (its CSV and its ids: two CSVs in one folder are two
    catalogs; they still share the vectors of the images they share)."""
    return f"{slugify(catalog.name)}-{catalog.fingerprint()[:8]}"


def view_directory(store: VectorStore, catalog: Catalog) -> Path:
    """``<store>/catalogs/<catalog_dir>``: the catalog's manifest.json, skipped.csv."""
    return store.directory / "catalogs" / catalog_dir(catalog)


class EmbeddingCache:
    """A catalog's view of one vector store, opened for writing (holds the store's lock).

    ``append(ids, vectors)`` files the vectors under the ids' content digests; ``load()`` gives
    the catalog's :class:`Embeddings`. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, store: VectorStore, catalog: Catalog, keys: pd.Series, info: dict[str, Any], workdir: Path, source_column: str | None) -> None:
        self.store = store
        self.catalog = catalog
        self.keys = keys
        self.info = info
        self.workdir = workdir
        self.source_column = source_column
        self.directory = view_directory(store, catalog)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock: FileLock | None = None
        self.manifest: dict[str, Any] = {**info, "catalog": str(catalog.source)}

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        workdir: str | os.PathLike,
        catalog: Catalog,
        identity: dict[str, Any],
        *,
        precision: str,
        normalized: bool,
        modality: str = "image",
        source_column: str | None = None,
        lock_timeout: float | None = None,
    ) -> "EmbeddingCache":
        directory, info = store_directory(workdir, identity, precision=precision, normalized=normalized, modality=modality)
        directory.mkdir(parents=True, exist_ok=True)
        store = VectorStore(directory)
        cache = cls(store, catalog, pd.Series(dtype=object), info, Path(workdir), source_column)
        cache.acquire(LOCK_TIMEOUT if lock_timeout is None else lock_timeout)
        try:
            if not (directory / STORE_JSON).exists():
                _write_atomic(directory / STORE_JSON, json.dumps({**info, "created": _now()}, indent=2, sort_keys=True, default=str).encode())
            store.clean_strays()
            cache.keys = catalog_keys(workdir, catalog, modality, source_column)
            cache.manifest = cache.coverage()  # count, complete, missing: what is there now
        except BaseException:
            cache.close()
            raise
        return cache

    def acquire(self, timeout: float) -> None:
        if self._lock is not None and self._lock.is_locked:
            return
        path = self.store.directory / "write.lock"
        lock = FileLock(str(path), timeout=timeout)
        try:
            lock.acquire()
        except Timeout:
            try:
                holder = f"pid {int((self.store.directory / 'write.pid').read_text())}"
            except (OSError, ValueError):
                holder = "another process"
            raise CacheBusyError(
                f"embedding cache {self.store.directory} is being written by {holder} (lock file {path}); "
                f"waited {timeout:.0f}s: rerun when it has finished (VREC_LOCK_TIMEOUT=seconds waits longer)"
            ) from None
        self._lock = lock
        (self.store.directory / "write.pid").write_text(str(os.getpid()))

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- state ----------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        """Catalog ids whose content already has a vector here."""
        rows = self.store.view(self.info.get("dim")).lookup(self.keys.to_numpy(dtype=str))
        return set(self.keys.index[(rows >= 0) & (self.keys.to_numpy() != "")])

    def chunk_paths(self) -> list[Path]:
        return self.store.chunk_paths()

    def skipped(self) -> pd.DataFrame:
        return read_skipped(self.directory)

    # -- writing ----------------------------------------------------------------------------
    def append(self, ids: list[str], vectors: np.ndarray) -> Path:
        """File one chunk of vectors under the content digests of ``ids``."""
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        self.acquire(LOCK_TIMEOUT)
        digests = []
        for item_id in map(str, ids):
            digest = self.keys.get(item_id, "")
            if not digest:
                raise ValueError(f"item {item_id!r} of catalog {self.catalog.name!r} has no content to key its vector by (missing file or empty text)")
            digests.append(digest)
        return self.store.write_chunk(np.asarray(digests, dtype=KEY_DTYPE), np.asarray(vectors, dtype=np.float32))

    def write_skipped(self, skipped: dict[str, str]) -> None:
        """Record this run's items that could not be embedded (the file describes the latest run)."""
        frame = pd.DataFrame({"id": list(skipped), "reason": list(skipped.values())})
        _write_atomic(self.directory / "skipped.csv", frame.to_csv(index=False).encode())

    def consolidate(self, complete: bool | None = None, extra: dict[str, Any] | None = None) -> None:
        """Merge new chunks (and drop damaged parts) in one commit, then record the catalog's
        coverage in its manifest.json. Ends the write session (releases the lock)."""
        try:
            self.acquire(LOCK_TIMEOUT)
            view = self.store.view(self.info.get("dim"))
            self.store.consolidate(force=view.dropped > 0)
            manifest = {**self.coverage(), **(extra or {})}
            text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
            path = self.directory / MANIFEST
            if not path.exists() or path.read_text() != text:
                _write_atomic(path, text.encode())
            self.manifest = manifest
        finally:
            self.close()

    # -- reading ----------------------------------------------------------------------------
    def load(self) -> Embeddings:
        return _catalog_embeddings(self.store, self.catalog, self.keys, self.info, self.directory)

    def coverage(self) -> dict[str, Any]:
        """The manifest of :meth:`load` (count, complete, missing, ...) without gathering vectors."""
        return _catalog_embeddings(self.store, self.catalog, self.keys, self.info, self.directory, gather=False).manifest


def read_skipped(directory: Path) -> pd.DataFrame:
    path = Path(directory) / "skipped.csv"
    if not path.exists():
        return pd.DataFrame({"id": pd.Series(dtype=str), "reason": pd.Series(dtype=str)})
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _catalog_embeddings(store: VectorStore, catalog: Catalog, keys: pd.Series, info: dict[str, Any], directory: Path, gather: bool = True) -> Embeddings:
    """The catalog's rows of the store, in catalog order, with coverage in the manifest
    (``gather=False``: the coverage only, vectors left empty)."""
    view = store.view(info.get("dim"))
    rows = view.lookup(keys.to_numpy(dtype=str))
    rows[keys.to_numpy() == ""] = -1
    have = rows >= 0
    ids = keys.index.to_numpy(dtype=str)[have]
    vectors = np.take(np.asarray(view.vectors), rows[have], axis=0) if have.any() and gather else np.zeros((0, int(view.vectors.shape[1] or info.get("dim") or 0)), np.float32)
    lacking = keys.index[~have]
    skipped = set(read_skipped(directory)["id"]) | set(keys.index[keys.to_numpy() == ""])
    unreadable = [i for i in lacking if i in skipped]
    missing = [i for i in lacking if i not in skipped]
    manifest = {
        **info,
        "catalog": str(catalog.source),
        "catalog_dir": str(directory),
        "store": str(store.directory),
        "count": int(have.sum()),
        "missing": len(missing),
        "missing_examples": missing[:5],
        "unreadable": len(unreadable),
        "complete": not missing,
        "dropped_damaged": view.dropped,
        "updated": view.updated,
    }
    if len(view.keys):
        manifest["dim"] = int(view.vectors.shape[1])
    return Embeddings(ids, vectors, manifest)
