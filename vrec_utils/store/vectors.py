"""One vector store folder: content-addressed chunks, the consolidated pair and its commit record.

:class:`VectorStore` reads (verifying every checksum, dropping damaged parts with one line on
stderr) and writes (chunks, consolidation; the caller holds the store's lock).
:func:`store_directory` is where a model identity's store lives.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import files
from .files import (
    _TMP_PREFIX,
    BLOCK_ROWS,
    COMMIT,
    KEY_DTYPE,
    STORE_JSON,
    CacheError,
    _block_checksums,
    _note,
    _now,
    _npy_bytes,
    _npy_header,
    _write_atomic,
    content_digest,
    slugify,
)

_CHUNK_RE = re.compile(r"^chunk-(\d{6})-([0-9a-f]{16})\.npz$")


@dataclass
class StoreView:
    """What a store holds, verified: unique keys and their vectors (memory-mapped where possible)."""

    keys: np.ndarray
    vectors: np.ndarray
    updated: str
    dropped: int  # vectors dropped because their file failed its checks

    _index: pd.Index | None = field(default=None, repr=False)

    def lookup(self, digests: np.ndarray) -> np.ndarray:
        """Row of each digest (a str array), -1 where the store has none."""
        if self._index is None:
            self._index = pd.Index(self.keys.astype(str))
        return self._index.get_indexer(digests)


_VERIFIED: dict[tuple, StoreView] = {}  # in-process: one verification per committed state


class VectorStore:
    """One store folder: chunks, the consolidated pair and its commit record."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.directory / STORE_JSON).read_text())

    def chunk_paths(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("chunk-*.npz") if _CHUNK_RE.match(p.name))

    def commit(self) -> dict[str, Any] | None:
        """The commit record, None when there is none or it cannot be read (reported)."""
        try:
            record = json.loads((self.directory / COMMIT).read_text())
            int(record["rows"]), int(record["dim"]), int(record["generation"])
            str(record["keys"]["file"]), int(record["keys"]["size"]), str(record["vectors"]["file"]), int(record["vectors"]["size"])
            return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _note(f"{self.directory / COMMIT}: unreadable ({type(exc).__name__}); its vectors are dropped and `vrec extract` re-embeds them")
            return None

    # -- reading --------------------------------------------------------------------------------
    def view(self, dim: int | None = None) -> StoreView:
        """The verified contents; retried while a concurrent writer commits under our feet."""
        for _ in range(5):
            state = self._state_key()
            cached = _VERIFIED.get(state)
            if cached is not None:
                return cached
            try:
                view = self._read(dim)
            except FileNotFoundError:
                continue  # a consolidation removed what we listed: read the new state
            if self._state_key() == state:
                if len(_VERIFIED) > 32:
                    _VERIFIED.clear()
                _VERIFIED[state] = view
                return view
        raise CacheError(f"{self.directory} keeps changing while being read (is a writer stuck?); rerun")

    def _state_key(self) -> tuple:
        parts: list[Any] = [str(self.directory)]
        for path in sorted(self.directory.glob("*.np[yz]")) + [self.directory / COMMIT]:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            parts.append((path.name, stat.st_size, stat.st_mtime_ns))
        return tuple(parts)

    def _read(self, dim: int | None) -> StoreView:
        keys_parts: list[np.ndarray] = []
        vec_parts: list[np.ndarray] = []
        dropped = 0
        commit = self.commit()
        updated = ""
        if commit is not None:
            keys, vectors, bad = self._read_base(commit)
            dropped += bad
            updated = commit.get("updated", "")
            if keys is not None:
                keys_parts.append(keys)
                vec_parts.append(vectors)
                dim = int(vectors.shape[1])
        for path in self.chunk_paths():
            chunk = self._read_chunk(path)
            if chunk is None:
                dropped += 1
                continue
            keys_parts.append(chunk[0])
            vec_parts.append(chunk[1])
            updated = max(updated, _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc).isoformat(timespec="microseconds"))
        if not keys_parts:
            return StoreView(np.asarray([], dtype=KEY_DTYPE), np.zeros((0, int(dim or 0)), dtype=np.float32), updated, dropped)
        if len(keys_parts) == 1:
            keys, vectors = keys_parts[0], vec_parts[0]
        else:
            keys = np.concatenate(keys_parts)
            vectors = np.concatenate([np.asarray(v) for v in vec_parts])
        _, first = np.unique(keys, return_index=True)
        if len(first) < len(keys):  # the same content twice (e.g. chunks left by a crash after a commit)
            first.sort()
            keys, vectors = keys[first], np.asarray(vectors)[first]
        return StoreView(keys, vectors, updated, dropped)

    def _read_base(self, commit: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None, int]:
        """The consolidated pair, minus blocks whose checksum fails (reported)."""
        rows = int(commit["rows"])
        keys_path = self.directory / commit["keys"]["file"]
        vectors_path = self.directory / commit["vectors"]["file"]
        try:
            data = keys_path.read_bytes()
            if len(data) != commit["keys"]["size"] or content_digest(data) != commit["keys"]["blake2b"]:
                raise ValueError("size or checksum differs from commit.json")
            keys = np.load(io.BytesIO(data), allow_pickle=False)
            if vectors_path.stat().st_size != commit["vectors"]["size"]:
                raise ValueError(f"{vectors_path.name} is {vectors_path.stat().st_size} bytes, commit.json says {commit['vectors']['size']}")
            vectors = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
            if vectors.shape != (rows, int(commit["dim"])) or vectors.dtype != np.float32 or keys.shape != (rows,):
                raise ValueError("shape differs from commit.json")
        except FileNotFoundError:
            if (self.directory / COMMIT).exists() and json.loads((self.directory / COMMIT).read_text()) != commit:
                raise  # a writer committed meanwhile: the caller reads again
            _note(f"{self.directory}: consolidated vectors missing; dropped {rows} vectors (`vrec extract` re-embeds them)")
            return None, None, rows
        except (OSError, ValueError, KeyError) as exc:
            _note(f"{keys_path.parent}: consolidated vectors damaged ({exc}); dropped {rows} vectors (`vrec extract` re-embeds them)")
            return None, None, rows
        good = np.ones(rows, dtype=bool)
        try:
            block_rows, expected = int(commit["vectors"]["block_rows"]), list(commit["vectors"]["crc32"])
        except (KeyError, TypeError, ValueError):
            block_rows, expected = max(rows, 1), []  # a commit record we cannot read: trust nothing
        actual = _block_checksums(vectors, block_rows)
        for n, value in enumerate(actual):
            if n >= len(expected) or value != expected[n]:
                good[n * block_rows : (n + 1) * block_rows] = False
        bad = int((~good).sum())
        if bad:
            _note(f"{vectors_path}: {bad} of {rows} vectors fail their checksum; dropped (`vrec extract` re-embeds them)")
            return keys[good], np.asarray(vectors[good]), bad
        return keys, vectors, 0

    def _read_chunk(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        match = _CHUNK_RE.match(path.name)
        data = path.read_bytes()
        try:
            if match is None or hashlib.blake2b(data, digest_size=8).hexdigest() != match.group(2):
                raise ValueError("checksum differs from its name")
            with np.load(io.BytesIO(data), allow_pickle=False) as chunk:
                keys, vectors = chunk["keys"], chunk["vectors"]
            if keys.ndim != 1 or vectors.ndim != 2 or len(keys) != len(vectors):
                raise ValueError("keys and vectors differ in length")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            _note(f"{path}: damaged chunk ({exc}); dropped (`vrec extract` re-embeds it)")
            return None
        return keys.astype(KEY_DTYPE), vectors.astype(np.float32, copy=False)

    # -- writing (the caller holds the lock) -------------------------------------------------------
    def clean_strays(self) -> None:
        """Temporary files of killed writers and consolidated files no commit names."""
        commit = self.commit() or {}
        named = {commit.get("keys", {}).get("file"), commit.get("vectors", {}).get("file")}
        for path in self.directory.iterdir():
            stray = path.name.startswith(_TMP_PREFIX) or path.name.endswith(".tmp.npz")
            stray |= path.name.startswith(("keys-", "vectors-")) and path.name not in named
            if stray and path.is_file():
                files._remove(path)  # through the module: tests replace it to inject faults

    def write_chunk(self, keys: np.ndarray, vectors: np.ndarray) -> Path:
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.asarray(keys, dtype=KEY_DTYPE), vectors=np.asarray(vectors, dtype=np.float32))
        data = buffer.getvalue()
        existing = [int(_CHUNK_RE.match(p.name).group(1)) for p in self.chunk_paths()]
        number = max(existing) + 1 if existing else 0
        path = self.directory / f"chunk-{number:06d}-{hashlib.blake2b(data, digest_size=8).hexdigest()}.npz"
        _write_atomic(path, data)
        return path

    def consolidate(self, force: bool = False) -> bool:
        """Merge the chunks into a new consolidated pair, sorted by key; True if anything changed."""
        chunks = self.chunk_paths()
        if not chunks and not force:
            return False
        view = self._read(None)
        order = np.argsort(view.keys, kind="stable")
        keys = np.ascontiguousarray(view.keys[order])
        vectors = np.ascontiguousarray(np.asarray(view.vectors)[order], dtype=np.float32)
        old = self.commit()
        generation = int(old["generation"]) + 1 if old else 0
        keys_file, vectors_file = f"keys-{generation:06d}.npy", f"vectors-{generation:06d}.npy"
        keys_bytes = _npy_bytes(keys)
        header = _npy_header(vectors)
        _write_atomic(self.directory / keys_file, keys_bytes)
        _write_atomic(self.directory / vectors_file, header, memoryview(vectors).cast("B"))
        record = {
            "generation": generation,
            "rows": int(len(keys)),
            "dim": int(vectors.shape[1]),
            "keys": {"file": keys_file, "size": len(keys_bytes), "blake2b": content_digest(keys_bytes)},
            "vectors": {"file": vectors_file, "size": len(header) + vectors.nbytes, "block_rows": BLOCK_ROWS, "crc32": _block_checksums(vectors)},
            "updated": _now(),
        }
        _write_atomic(self.directory / COMMIT, json.dumps(record, indent=1).encode())  # the commit point
        for path in chunks:
            files._remove(path)
        if old:
            for name in (old["keys"]["file"], old["vectors"]["file"]):
                if name not in (keys_file, vectors_file):
                    files._remove(self.directory / name)
        return True


def store_directory(workdir: str | os.PathLike, identity: dict[str, Any], *, precision: str, normalized: bool, modality: str) -> tuple[Path, dict[str, Any]]:
    key_fields = {"identity": identity, "precision": precision, "normalized": normalized, "modality": modality}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    directory = Path(workdir) / "embeddings" / slugify(identity["model"]) / f"{modality}-{key}"
    return directory, {"model": identity["model"], **key_fields, "key": key, "dim": identity.get("dim")}
