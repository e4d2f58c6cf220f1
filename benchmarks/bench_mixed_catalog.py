"""A mixed catalogue: what a gated fine-tune does when studio shots and home photos share ONE index.

The index holds fashion-small's evaluation split (studio shots) and clothing-dev's reported half
(home photos, split by ``sender_id`` seed 0); every item is a query, relevance = same shared kind
(:mod:`vrec_utils.studies.mixed_catalog` documents the label mapping). Variants: efficientnet-lite0
for all items, the tuned model without its gate, the tuned model as served (gated), and a
query-routed search (a query the gate passes searches the served vectors, any other query every
item's base vector). Paired nDCG@5 differences with bootstrap 95% CIs for all / studio / photo
queries, and for photo queries searched among the studio items only.

Usage::

    .venv/bin/python benchmarks/bench_mixed_catalog.py --workdir /tmp/ft13-work --model local:RUN/model \
        [--recipe gated-distill3-augment-shift] [--out benchmarks/results/mixed_catalog]

``--model`` is a fine-tuned model whose runs live in ``--workdir`` (reuses the cached features).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import cpu_line
from _study_args import add_study_arguments

from vrec_utils.catalog import load_catalog
from vrec_utils.studies.mixed_catalog import mixed_catalog_check
from vrec_utils.train import recipe_config
from vrec_utils.train.recipes import DEFAULT_RECIPE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, "mixed_catalog")
    parser.add_argument("--model", required=True, help="the fine-tuned model (local:DIR)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="the model's recipe (its split and shift-half settings)")
    args = parser.parse_args(argv)

    print(cpu_line())
    started = time.perf_counter()
    config = recipe_config(args.recipe, None, args.shift_catalog)
    check = mixed_catalog_check(load_catalog(args.catalog), load_catalog(args.shift_catalog), args.workdir, args.model, config=config, n_bootstrap=args.n_bootstrap)
    seconds = time.perf_counter() - started
    table, neighbours = check.table.round(4), check.neighbours.round(4)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(f"\none index: {check.n_studio} studio items + {check.n_photo} photos; model {args.model} ({args.recipe})\n")
        print(table.to_string(index=False))
        print()
        print(neighbours.to_string(index=False))
    print(f"\ntotal {seconds:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    neighbours.to_csv(args.out.with_name(args.out.name + "_neighbours.csv"), index=False)
    args.out.with_suffix(".md").write_text(
        f"{cpu_line()}; the 2 cores were shared with other jobs\n\n"
        f"`{' '.join(['benchmarks/bench_mixed_catalog.py', *(argv if argv is not None else sys.argv[1:])])}`\n\n"
        f"One index: {check.n_studio} studio items (fashion-small evaluation split) + {check.n_photo} photos (clothing-dev "
        f"reported half); recipe `{args.recipe}`. Paired nDCG@5 differences, bootstrap (BCa) 95% CIs.\n\n"
        f"{table.to_markdown(index=False)}\n\nNeighbours:\n\n{neighbours.to_markdown(index=False)}\n"
    )
    print(f"wrote {args.out.with_suffix('.csv')}, .md, _neighbours.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
