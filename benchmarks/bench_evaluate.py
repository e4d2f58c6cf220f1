"""Vectorised leave-one-out evaluation vs a one-query-at-a-time loop, measured in the same run.

    python benchmarks/bench_evaluate.py                      # fashion-small, synthetic vectors, temp workdir
    python benchmarks/bench_evaluate.py --catalog ../shared/data/fashion-small --workdir DIR --models m1,m2

The vectorised side is the whole of ``evaluate_models`` (load the cached vectors, retrieve every
query, score, then bootstrap CIs and paired comparisons). The loop side retrieves and scores one
query at a time with the same kernels (one matrix-vector product, or one index search call, per
query and model). It runs on a random subset of the queries and is extrapolated to all of them;
it computes no CIs, which flatters the loop. Both sides must give the same per-query numbers on
the subset; the script checks that.

Without ``--models`` (or with ``--synthetic``) it writes structured fake vectors
(label-hierarchy centroids + colour + noise; 2048-d "synthetic-cnn" and 768-d "synthetic-vlm",
the sizes of ResNet50 and SigLIP-B) into the workdir cache (a temporary folder unless
``--workdir`` is given), for when no real embeddings have been extracted. The output says which
vectors were used.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vrec_utils.catalog import load_catalog  # noqa: E402
from vrec_utils.evaluation import DEFAULT_LABEL, evaluate_models, label_relevance, unit_rows  # noqa: E402
from vrec_utils.metrics import compute_metrics, default_metrics  # noqa: E402
from vrec_utils.store import EmbeddingCache, EmbeddingsNotFoundError, load_embeddings  # noqa: E402

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-small"
SYNTHETIC = {"synthetic-cnn": (2048, 5.5), "synthetic-vlm": (768, 3.5)}  # name: (dims, noise): nDCG@5 about 0.65 and 0.8


def write_synthetic(workdir: Path, catalog, dims: dict[str, int], seed: int = 0) -> list[str]:
    """Cache structured fake vectors for every catalog item (skipped when already complete)."""
    items = catalog.items
    levels = ["masterCategory", "subCategory", "articleType", "baseColour"]
    weights = [1.0, 0.8, 0.7, 0.4]
    names = []
    for n, (name, (dim, noise)) in enumerate(SYNTHETIC.items()):
        dim = dims.get(name, dim)
        cache = EmbeddingCache.open(workdir, catalog, {"model": name, "dim": dim, "synthetic": True, "noise": noise, "seed": seed}, precision="fp32", normalized=True)
        names.append(name)
        if cache.manifest.get("complete") and cache.manifest.get("count") == len(catalog):
            continue
        rng = np.random.default_rng([seed, n])
        vectors = np.zeros((len(items), dim))
        for column, weight in zip(levels, weights):
            codes = pd.factorize(items[column])[0]
            vectors += weight * rng.normal(size=(codes.max() + 1, dim))[codes] / np.sqrt(dim)
        vectors += noise * rng.normal(size=vectors.shape) / np.sqrt(dim)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        cache.append(catalog.ids, vectors.astype(np.float32))
        cache.consolidate(complete=True, extra={"synthetic": True})
    return names


def loop_evaluate(catalog, workdir, models, query_ids, candidate_ids, label, ks, backend):
    """One query at a time: ({model: {metric: values}}, wall seconds, CPU seconds) over ``query_ids``."""
    metrics = [str(m) for m in default_metrics(ks)]
    depth = max(ks)
    cand = pd.Index(candidate_ids)
    relevance = label_relevance(catalog.items.loc[cand], [label])
    out, seconds, cpu = {}, 0.0, 0.0
    for model in models:
        vectors = unit_rows(load_embeddings(workdir, catalog, model).vectors_for(cand), model, cand.to_numpy(dtype=str))
        index = None
        if backend != "matrix":
            from vrec_utils.index import create_index

            index = create_index(backend, model=model, dim=vectors.shape[1])
            index.add(cand.to_numpy(dtype=str), vectors)
        rows = {m: [] for m in metrics}
        start, cpu_start = time.perf_counter(), time.process_time()
        for query_id in query_ids:
            q = cand.get_loc(query_id)
            if index is None:
                sims = vectors @ vectors[q]
                sims[q] = -np.inf
                top = np.argpartition(-sims, depth)[:depth]
                top = top[np.lexsort((top, -sims[top]))]
            else:
                found = index.search(vectors[q], depth, exclude_ids=[query_id]).ids[0]
                top = cand.get_indexer(found)
            qpos = np.array([q])
            rel = relevance.grades(qpos, top[None, :])
            values = compute_metrics(rel, metrics, ideal=relevance.ideal(qpos, depth), n_relevant=relevance.n_relevant(qpos))
            for m in metrics:
                rows[m].append(values[m][0])
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        out[model] = {m: np.asarray(v) for m, v in rows.items()}
    return out, seconds, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--workdir", type=Path, default=None, help="embedding cache (default: ./work with --models, else a temp folder)")
    parser.add_argument("--models", default=None, help="comma-separated cached models (default: the synthetic pair)")
    parser.add_argument("--synthetic", action="store_true", help="write and use synthetic structured vectors (the default without --models)")
    parser.add_argument("--synthetic-dims", default="2048,768", help="dims of synthetic-cnn,synthetic-vlm")
    parser.add_argument("--label", default=DEFAULT_LABEL)
    parser.add_argument("--loop-queries", type=int, default=300, help="queries the loop runs (then extrapolated)")
    parser.add_argument("--backend", default="matrix", help="matrix or an index backend (faiss), for both sides")
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    catalog = load_catalog(args.catalog)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else []
    synthetic = args.synthetic or not models
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        if args.workdir is None:
            args.workdir = Path(tmp) if synthetic else Path("work")
        if synthetic:
            dims = dict(zip(SYNTHETIC, (int(d) for d in args.synthetic_dims.split(","))))
            models = models or write_synthetic(args.workdir, catalog, dims)
        return run(args, catalog, models)


def run(args: argparse.Namespace, catalog, models: list[str]) -> int:
    try:
        for model in models:
            load_embeddings(args.workdir, catalog, model)
    except EmbeddingsNotFoundError as exc:
        print(f"{exc}\n(or run with --synthetic to benchmark on synthetic vectors)", file=sys.stderr)
        return 2

    ks = [5, 10]
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = evaluate_models(catalog, args.workdir, models, label=args.label, ks=ks, backend=args.backend,
                             n_bootstrap=args.n_bootstrap, seed=args.seed)  # fmt: skip
    t1 = time.perf_counter()
    summary = result.summary()
    comparisons = result.comparisons()
    t2 = time.perf_counter()
    vectorised, vectorised_cpu = t2 - t0, time.process_time() - cpu0

    rng = np.random.default_rng(args.seed)
    n_loop = min(args.loop_queries, result.n_queries)
    picked = np.sort(rng.choice(result.n_queries, n_loop, replace=False))
    loop_values, loop_seconds, loop_cpu = loop_evaluate(
        catalog, args.workdir, models, result.query_ids[picked], result.candidate_ids, args.label, ks, args.backend
    )
    # Both sides rank by float32 similarities computed in different orders (matrix-vector vs
    # blocked matrix-matrix products): items whose scores differ by ~1e-7 may swap. Count the
    # queries whose numbers differ at all; more than a few percent would be a bug.
    differs = np.zeros(n_loop, dtype=bool)
    for model in models:
        for metric, values in loop_values[model].items():
            differs |= ~np.isclose(values, result.values[(model, "unfiltered")][metric][picked], rtol=0, atol=1e-12)
    if differs.mean() > 0.02:
        raise AssertionError(f"loop and vectorised disagree on {differs.sum()} of {n_loop} queries")
    loop_total = loop_seconds / n_loop * result.n_queries
    loop_total_cpu = loop_cpu / n_loop * result.n_queries

    kinds = {m: ("synthetic" if load_embeddings(args.workdir, catalog, m).manifest.get("synthetic") else "real") for m in models}
    print(f"catalog {catalog.name}: {len(catalog)} items, {result.report['candidates']} candidates, {result.n_queries} queries "
          f"(leave-one-out, relevance: same {args.label})")  # fmt: skip
    print("models: " + ", ".join(f"{m} ({result.dims[(m, 'unfiltered')]}-d, {kinds[m]} vectors)" for m in models))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; backend {args.backend}")
    print(f"vectorised, all queries x {len(models)} models: {vectorised:.2f} s "
          f"(load + retrieve + score {t1 - t0:.2f} s; {args.n_bootstrap}-resample BCa CIs + paired tests {t2 - t1:.2f} s)")  # fmt: skip
    print(f"one query at a time: {loop_seconds / n_loop / len(models) * 1000:.2f} ms per query and model, measured on "
          f"{n_loop} queries; extrapolated to all {result.n_queries} queries x {len(models)} models: {loop_total:.1f} s (no CIs)")  # fmt: skip
    print(f"speed-up: {loop_total / vectorised:.0f}x wall clock, {loop_total_cpu / vectorised_cpu:.0f}x CPU time "
          f"(vectorised {vectorised_cpu:.1f} CPU-s, loop {loop_total_cpu:.1f} CPU-s extrapolated); "
          f"per-query values identical on {n_loop - differs.sum()} of the {n_loop} loop queries"
          + (" (the others: float32 near-ties ranked in another order)" if differs.any() else ""))  # fmt: skip
    ndcg = summary[(summary["metric"] == "ndcg@5")]
    for row in ndcg.itertuples():
        print(f"  {row.model:>16} {row.setting}: ndcg@5 {row.mean:.4f} [{row.ci_low:.4f}, {row.ci_high:.4f}]")
    if len(comparisons):
        c = comparisons[comparisons["metric"] == "ndcg@5"].iloc[0]
        print(f"  {c.model_b} vs {c.model_a}: {c['diff']:+.4f} [{c.diff_ci_low:+.4f}, {c.diff_ci_high:+.4f}], "
              f"{c.rel_improvement_pct:+.1f}% relative, p = {c.p_value:.4g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
