"""A gated fine-tune's in-domain change in the mode users get: routed by each query's gate.

``vrec search``/``vrec recommend`` route an image query outside a gated model's in-domain gate to
efficientnet-lite0's vectors (``vrec_utils.search``). The recipe study's in-domain column ranks the
served vectors for every query. This measures both on fashion-small's evaluation split
(:func:`vrec_utils.studies.recipe_study.routed_in_domain`: one evaluation, paired bootstrap 95% CIs
from one set of resamples) and writes CSV and Markdown.

Usage::

    .venv/bin/python benchmarks/bench_routed_in_domain.py --workdir /tmp/ft13-work --model local:RUN/model \
        [--recipe gated-block-lr3-distill10-augment-shift] [--out benchmarks/results/routed_in_domain_round6_default]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import cpu_line
from _study_args import add_study_arguments

from vrec_utils.catalog import load_catalog
from vrec_utils.studies.recipe_study import routed_in_domain
from vrec_utils.train import recipe_config
from vrec_utils.train.recipes import DEFAULT_RECIPE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, "routed_in_domain")
    parser.add_argument("--model", required=True, help="the fine-tuned model (local:DIR), its embeddings cached in --workdir")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="the model's recipe (its split settings)")
    args = parser.parse_args(argv)

    print(cpu_line())
    started = time.perf_counter()
    catalog = load_catalog(args.catalog)
    config = recipe_config(args.recipe, None, args.shift_catalog)
    columns = ["mode", "mean_a", "mean_b", "diff", "diff_ci_low", "diff_ci_high", "p_value", "n_queries", "share inside the gate"]
    table = routed_in_domain(catalog, args.workdir, args.model, config=config, n_bootstrap=args.n_bootstrap)[columns].round(4)
    seconds = time.perf_counter() - started
    print(f"\n{catalog.name} evaluation split, model {args.model} ({args.recipe}); a = efficientnet-lite0 (routed vs served: a = served)\n")
    print(table.to_string(index=False))
    print(f"\ntotal {seconds:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    args.out.with_suffix(".md").write_text(
        f"{cpu_line()}; the 2 cores were shared with other jobs\n\n"
        f"`{' '.join(['benchmarks/bench_routed_in_domain.py', *(argv if argv is not None else sys.argv[1:])])}`\n\n"
        f"{catalog.name} evaluation split (every item a query, relevance = same articleType); recipe `{args.recipe}`. "
        "served: every query ranks the served vectors; routed: a query outside the gate ranks efficientnet-lite0's "
        "vectors (as vrec search serves it). a = efficientnet-lite0 (routed vs served: a = served). Paired nDCG@5 "
        "differences, bootstrap (BCa) 95% CIs, one set of resamples.\n\n"
        f"{table.to_markdown(index=False)}\n"
    )
    print(f"wrote {args.out.with_suffix('.csv')}, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
