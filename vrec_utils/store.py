"""On-disk embedding cache: content-addressed, one writer at a time, atomic and verified.

A vector is keyed by *what was embedded*, not by the catalog that asked for it: the model
identity (weights, preprocessing), precision and normalisation choose a store folder, and inside
it every vector is filed under the blake2b digest of the image file's bytes (of the text, for
text embeddings). Two catalogs that share images share vectors; an image replaced in place gets a
new digest and is embedded again. Layout::

    <workdir>/embeddings/
        file-digests.npz                 path -> size, mtime_ns, digest (a file is rehashed only
                                         when its size or mtime changes)
        <model-slug>/<modality>-<key>/   one vector store
            store.json                   identity, precision, normalisation (what the key means)
            write.lock, write.pid        advisory lock (filelock): one writer at a time
            chunk-NNNNNN-<b2>.npz        vectors of one extraction chunk (digests + vectors); the
                                         name carries the blake2b of the file's bytes
            keys-<gen>.npy, vectors-<gen>.npy  consolidated, sorted by digest, memory-mapped
            commit.json                  written last: names both files with their sizes and
                                         checksums (blake2b of the keys, CRC-32 per block of
                                         1,024 vectors)
            catalogs/<catalog>-<hash>/   per catalog: manifest.json (coverage), skipped.csv,
                                         saved FAISS indexes

Every file is written under a temporary name (``.tmp-*``, which no glob of the store matches),
fsynced and renamed when complete; ``commit.json`` is the single commit point of a
consolidation. Every load checks sizes and checksums: a damaged part is dropped with one line on
stderr, and the next ``vrec extract`` re-embeds what it held. Nothing is pickled
(``allow_pickle=False`` everywhere).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import json
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from .catalog import Catalog

MANIFEST = "manifest.json"
STORE_JSON = "store.json"
COMMIT = "commit.json"
DIGESTS_FILE = "file-digests.npz"
DEFAULT_WORKDIR = Path("work")
LOCK_TIMEOUT = float(os.environ.get("VREC_LOCK_TIMEOUT", "10"))
BLOCK_ROWS = 1024  # vectors checksummed per block: a flipped bit costs one block, not the cache
KEY_DTYPE = "S32"  # hex of a 16-byte blake2b digest
_CHUNK_RE = re.compile(r"^chunk-(\d{6})-([0-9a-f]{16})\.npz$")
_TMP_PREFIX = ".tmp-"


class EmbeddingsNotFoundError(LookupError):
    """No cached embeddings for a model; the message names the command that makes them."""


class CacheError(RuntimeError):
    """The cache cannot be used or written right now; the message (one line) says why and what to do."""


class CacheBusyError(CacheError):
    """Another process holds the cache's write lock."""


class PartialCacheError(CacheError):
    """Some catalog items have no vector yet; the message names the command that fills them."""


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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


_NOTED: set[str] = set()


def _note(message: str) -> None:
    """One line on stderr about the cache (damage dropped, partial coverage), once per process."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"vrec: {message}", file=sys.stderr)


# ================================================================================ content keys
def content_digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def text_digest(text: str) -> str:
    return content_digest(b"text\0" + text.encode("utf-8"))


class FileDigests:
    """Content digests of image files, remembered per path with size and mtime_ns.

    A rerun stats every file and reads only those whose size or mtime changed. The memo is a
    cache of facts about files (never of vectors): losing or damaging it costs a rehash only.
    """

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.path = Path(workdir) / "embeddings" / DIGESTS_FILE
        self.memo: dict[str, tuple[int, int, str]] = {}
        self.changed = False
        try:
            with np.load(self.path, allow_pickle=False) as data:
                rows = zip(data["paths"].tolist(), data["sizes"].tolist(), data["mtimes"].tolist(), data["digests"].tolist())
                self.memo = {p: (s, m, d.decode()) for p, s, m, d in rows}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            _note(f"{self.path}: unreadable ({type(exc).__name__}); image files will be hashed again")

    def digest(self, path: str) -> str | None:
        """The file's digest, or None when it cannot be read (extraction reports why)."""
        try:
            stat = os.stat(path)
        except OSError:
            return None
        known = self.memo.get(path)
        if known is not None and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        try:
            with open(path, "rb") as handle:
                value = content_digest(handle.read())
        except OSError:
            return None
        self.memo[path] = (stat.st_size, stat.st_mtime_ns, value)
        self.changed = True
        return value

    def save(self) -> None:
        """Persist new digests (merged with what another process saved); skipped while another
        process saves, since it is only a memo."""
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.path) + ".lock", timeout=0):
                memo = {**FileDigests(self.path.parent.parent).memo, **self.memo}
                paths = list(memo)
                buffer = io.BytesIO()
                np.savez(
                    buffer,
                    paths=np.asarray(paths, dtype=str),
                    sizes=np.asarray([memo[p][0] for p in paths], dtype=np.int64),
                    mtimes=np.asarray([memo[p][1] for p in paths], dtype=np.int64),
                    digests=np.asarray([memo[p][2] for p in paths], dtype=KEY_DTYPE),
                )
                _write_atomic(self.path, buffer.getvalue())
                self.changed = False
        except (Timeout, OSError, CacheError):
            pass


