"""The store's lowest layer: layout names, errors, content digests and atomic, checksummed files.

Every file of the cache is written by :func:`_write_atomic` (temporary name, fsync, rename), so a
file is whole or absent. ``_write_bytes``, ``_replace`` and ``_remove`` are the only places bytes
reach or leave the disk: the fault-injection tests replace them (through ``vrec_utils.store``).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import os
import re
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from filelock import FileLock, Timeout

from .. import image_files

MANIFEST = "manifest.json"
STORE_JSON = "store.json"
COMMIT = "commit.json"
DIGESTS_FILE = "file-digests.npz"
DEFAULT_WORKDIR = Path("work")
LOCK_TIMEOUT = float(os.environ.get("VREC_LOCK_TIMEOUT", "10"))
BLOCK_ROWS = 1024  # vectors checksummed per block: a flipped bit costs one block, not the cache
KEY_DTYPE = "S32"  # hex of a 16-byte blake2b digest
_TMP_PREFIX = ".tmp-"


class EmbeddingsNotFoundError(LookupError):
    """No cached embeddings for a model; the message names the command that makes them."""


class CacheError(RuntimeError):
    """The cache cannot be used or written right now; the message (one line) says why and what to do."""


class CacheBusyError(CacheError):
    """Another process holds the cache's write lock."""


class PartialCacheError(CacheError):
    """Some catalog items have no vector yet; the message names the command that fills them."""


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
        """The file's digest, or None when it cannot be read (extraction reports why). ``path``
        may be an image URI (s3://, gs://, file://): then the memo is keyed by the object's size
        and ETag/generation/mtime (one metadata request per object on a rerun)."""
        stamp = image_files.version(path)
        if stamp is None:
            return None
        known = self.memo.get(path)
        if known is not None and (known[0], known[1]) == stamp:
            return known[2]
        try:
            value = content_digest(image_files.read_bytes(path))
        except image_files.ImageSourceError:
            return None
        self.memo[path] = (stamp[0], stamp[1], value)
        self.changed = True
        return value

    def digests(self, paths: list[str], threads: int = 16) -> list[str | None]:
        """:meth:`digest` of each path; image URIs are digested in ``threads`` threads (each
        object costs a network round trip or two, local files a stat)."""
        if not any(image_files.is_uri(p) for p in paths):
            return [self.digest(p) for p in paths]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(self.digest, paths))

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
