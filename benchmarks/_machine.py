"""What the benchmarks share: the CPU line each prints first (the project's machines change
between a Xeon with AMX-BF16 and an AMD EPYC with AVX512-BF16), and the real efficientnet-lite0
embeddings of a catalog that the index, Elasticsearch and determinism benchmarks search."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

REAL_MODEL = "efficientnet-lite0"

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_line() -> str:
    """``<model name>, N CPUs; flags: ...`` from /proc/cpuinfo (platform's name elsewhere)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = " ".join(f for f in FLAGS if f in flags) or "none of " + "/".join(FLAGS)
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; flags: {shown}"


def real_embeddings(catalog_path: Path, workdir: Path, n: int | None = None, *, progress: bool = True):
    """(catalog, ids, vectors, articleType labels) for the first ``n`` items (all by default):
    efficientnet-lite0 embeddings, computed once and then read from the ``workdir`` cache."""
    from vrec_utils.catalog import load_catalog
    from vrec_utils.extract import extract_image_embeddings
    from vrec_utils.models import create_embedder

    catalog = load_catalog(catalog_path)
    catalog = catalog if n is None else catalog.head(n)
    result = extract_image_embeddings(catalog, create_embedder(REAL_MODEL, device="cpu"), workdir, progress=progress)
    print(f"embeddings: {result.summary()}")
    ids = np.asarray(result.embeddings.ids, dtype=str)
    vectors = np.ascontiguousarray(result.embeddings.vectors, dtype=np.float32)
    return catalog, ids, vectors, catalog.items.loc[ids, ["articleType"]]