def catalog_keys(workdir: str | os.PathLike, catalog: Catalog, modality: str = "image", source_column: str | None = None) -> pd.Series:
    """Content digest of every catalog item ('' where there is nothing to embed: a missing or
    unreadable file, an empty text), indexed by item id."""
    if modality == "text":
        texts = catalog.items[source_column or "title"].astype(str).str.strip()
        return pd.Series([text_digest(t) if t else "" for t in texts], index=catalog.items.index, dtype=object)
    memo = FileDigests(workdir)
    values = [memo.digest(str(p)) or "" for p in catalog.items["image"].tolist()]
    memo.save()
    return pd.Series(values, index=catalog.items.index, dtype=object)


def catalog_dir(workdir: str | os.PathLike, catalog: Catalog) -> str:
    """Name of a catalog's folder inside each store (its CSV's path decides: two CSVs in one
    folder are two catalogs; they still share the vectors of the images they share)."""
    location = hashlib.sha256(str(Path(catalog.source).resolve()).encode()).hexdigest()[:8]
    return f"{slugify(catalog.name)}-{location}"


# ================================================================================ atomic files
def _write_bytes(handle: BinaryIO, data: bytes | memoryview) -> None:
    """The only place bytes reach the disk (tests inject ENOSPC here)."""
    handle.write(data)


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _write_atomic(path: Path, *parts: bytes | memoryview) -> None:
    """Write ``parts`` to a temporary name, fsync, rename: ``path`` is whole or absent."""
    tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{path.name}"
    try:
        with open(tmp, "wb") as handle:
            for part in parts:
                _write_bytes(handle, part)
            handle.flush()
            os.fsync(handle.fileno())
        _replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CacheError(f"cannot write {path}: {reason}; what was written before is kept, rerun when fixed") from exc
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_header(array: np.ndarray) -> bytes:
    """The .npy header of ``array`` (the data follows it verbatim)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(array))
    return buffer.getvalue()


def _block_checksums(vectors: np.ndarray, block_rows: int = BLOCK_ROWS) -> list[str]:
    """CRC-32 of each block of BLOCK_ROWS rows, computed in threads (zlib releases the GIL).

    CRC-32 catches every 1-3 bit flip and every burst of up to 32 bits in a block (what a bad
    disk or a torn write does) at ~2 GB/s per core; it is checked on every load, so speed matters.
    """
    data = vectors if vectors.flags.c_contiguous else np.ascontiguousarray(vectors)
    blocks = [memoryview(data[b : b + block_rows]).cast("B") for b in range(0, len(data), block_rows)]
    if len(blocks) < 2:
        return [f"{zlib.crc32(b):08x}" for b in blocks]
    with ThreadPoolExecutor(max_workers=min(len(blocks), os.cpu_count() or 1)) as pool:
        return [f"{c:08x}" for c in pool.map(zlib.crc32, blocks)]


# ================================================================================ vector store
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
                _remove(path)

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
            _remove(path)
        if old:
            for name in (old["keys"]["file"], old["vectors"]["file"]):
                if name not in (keys_file, vectors_file):
                    _remove(self.directory / name)
        return True


def store_directory(workdir: str | os.PathLike, identity: dict[str, Any], *, precision: str, normalized: bool, modality: str) -> tuple[Path, dict[str, Any]]:
    key_fields = {"identity": identity, "precision": precision, "normalized": normalized, "modality": modality}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    directory = Path(workdir) / "embeddings" / slugify(identity["model"]) / f"{modality}-{key}"
    return directory, {"model": identity["model"], **key_fields, "key": key, "dim": identity.get("dim")}


# ================================================================================ catalog view
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
        self.directory = store.directory / "catalogs" / catalog_dir(workdir, catalog)
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


# ================================================================================ finding caches
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
            embeddings = _catalog_embeddings(store, catalog, keys, info, store.directory / "catalogs" / catalog_dir(workdir, catalog))
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
        embeddings = _catalog_embeddings(store, catalog, keys, info, store.directory / "catalogs" / catalog_dir(workdir, catalog))
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
