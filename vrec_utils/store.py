"""On-disk embedding cache.

Layout, one folder per (catalog, model, weights + preprocessing + precision + normalisation)::

    <workdir>/embeddings/<catalog>-<hash>/<model-slug>/<modality>-<key>/
        manifest.json        what was computed, how, and whether it is complete
        chunk-000000.npz ... written one chunk at a time (a killed run loses at most one)
        ids.npy, vectors.npy consolidated when a run finishes; loaded memory-mapped
        skipped.csv          items that could not be embedded, with the reason

Nothing is pickled: ids are a fixed-width unicode array and every load uses
``allow_pickle=False``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .catalog import Catalog

MANIFEST = "manifest.json"
DEFAULT_WORKDIR = Path("work")


class EmbeddingsNotFoundError(LookupError):
    """No cached embeddings for a model; the message names the command that makes them."""


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


def slugify(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "model"


def catalog_dir(workdir: str | os.PathLike, catalog: Catalog) -> Path:
    location = hashlib.sha256(str(catalog.root).encode()).hexdigest()[:8]
    return Path(workdir) / "embeddings" / f"{slugify(catalog.name)}-{location}"


class EmbeddingCache:
    """One cache folder: append chunks, list what is done, consolidate, load."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory = directory
        self.manifest = manifest

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
    ) -> "EmbeddingCache":
        key_fields = {
            "identity": identity,
            "precision": precision,
            "normalized": normalized,
            "modality": modality,
            "source_column": source_column,
        }
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:12]
        directory = catalog_dir(workdir, catalog) / slugify(identity["model"]) / f"{modality}-{key}"
        directory.mkdir(parents=True, exist_ok=True)
        manifest_path = directory / MANIFEST
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
        else:
            manifest = {
                "model": identity["model"],
                **key_fields,
                "key": key,
                "dim": identity.get("dim"),
                "catalog": str(catalog.root),
                "created": _now(),
                "complete": False,
                "count": 0,
            }
        cache = cls(directory, manifest)
        cache._write_manifest()
        return cache

    # -- state ----------------------------------------------------------------------------
    def chunk_paths(self) -> list[Path]:
        return sorted(self.directory.glob("chunk-*.npz"))

    def done_ids(self) -> set[str]:
        done: set[str] = set()
        if (self.directory / "ids.npy").exists():
            done.update(np.load(self.directory / "ids.npy", allow_pickle=False).tolist())
        for path in self.chunk_paths():
            with np.load(path, allow_pickle=False) as chunk:
                done.update(chunk["ids"].tolist())
        return done

    def skipped(self) -> pd.DataFrame:
        path = self.directory / "skipped.csv"
        if not path.exists():
            return pd.DataFrame({"id": pd.Series(dtype=str), "reason": pd.Series(dtype=str)})
        return pd.read_csv(path, dtype=str, keep_default_na=False)

    # -- writing ----------------------------------------------------------------------------
    def append(self, ids: list[str], vectors: np.ndarray) -> Path:
        """Write one chunk atomically (temp file + rename)."""
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        existing = self.chunk_paths()
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.directory / f"chunk-{number:06d}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=np.asarray(ids, dtype=str), vectors=np.asarray(vectors, dtype=np.float32))
        os.replace(tmp, path)
        self.manifest["dim"] = int(vectors.shape[1]) if len(vectors) else self.manifest.get("dim")
        return path

    def write_skipped(self, skipped: dict[str, str]) -> None:
        """Record this run's unreadable items (the file always describes the latest run)."""
        frame = pd.DataFrame({"id": list(skipped), "reason": list(skipped.values())})
        frame.to_csv(self.directory / "skipped.csv", index=False)

    def consolidate(self, complete: bool, extra: dict[str, Any] | None = None) -> None:
        """Merge the chunks into ids.npy / vectors.npy and update the manifest."""
        if not self.chunk_paths() and self.manifest.get("complete") == complete and not extra:
            return  # nothing new: keep `updated`, so indexes built from this cache stay valid
        ids, vectors = self._read_all()
        if self.chunk_paths():
            _atomic_save(self.directory / "ids.npy", ids)
            _atomic_save(self.directory / "vectors.npy", vectors)
            for path in self.chunk_paths():
                path.unlink()
        self.manifest.update(complete=complete, count=int(len(ids)), updated=_now(), **(extra or {}))
        if len(vectors):
            self.manifest["dim"] = int(vectors.shape[1])
        self._write_manifest()

    # -- reading ----------------------------------------------------------------------------
    def load(self) -> Embeddings:
        if not self.chunk_paths() and (self.directory / "vectors.npy").exists():
            ids = np.load(self.directory / "ids.npy", allow_pickle=False)
            vectors = np.load(self.directory / "vectors.npy", mmap_mode="r", allow_pickle=False)
            return Embeddings(ids, vectors, self.manifest)
        ids, vectors = self._read_all()
        return Embeddings(ids, vectors, self.manifest)

    def _read_all(self) -> tuple[np.ndarray, np.ndarray]:
        ids_parts: list[np.ndarray] = []
        vec_parts: list[np.ndarray] = []
        if (self.directory / "vectors.npy").exists():
            ids_parts.append(np.load(self.directory / "ids.npy", allow_pickle=False))
            vec_parts.append(np.load(self.directory / "vectors.npy", allow_pickle=False))
        for path in self.chunk_paths():
            with np.load(path, allow_pickle=False) as chunk:
                ids_parts.append(chunk["ids"])
                vec_parts.append(chunk["vectors"])
        if not ids_parts:
            dim = int(self.manifest.get("dim") or 0)
            return np.asarray([], dtype=str), np.zeros((0, dim), dtype=np.float32)
        return np.concatenate(ids_parts).astype(str), np.concatenate(vec_parts).astype(np.float32, copy=False)

    def _write_manifest(self) -> None:
        tmp = self.directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=True))
        os.replace(tmp, self.directory / MANIFEST)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def list_caches(workdir: str | os.PathLike, catalog: Catalog | None = None) -> pd.DataFrame:
    """Every embedding cache under ``workdir`` (optionally only ``catalog``'s), newest first."""
    base = catalog_dir(workdir, catalog) if catalog is not None else Path(workdir) / "embeddings"
    rows = []
    for manifest_path in base.rglob(MANIFEST):
        manifest = json.loads(manifest_path.read_text())
        cache = EmbeddingCache(manifest_path.parent, manifest)
        # an interrupted run has chunks that are not consolidated (counted) yet
        count = len(cache.done_ids()) if cache.chunk_paths() else manifest.get("count", 0)
        rows.append(
            {
                "model": manifest["model"],
                "modality": manifest.get("modality", "image"),
                "count": count,
                "dim": manifest.get("dim"),
                "precision": manifest.get("precision"),
                "complete": manifest.get("complete", False),
                "updated": manifest.get("updated", manifest.get("created")),
                "path": str(manifest_path.parent),
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
) -> Embeddings:
    """The most recently updated cache of ``model``'s embeddings for ``catalog``.

    Raises :class:`EmbeddingsNotFoundError` naming the ``vrec extract`` command that makes them.
    """
    caches = list_caches(workdir, catalog)
    mask = (caches["model"] == model) & (caches["modality"] == modality) & (caches["count"] > 0)
    if precision is not None:
        mask &= caches["precision"] == precision
    hits = caches[mask]
    if hits.empty:
        have = sorted(set(caches.loc[caches["modality"] == modality, "model"]))
        text_flag = " --text" if modality == "text" else ""
        raise EmbeddingsNotFoundError(
            f"no cached {modality} embeddings of model {model!r} for catalog {catalog.name!r} in "
            f"{Path(workdir)}; make them with: vrec extract --catalog {catalog.root} --model {model} "
            f"--workdir {workdir}{text_flag}" + (f" (cached models here: {', '.join(have)})" if have else "")
        )
    directory = Path(hits.iloc[0]["path"])
    manifest = json.loads((directory / MANIFEST).read_text())
    return EmbeddingCache(directory, manifest).load()
