"""Fine-tuning benchmark: offline mini-SigLIP vs its base CNN (efficientnet-lite0) on fashion-small.

Trains the mini-SigLIP heads with the sigmoid loss on the train split's (image, title) pairs
(~9,000 items, 10 % of them for validation), then reports on the held-out evaluation split:

* wall-clock time of the frozen-tower features (one-off, cached) and of the head training;
* nDCG@5 (articleType) of efficientnet-lite0 vs the tuned model, paired 95% bootstrap CI;
* the real photo shift (the reported half of ../shared/data/clothing-dev, split by sender), the
  category-shift check (a model trained without Accessories + Personal Care, evaluated on them)
  and the *synthetic* photo-shift check (evaluation photos re-shot), with the synthetic check's
  distance from the real-photo result;
* the output mix alpha (chosen on validation) and an alpha sweep on the evaluation split;
* text-to-image queries ("black watch", ...) among the evaluation items, and precision@5 of
  article-type names used as queries.

Usage::

    .venv/bin/python benchmarks/bench_finetune.py [--catalog DIR] [--workdir work] [--json out.json]

A second run reuses the cached features and the finished fine-tunes (ensure_finetuned); pass
``--retrain-timing`` to time a fresh head training from cached features anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vrec_utils.catalog import load_catalog
from vrec_utils.studies.finetune_study import measure_finetune
from vrec_utils.train import FinetuneConfig, finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=Path(os.environ.get("VREC_FASHION_SMALL", REPO.parent / "shared" / "data" / "fashion-small")))
    parser.add_argument("--workdir", type=Path, default=REPO / "work")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.add_argument("--no-holdout", action="store_true", help="skip the category-shift model")
    parser.add_argument("--no-photo-shift", action="store_true", help="skip the synthetic photo-shift check")
    parser.add_argument("--shift-catalog", type=Path, default=REPO.parent / "shared" / "data" / "clothing-dev",
                        help="real shifted catalog (reported half measured); a missing folder skips the check")
    parser.add_argument("--retrain-timing", action="store_true", help="also time a fresh head training from cached features")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}.items() if v is not None}
    config = dataclasses.replace(FinetuneConfig(), **overrides)
    catalog = load_catalog(args.catalog)
    print(f"catalog {catalog.name}: {len(catalog)} items; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"config: {json.dumps(config.to_dict())}")

    started = time.perf_counter()
    m = measure_finetune(
        catalog, args.workdir, config=config, photo_shift=not args.no_photo_shift, n_bootstrap=args.n_bootstrap,
        shift_catalog=args.shift_catalog if (args.shift_catalog / "catalog.csv").is_file() else None,
        **({"holdout": None} if args.no_holdout else {}),
    )
    total = time.perf_counter() - started

    run = m.runs["in-domain"]
    print("\n== training (in-domain model) ==")
    print(
        f"{run['n_train']} training pairs, {run['n_val']} validation pairs ({run['n_no_title']} without title skipped); "
        f"best epoch {run['best_epoch']}/{run['epochs_run']}; alpha = {run.get('alpha')}; "
        f"head training {run['train_seconds']:.1f} s; frozen-tower features {run.get('feature_seconds', float('nan')):.1f} s "
        f"(first run only, cached afterwards)"
    )
    retrain = None
    if args.retrain_timing:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            fresh = finetune(catalog, "mini-siglip", tmp, workdir=args.workdir, config=config, warm_cache=False, progress=False)
            retrain = {"wall_seconds": time.perf_counter() - t0, "train_seconds": fresh.train_seconds, "feature_seconds": fresh.feature_seconds}
        print(f"fresh head training from cached features: {retrain['train_seconds']:.1f} s of training, {retrain['wall_seconds']:.1f} s wall")

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        print("\n== nDCG@5 (articleType), paired 95% bootstrap CI of the difference ==")
        print(m.summary())
        print("\n== alpha sweep on the evaluation split (report only; alpha is chosen on validation) ==")
        print(m.alpha_sweep.to_string(index=False))
        print("\n== text queries among evaluation items (top 5) ==")
        for query, frame in m.text_results.groupby("query_text", sort=False):
            labels = ", ".join(frame["articleType"])
            hits = int((frame["articleType"] == frame["expected"]).sum())
            print(f"{query!r:24} {hits}/5 {frame['expected'].iloc[0]}: {labels}")
        print(f"\narticle-type names as text queries: mean precision@5 = {m.text_precision['precision@5'].mean():.3f} "
              f"over {len(m.text_precision)} types")
        print(m.text_precision.sort_values("precision@5").to_string(index=False))
    print(f"\ntotal {total:.1f} s")

    if args.json:
        payload = {
            "catalog": str(catalog.root), "config": config.to_dict(), "runs": m.runs, "retrain": retrain,
            "checks": m.checks.to_dict(orient="records"), "alpha_sweep": m.alpha_sweep.to_dict(orient="records"),
            "text_results": m.text_results.to_dict(orient="records"), "text_precision": m.text_precision.to_dict(orient="records"),
            "total_seconds": total, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
