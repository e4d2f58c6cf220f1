"""Same cache, same neighbours: exact search on any path, in any thread count, gives one answer.

    python benchmarks/bench_determinism.py [--catalog ../shared/data/fashion-small] [--workdir work] [-k 10]

On efficientnet-lite0 embeddings of every catalog image (computed once, then read from the
--workdir cache), all items are searched against themselves (the query excluded) through vrec's
FAISS index with ``exact_method`` fp32 and bf16-rescored, each with 1 and 2 threads, and
evaluated (nDCG@5 against articleType, leave-one-out) through the similarity-matrix path and the
FAISS backend. Every neighbour list and every nDCG digit must agree (vrec_utils/index/exact.py,
``canonical_top_k``: float64 scores rounded to float32, equal scores by lower row).

Also printed: what the tie rule costs, the exact search with it against the kernel alone
(``faiss.knn`` for the same k, no tie rule), in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _machine import REAL_MODEL as MODEL  # noqa: E402
from _machine import cpu_line, real_embeddings  # noqa: E402
from vrec_utils.index import create_index  # noqa: E402
from vrec_utils.index.exact import cpu_has_fast_bf16, exact_knn  # noqa: E402
from vrec_utils.index.faiss_index import omp_threads  # noqa: E402



def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=REPO.parent / "shared" / "data" / "fashion-small")
    parser.add_argument("--workdir", type=Path, default=REPO / "work", help="embedding cache (reused between runs)")
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args(argv)

    from vrec_utils.evaluation import evaluate_models

    print(f"machine: {cpu_line()}; AMX-BF16 used by 'auto': {cpu_has_fast_bf16()}")
    catalog, ids, vectors, _ = real_embeddings(args.catalog, args.workdir)

    lists = {}
    for method in ("fp32", "bf16-rescored"):
        for threads in (1, 2):
            index = create_index("faiss", model=MODEL, dim=vectors.shape[1], exact_method=method, threads=threads)
            index.add(ids, vectors)
            start = time.perf_counter()
            lists[(method, threads)] = index.search(vectors, args.k, exclude_ids=list(ids)).ids
            print(f"  search {method:>13}, {threads} thread(s): {time.perf_counter() - start:6.2f} s")
    reference = lists[("fp32", 1)]
    print(f"\nneighbour lists, {len(ids):,} queries x k={args.k}, against fp32 with 1 thread:")
    same_everywhere = True
    for key, found in lists.items():
        differing = int((found != reference).any(axis=1).sum())
        same_everywhere &= differing == 0
        print(f"  {key[0]:>13}, {key[1]} thread(s): {differing} queries differ")

    ndcg = {}
    for backend, options in (("matrix", {}), ("faiss", {"exact_method": "fp32"}), ("faiss", {"exact_method": "bf16-rescored"})):
        evaluation = evaluate_models(
            catalog, args.workdir, [MODEL], label="articleType", ks=[5], backend=backend, index_options=options,
            n_bootstrap=200, n_permutations=200,
        )
        summary = evaluation.summary()
        value = float(summary.loc[summary["metric"] == "ndcg@5", "mean"].iloc[0])
        ndcg[(backend, options.get("exact_method", ""))] = value
        print(f"  nDCG@5 via {backend:>6} {options.get('exact_method', ''):>13}: {value!r}")
    same_ndcg = len(set(ndcg.values())) == 1

    # the tie rule's cost: exact_knn (kernel for k + margin, float64 rescoring, lexsort) vs the kernel for k
    with omp_threads(None):
        for method in ("fp32", "bf16-rescored"):
            with_rule = best_of(lambda: exact_knn(vectors, vectors, args.k + 1, method=method))
            if method == "fp32":
                bare = best_of(lambda: faiss.knn(vectors, vectors, args.k + 1, metric=faiss.METRIC_INNER_PRODUCT))
                print(f"\ntie rule cost, all {len(ids):,} x {len(ids):,}: faiss.knn {bare:.2f} s, exact_knn fp32 {with_rule:.2f} s "
                      f"({with_rule / bare:.2f}x the kernel alone)")
            else:
                print(f"exact_knn bf16-rescored {with_rule:.2f} s")
    print(f"\nidentical neighbour lists on every path and thread count: {same_everywhere}; identical nDCG@5: {same_ndcg}")
    return 0 if same_everywhere and same_ndcg else 1


if __name__ == "__main__":
    sys.exit(main())
