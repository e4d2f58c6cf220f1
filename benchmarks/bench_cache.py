"""Cost of the content-addressed cache on a warm rerun, against the time to load the vectors.

    python benchmarks/bench_cache.py                       # fashion-small, 12,000 items, temp workdir
    python benchmarks/bench_cache.py --catalog DIR --workdir DIR --repeats 5

Every item's vector is already cached (written once, untimed: random 1280-d vectors, the shape
of efficientnet-lite0's, filed under the real images' content digests; the model never runs, so
a warm rerun is pure cache work). Timed, each the median of ``--repeats`` runs:

* baseline: ``np.load`` of the consolidated vectors file into memory (what any cache must do);
* key: the content digests of all catalog images from the size + mtime_ns memo (stat only);
* verify: reading and checking the store (sizes, blake2b of keys and of every vector block);
* load_embeddings: the catalog's Embeddings as recommend/index/evaluate get them;
* warm extract: ``extract_image_embeddings`` finding everything cached (lock, keys, verify,
  no consolidation);
* cold key: hashing every image file (no memo), what the memo saves on a rerun.

It prints each time, the ratio of each to the baseline, and the CPU model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import cpu_line  # noqa: E402
from vrec_utils import store  # noqa: E402
from vrec_utils.catalog import load_catalog  # noqa: E402
from vrec_utils.extract import extract_image_embeddings  # noqa: E402
from vrec_utils.models.base import Embedder  # noqa: E402

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-small"
DIM = 1280


class CachedOnly(Embedder):
    """efficientnet-lite0's shape; a warm rerun must never call it."""

    name = "bench-cached-1280"
    dim = DIM

    def __init__(self) -> None:
        super().__init__()
        self.image_transform = None

    def weights_id(self) -> str:
        return "random:0"

    def modules(self):
        return []

    def encode_image(self, pixels):
        raise AssertionError("a warm rerun embedded an image")




def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        store._VERIFIED.clear()  # every run verifies again, as a new process would
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.workdir is not None:
        run(args, args.workdir)  # kept: a rerun on it measures the warm paths from the start
        return
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as workdir:
        run(args, Path(workdir))


def run(args: argparse.Namespace, workdir: Path) -> None:
    catalog = load_catalog(args.catalog)
    embedder = CachedOnly()

    started = time.perf_counter()
    cold_key = time.perf_counter()
    with store.EmbeddingCache.open(workdir, catalog, embedder.identity(), precision="fp32", normalized=True) as cache:
        cold_key = time.perf_counter() - cold_key  # includes hashing every file: no memo yet
        done = cache.done_ids()
        todo = [i for i in catalog.ids if i not in done and cache.keys[i]]
        if todo:
            vectors = np.random.default_rng(0).normal(size=(len(todo), DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            for begin in range(0, len(todo), 2048):
                cache.append(todo[begin : begin + 2048], vectors[begin : begin + 2048])
        cache.consolidate()
    print(f"setup: {len(catalog)} items, {len(todo)} vectors written in {time.perf_counter() - started:.1f}s -> {workdir}")
    store_dir = cache.store.directory
    vectors_file = next(store_dir.glob("vectors-*.npy"))
    memo = workdir / "embeddings" / store.DIGESTS_FILE

    def cold() -> None:
        memo.unlink(missing_ok=True)
        store.catalog_keys(workdir, catalog)

    results = {
        "baseline: np.load(vectors)": timed(lambda: np.load(vectors_file, allow_pickle=False), args.repeats),
        "key: digests from memo": timed(lambda: store.catalog_keys(workdir, catalog), args.repeats),
        "verify: checksums": timed(lambda: store.VectorStore(store_dir).view(), args.repeats),
        "load_embeddings": timed(lambda: store.load_embeddings(workdir, catalog, embedder.name), args.repeats),
        "warm extract (all cached)": timed(lambda: extract_image_embeddings(catalog, embedder, workdir, precision="fp32", progress=False), max(1, args.repeats // 2)),
        "cold key: hash every file": timed(cold, max(1, args.repeats // 2)),
    }
    result = extract_image_embeddings(catalog, embedder, workdir, precision="fp32", progress=False)
    assert result.n_new == 0, result.summary()
    base = results["baseline: np.load(vectors)"]
    size_mb = vectors_file.stat().st_size / 1e6
    print(f"CPU: {cpu_line()}; {len(catalog)} items, {size_mb:.1f} MB of vectors; median of {args.repeats} runs")
    for name, seconds in results.items():
        print(f"  {name:<28} {seconds * 1000:8.1f} ms  {seconds / base:6.2f}x baseline")
    print(f"warm rerun summary: {result.summary()}")
    print(f"ratio (warm extract / load vectors): {results['warm extract (all cached)'] / base:.2f}")


if __name__ == "__main__":
    main()
