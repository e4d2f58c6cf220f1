"""Elasticsearch ingestion from shards: parallel bulk writers with back-pressure and a per-shard
failure report.

Each shard (ids, vectors, optional metadata) goes to :meth:`ElasticsearchIndex.index_documents`
(the index's own bulk path: 429 answers retried with backoff, failures reported, not raised) on
one of ``writers`` threads. At most ``max_in_flight`` shards are read ahead of the writers: the
producer blocks until a writer finishes, so a slow cluster slows the reading instead of filling
memory. The cluster is the user's; nothing here changes its settings.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd

from .elasticsearch import BulkReport, ElasticsearchIndex

Shard = tuple[Sequence[str], np.ndarray, pd.DataFrame | None]


def ingest_shards(index: ElasticsearchIndex, shards: Iterable[Shard], *, writers: int = 4, max_in_flight: int | None = None) -> pd.DataFrame:
    """Index every shard; one row per shard: ``shard, documents, indexed, failed, errors``
    (the first three failures as ``id: status error``). A shard whose request fails as a whole
    (e.g. the cluster went away) is reported with all its documents failed; the others go on."""
    if writers < 1:
        raise ValueError(f"writers must be >= 1, got {writers}")
    slots = threading.BoundedSemaphore(max_in_flight or 2 * writers)
    futures: list[tuple[int, int, Future]] = []
    with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="es-ingest") as pool:
        for number, shard in enumerate(shards):
            ids, vectors, metadata = shard if len(shard) == 3 else (*shard, None)
            slots.acquire()  # back-pressure: wait for a writer before reading further
            future = pool.submit(index.index_documents, ids, vectors, metadata)
            future.add_done_callback(lambda _: slots.release())
            futures.append((number, len(ids), future))
    return pd.DataFrame([_row(number, size, future) for number, size, future in futures],
                        columns=["shard", "documents", "indexed", "failed", "errors"])


def _row(number: int, size: int, future: Future) -> dict:
    error = future.exception()
    if error is not None:
        return {"shard": number, "documents": size, "indexed": 0, "failed": size, "errors": f"{type(error).__name__}: {error}"[:300]}
    report: BulkReport = future.result()
    errors = "; ".join(f"{f.id}: {f.status} {f.error}" for f in report.failed[:3])
    return {"shard": number, "documents": size, "indexed": report.n_ok, "failed": len(report.failed), "errors": errors}


__all__ = ["ingest_shards"]
