"""Elasticsearch backend on real embeddings: recall vs num_candidates, indexing throughput, latency.

    python benchmarks/bench_es.py [--catalog ../shared/data/fashion-small] [--n 3000] [--queries 500]

Uses VREC_ES_URL when set, else starts a throwaway node with scripts/es-test-node.sh (and stops
it at the end). On efficientnet-lite0 embeddings of the first --n fashion-small items (cached in
--workdir), every ES setting is compared with FAISS exact search measured in the same run:

* ``flat`` (exact) index options: share of queries whose top-k equals FAISS exact (ties aside)
  and the largest score difference;
* ``hnsw`` (float) and ``int8_hnsw``: indexing throughput (docs/s, bulk + refresh), recall@k
  against exact for several num_candidates, batched query throughput (msearch of 64) and
  one-query latency (p50/p95), with the ratio to FAISS exact;
* category-filtered kNN (same articleType, not the query): share of queries that get k items of
  their category whenever k exist.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _machine import REAL_MODEL, cpu_line, real_embeddings  # noqa: E402
from vrec_utils.index import create_index  # noqa: E402
from vrec_utils.index.elasticsearch import ElasticsearchIndex, connect, default_num_candidates, load_es_config  # noqa: E402

MODEL = REAL_MODEL
SCRIPT = REPO / "scripts" / "es-test-node.sh"




def start_node() -> tuple[str, bool]:
    """(url, started here)."""
    if os.environ.get("VREC_ES_URL"):
        return os.environ["VREC_ES_URL"], False
    started = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"cannot start Elasticsearch: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    print(f"node: started with {SCRIPT.name} in {time.perf_counter() - started:.1f}s")
    return proc.stdout.strip().splitlines()[-1], True


def recall(got, want) -> float:
    return sum(len(set(g[g != ""]) & set(w[w != ""])) for g, w in zip(got.ids, want.ids)) / max(1, int((want.ids != "").sum()))


def same_up_to_ties(got_ids, got_scores, want_ids, want_scores, tol=1e-6) -> bool:
    if not np.allclose(got_scores, want_scores, atol=1e-5):
        return False
    start, k = 0, len(want_ids)
    while start < k:
        end = start + 1
        while end < k and abs(want_scores[end] - want_scores[start]) <= tol:
            end += 1
        if end < k and set(got_ids[start:end]) != set(want_ids[start:end]):
            return False
        start = end
    return True


def best_of(fn, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=REPO.parent / "shared" / "data" / "fashion-small")
    parser.add_argument("--workdir", type=Path, default=REPO / "work", help="embedding cache (reused between runs)")
    parser.add_argument("--n", type=int, default=3000, help="catalog items indexed")
    parser.add_argument("--queries", type=int, default=500, help="queries (catalog items, themselves excluded)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--num-candidates", default="10,20,50,100,200,500")
    args = parser.parse_args(argv)
    k = args.k
    candidates = [int(c) for c in args.num_candidates.split(",")]

    print(f"machine: {cpu_line()}")
    url, started = start_node()
    config = load_es_config(url=url, request_timeout=120)
    client = connect(config)
    try:
        version = client.nodes.info(node_id="_local", filter_path="nodes.*.version")["nodes"]
        print(f"Elasticsearch {next(iter(version.values()))['version']} at {config.url}")
    except Exception:  # noqa: BLE001 - the version is informative only
        print(f"Elasticsearch at {config.url}")
    names: list[str] = []
    try:
        t = time.perf_counter()
        catalog, ids, vectors, metadata = real_embeddings(args.catalog, args.workdir, args.n, progress=False)
        print(f"data: {len(ids)} fashion-small items, {vectors.shape[1]}-d {MODEL} ({time.perf_counter() - t:.0f}s incl. extraction)")
        rng = np.random.default_rng(0)
        q_rows = np.sort(rng.choice(len(ids), size=min(args.queries, len(ids)), replace=False))
        queries, qids = vectors[q_rows], list(ids[q_rows])
        labels = metadata["articleType"]
        filters = [{"articleType": labels[q]} for q in qids]

        faiss_index = create_index("faiss", model=MODEL, dim=vectors.shape[1], filter_columns=["articleType"])
        faiss_index.add(ids, vectors, metadata)
        faiss_s, exact = best_of(lambda: faiss_index.search(queries, k, exclude_ids=qids))
        exact_filtered = faiss_index.search(queries, k, filters=filters, exclude_ids=qids)
        print(f"FAISS exact (baseline): {len(qids) / faiss_s:,.0f} queries/s ({faiss_s / len(qids) * 1e3:.3f} ms/query, batched)")
        print()
        print("| index_options | index docs/s | num_candidates | recall@%d | queries/s (msearch of 64) | x FAISS exact | p50 / p95 ms, one query |" % k)
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for index_type in ("flat", "hnsw", "int8_hnsw"):
            name = f"vrec-bench-{uuid.uuid4().hex[:8]}"
            names.append(name)
            index = ElasticsearchIndex(MODEL, vectors.shape[1], ["articleType"], config=config, index_name=name, index_type=index_type)
            t = time.perf_counter()
            index.add(ids, vectors, metadata)
            docs_per_s = len(ids) / (time.perf_counter() - t)
            client.options(request_timeout=600).indices.forcemerge(index=name, max_num_segments=1)  # a steady state to query
            index.search(queries[:64], k)  # warm up
            settings = [None] if index_type == "flat" else [*candidates, None]
            for nc in settings:
                options = {} if nc is None else {"num_candidates": nc}
                if nc is not None and nc < k:
                    continue
                seconds, got = best_of(lambda: index.search(queries, k, exclude_ids=qids, **options))
                single = []
                for row in range(min(100, len(qids))):
                    t = time.perf_counter()
                    index.search(queries[row], k, exclude_ids=[qids[row]], **options)
                    single.append(time.perf_counter() - t)
                shown = f"{default_num_candidates(k)} (default)" if nc is None else str(nc)
                if index_type == "flat":
                    same = np.mean([same_up_to_ties(got.ids[r], got.scores[r], exact.ids[r], exact.scores[r]) for r in range(len(qids))])
                    diff = float(np.max(np.abs(got.scores - exact.scores)))
                    shown = f"exact: {same:.1%} lists = FAISS, max score diff {diff:.1e}"
                print(f"| {index_type} | {docs_per_s:,.0f} | {shown} | {recall(got, exact):.4f} | {len(qids) / seconds:,.0f} | "
                      f"{faiss_s / seconds:.3f} | {np.percentile(single, 50) * 1e3:.1f} / {np.percentile(single, 95) * 1e3:.1f} |")
            if index_type == "hnsw":
                got = index.search(queries, k, filters=filters, exclude_ids=qids)
                full = [int((got.ids[r] != "").sum()) == min(k, int((labels == labels[q]).sum()) - 1)
                        and all(labels[i] == labels[q] for i in got.ids[r] if i) for r, q in enumerate(qids)]
                hnsw_filtered = (float(np.mean(full)), recall(got, exact_filtered))
        print()
        print(f"hnsw, category-filtered kNN (same articleType, not itself), default num_candidates: "
              f"{hnsw_filtered[0]:.1%} of queries get min(k, category size - 1) items all of their category; "
              f"recall@{k} vs filtered exact {hnsw_filtered[1]:.4f}")
    finally:
        for name in names:
            client.indices.delete(index=name, ignore_unavailable=True)
        if started:
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
