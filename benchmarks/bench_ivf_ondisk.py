"""An IVF index bigger than the real catalog, built in shards, merged on disk and searched
memory-mapped: build time, resident memory while searching, recall@10 against exact search.

The vectors are perturbed copies of real efficientnet-lite0 embeddings of fashion-small
(fp32, PCA to 256-d, unit length): copy j of item i is ``normalize(pca(x_i) + sigma * noise_ij)``,
made shard by shard from a per-shard seed, so no step holds all N vectors at once. The search runs
in a fresh process (``--search-only``) so its resident memory is the index's, not the builder's.
Recall@10 is measured on 1,000 sampled indexed vectors as queries, against an exact
inner-product search over every shard (saved in WORKDIR and read back by later runs), for the
default search (candidates re-ranked by exact inner product from the vectors kept on disk) and for
the codes alone. ``--reuse`` searches an index an earlier run built in WORKDIR.

    .venv/bin/python benchmarks/bench_ivf_ondisk.py --n 1000000
    .venv/bin/python benchmarks/bench_ivf_ondisk.py --n 10000000 --memory-budget-gb 4   # the 10M target
    .venv/bin/python benchmarks/bench_ivf_ondisk.py --n 10000000 --reuse              # search it again
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from _machine import REAL_MODEL, cpu_line
from sklearn.decomposition import PCA

from vrec_utils.catalog import load_catalog
from vrec_utils.extract import extract_image_embeddings
from vrec_utils.index.ivf_ondisk import (
    REFINE_FACTOR,
    OnDiskIvfIndex,
    build,
    plan_ivf,
    recall_at_k,
)

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-small"
SHARD = 100_000
K = 10


def base_vectors(catalog_path: Path, workdir: Path, n_items: int, dim: int) -> np.ndarray:
    from vrec_utils.models import create_embedder

    catalog = load_catalog(catalog_path).head(n_items)
    result = extract_image_embeddings(catalog, create_embedder(REAL_MODEL, device="cpu"), workdir, precision="fp32", progress=False)
    print(f"real embeddings: {result.summary()}")
    vectors = np.asarray(result.embeddings.vectors, dtype=np.float32)
    reduced = PCA(n_components=dim, random_state=0).fit_transform(vectors).astype(np.float32)
    return reduced / np.linalg.norm(reduced, axis=1, keepdims=True)


def shard(base: np.ndarray, number: int, size: int, sigma: float) -> np.ndarray:
    """Rows ``number*size ...`` of the synthetic set, the same every time they are asked for."""
    rng = np.random.default_rng(1000 + number)
    rows = np.arange(number * size, (number + 1) * size) % len(base)
    x = base[rows] + sigma * rng.standard_normal((size, base.shape[1]), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top_k(base, n_shards, size, sigma, queries, k):
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for s in range(n_shards):
        flat = faiss.IndexFlatIP(base.shape[1])
        flat.add(shard(base, s, size, sigma))
        scores, labels = flat.search(queries, k)
        heap.add_result(scores, np.where(labels >= 0, labels + s * size, -1))
    heap.finalize()
    return heap.I


def reuse_build(index_dir: Path, base: np.ndarray, n_shards: int, size: int, sigma: float) -> None:
    """An index built by an earlier run: its recorded build time, and the re-ranking vectors
    written now if that build predates them (the same seeded shards, so the same rows)."""
    config = json.loads((index_dir / "ondisk.json").read_text())
    print(f"build reused from {index_dir}: {config.get('build_seconds', float('nan')):.1f} s when it was built; "
          f"lists file {(index_dir / 'lists.ivfdata').stat().st_size / 2**30:.2f} GiB")
    if not config.get("refine"):
        start = time.perf_counter()
        with open(index_dir / "vectors.f32", "wb") as out:
            out.writelines(shard(base, s, size, sigma).tobytes() for s in range(n_shards))
        config["refine"] = {"file": "vectors.f32", "dtype": "float32", "factor": REFINE_FACTOR}
        (index_dir / "ondisk.json").write_text(json.dumps(config, indent=2))
        print(f"re-ranking vectors written to the reused build: {time.perf_counter() - start:.1f} s")


def search_only(directory: str, queries_path: str, nprobes: list[int]) -> None:
    """Child process: open the index memory-mapped, search, report resident memory (JSON)."""
    queries = np.load(queries_path)
    before = _rss_mb()
    index = OnDiskIvfIndex.open(directory)
    out = {"default_nprobe": index.nprobe, "default_refine": index.refine_factor, "runs": []}
    factors = [index.refine_factor, 1] if index.vectors is not None else [1]
    for factor in factors:
        for nprobe in [index.nprobe, *nprobes]:
            start = time.perf_counter()
            _, labels = index.search_labels(queries, K, nprobe=nprobe, refine_factor=factor)
            seconds = time.perf_counter() - start
            np.save(f"{queries_path}.nprobe{nprobe}.x{factor}.npy", labels)
            out["runs"].append({"nprobe": nprobe, "refine": factor, "seconds": seconds})
    out["rss_before_open_mb"] = before
    out["rss_after_search_mb"] = _rss_mb()
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over execve, so the child would
    # report the builder's (its parent's) peak at fork time instead of its own
    out["max_rss_mb"] = _rss_mb("VmHWM")
    print(json.dumps(out))


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vrec-bench-ivf"))
    parser.add_argument("--cache", type=Path, default=None, help="embedding cache workdir (default: WORKDIR/cache)")
    parser.add_argument("--items", type=int, default=2000, help="real images embedded as the base")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--sigma", type=float, default=0.03, help="noise per dimension of each copy")
    parser.add_argument("--memory-budget-gb", type=float, default=4.0)
    parser.add_argument("--train-size", type=int, default=None, help="training vectors (default: 40 per list, >= 100,000)")
    parser.add_argument("--reuse", action="store_true", help="search an index already built in WORKDIR with the same n (adding the re-ranking vectors if it has none)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ray", action="store_true", help="fill shards in Ray tasks (a local cluster)")
    parser.add_argument("--search-only", nargs=3, metavar=("DIR", "QUERIES", "NPROBES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.search_only:
        directory, queries, nprobes = args.search_only
        search_only(directory, queries, [int(v) for v in nprobes.split(",") if v])
        return

    print(cpu_line())
    print("note: the machine's 2 cores are shared with other jobs: timings are upper bounds")
    base = base_vectors(args.catalog, args.cache or args.workdir / "cache", args.items, args.dim)
    n_shards = -(-args.n // SHARD)
    size = args.n // n_shards
    n = size * n_shards
    plan = plan_ivf(n, args.dim, int(args.memory_budget_gb * 2**30))
    print(f"{n:,} vectors ({n_shards} shards of {size:,}), {args.dim}-d; plan {plan.factory}, nprobe {plan.nprobe}, "
          f"lists {plan.index_bytes(n) / 2**30:.2f} GiB (budget {args.memory_budget_gb} GiB)")
    index_dir = args.workdir / f"ivf-{n}"
    if args.reuse and (index_dir / "ondisk.json").is_file() and json.loads((index_dir / "ondisk.json").read_text())["count"] == n:
        reuse_build(index_dir, base, n_shards, size, args.sigma)
    else:
        train_size = args.train_size or max(100_000, 40 * plan.nlist)
        per_shard = -(-train_size // n_shards)  # spread over every shard, not the first one only
        sample = np.concatenate([shard(base, s, size, args.sigma)[:: max(1, size // per_shard)][:per_shard] for s in range(n_shards)])[:train_size]
        print(f"training sample: {len(sample):,} vectors ({len(sample) / plan.nlist:.0f} per list)")
        if args.ray:
            import os

            import ray  # optional extra: only this mode needs it

            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(include_dashboard=False, object_store_memory=400 * 1024**2, log_to_driver=False)
        start = time.perf_counter()
        built = build(plan, ((None, shard(base, s, size, args.sigma)) for s in range(n_shards)), index_dir, sample=sample,
                      parallel="ray" if args.ray else "threads", workers=2)
        build_s = time.perf_counter() - start
        print(f"build (train + fill + merge): {build_s:.1f} s; lists file {(index_dir / 'lists.ivfdata').stat().st_size / 2**30:.2f} GiB, "
              f"re-ranking vectors {(index_dir / 'vectors.f32').stat().st_size / 2**30:.2f} GiB (on disk)")
        del built

    rng = np.random.default_rng(0)
    picked = np.sort(rng.choice(n, size=args.queries, replace=False))
    queries = np.concatenate([shard(base, s, size, args.sigma)[picked[picked // size == s] - s * size] for s in range(n_shards)])
    queries_path = args.workdir / "queries.npy"
    np.save(queries_path, queries)
    exact_path = args.workdir / f"exact-{n}-{args.sigma}-{args.queries}-top{K}.npy"
    if exact_path.is_file():
        exact = np.load(exact_path)
        print(f"exact top-{K} of the {args.queries} queries read from {exact_path}")
    else:
        start = time.perf_counter()
        exact = exact_top_k(base, n_shards, size, args.sigma, queries, K)
        print(f"exact search of {args.queries} queries: {time.perf_counter() - start:.1f} s")
        np.save(exact_path, exact)
    child = subprocess.run([sys.executable, __file__, "--search-only", str(index_dir), str(queries_path), "16,64"],
                           capture_output=True, text=True, check=True)
    report = json.loads(child.stdout.strip().splitlines()[-1])
    for run in report["runs"]:
        labels = np.load(f"{queries_path}.nprobe{run['nprobe']}.x{run['refine']}.npy")
        tag = " (default)" if run["nprobe"] == report["default_nprobe"] and run["refine"] == report["default_refine"] else ""
        how = f"re-ranked x{run['refine']} exact" if run["refine"] > 1 else "codes only"
        print(f"nprobe {run['nprobe']:>4}, {how:>20}{tag}: recall@{K} {recall_at_k(labels, exact):.4f}, "
              f"{args.queries / run['seconds']:.0f} queries/s")
    print(f"search process resident memory: {report['rss_before_open_mb']:.0f} MB after imports (python, torch, faiss), "
          f"{report['rss_after_search_mb']:.0f} MB after all searches (+{report['rss_after_search_mb'] - report['rss_before_open_mb']:.0f} MB: "
          f"the index, its ids and the list pages touched); peak {report['max_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
