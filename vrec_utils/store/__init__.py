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
            catalogs/<catalog>-<id>/     per catalog (its identity: Catalog.fingerprint, the CSV and
                                         its ids): manifest.json (coverage), skipped.csv, saved
                                         FAISS indexes

Every file is written under a temporary name (``.tmp-*``, which no glob of the store matches),
fsynced and renamed when complete; ``commit.json`` is the single commit point of a
consolidation. Every load checks sizes and checksums: a damaged part is dropped with one line on
stderr, and the next ``vrec extract`` re-embeds what it held. Nothing is pickled
(``allow_pickle=False`` everywhere).

Modules, lowest first: :mod:`.files` (layout names, errors, digests, atomic checksummed
writes), :mod:`.vectors` (one store folder), :mod:`.views` (a catalog's view and the write path,
:class:`EmbeddingCache`), :mod:`.lookup` (:func:`load_embeddings`, :func:`list_caches`).
"""

from __future__ import annotations

import sys
import types

from . import files
from .files import (
    BLOCK_ROWS,
    COMMIT,
    DEFAULT_WORKDIR,
    DIGESTS_FILE,
    KEY_DTYPE,
    LOCK_TIMEOUT,
    MANIFEST,
    STORE_JSON,
    CacheBusyError,
    CacheError,
    EmbeddingsNotFoundError,
    FileDigests,
    PartialCacheError,
    content_digest,
    slugify,
    text_digest,
)
from .files import _remove, _replace, _write_bytes  # noqa: F401  (the fault-injection seams, see _StorePackage)
from .lookup import check_coverage, extract_command, list_caches, load_embeddings
from .vectors import _VERIFIED, StoreView, VectorStore, store_directory  # noqa: F401  (_VERIFIED: benchmarks clear it)
from .views import EmbeddingCache, Embeddings, catalog_dir, catalog_keys, read_skipped

__all__ = [
    "BLOCK_ROWS",
    "COMMIT",
    "DEFAULT_WORKDIR",
    "DIGESTS_FILE",
    "KEY_DTYPE",
    "LOCK_TIMEOUT",
    "MANIFEST",
    "STORE_JSON",
    "CacheBusyError",
    "CacheError",
    "EmbeddingCache",
    "Embeddings",
    "EmbeddingsNotFoundError",
    "FileDigests",
    "PartialCacheError",
    "StoreView",
    "VectorStore",
    "catalog_dir",
    "catalog_keys",
    "check_coverage",
    "content_digest",
    "extract_command",
    "list_caches",
    "load_embeddings",
    "read_skipped",
    "slugify",
    "store_directory",
    "text_digest",
]

_SEAMS = ("_write_bytes", "_replace", "_remove")  # where bytes reach or leave the disk


class _StorePackage(types.ModuleType):
    """Setting ``vrec_utils.store._write_bytes`` (``_replace``, ``_remove``) replaces it where the
    writers call it, in :mod:`.files`, so fault injection patches the public module path."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SEAMS:
            setattr(files, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _StorePackage
