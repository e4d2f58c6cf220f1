"""Round 5's rule of issue 13: the recipes' rule plus a mixed-catalogue check on the selection sets.

For every finished recipe run in ``--workdir`` (nothing is trained: a missing run is an error), this
reads what chose its coefficient (validation gain, selection-half change: ``selection_gains``) and
runs the mixed-catalogue check on ONE index of the *validation part* of fashion-small's train split
and clothing-dev's *selection half* (``mixed_catalog_check(..., sets="selection")``), in both serving
modes (served vectors; routed by the query's gate). Never reads an evaluation item or a reported
photo. Prints the CPU line and one table per recipe and mode, and the picks of round 4's rule
(``choose_by_rule``) and of round 5's (``choose_with_mixed_check``); writes CSV and Markdown.

Usage::

    .venv/bin/python benchmarks/bench_mixed_rule.py --workdir /tmp/ft13-work --recipes a,b \
        [--out benchmarks/results/finetune_recipes_round5_rule] [--with-earlier earlier_rule.csv,...]
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
from vrec_utils.studies.mixed_catalog import MIXED_TOLERANCE, choose_with_mixed_check, mixed_catalog_check
from vrec_utils.studies.recipe_study import choose_by_rule, selection_gains
from vrec_utils.train import find_finetuned, load_result, recipe_config
from vrec_utils.train.recipes import ROUND2_TOLERANCE

RULE = (
    "round 4's rule (each recipe's coefficient: the best in-domain validation nDCG@5 among those losing at most {t:g} "
    "on clothing-dev's selection half), and a (recipe, serving mode) is eligible only if, in ONE index of the validation "
    "part (studio) and the selection half (photos), photo -> studio queries and studio queries each lose at most {m:g} "
    "mean nDCG@5 against efficientnet-lite0; the pick: the best validation gain among eligible pairs"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, "finetune_recipes_round5_rule")
    parser.add_argument("--recipes", required=True, help="comma-separated recipe names (each with a finished run in --workdir)")
    parser.add_argument("--with-earlier", default="", metavar="CSV[,CSV]",
                        help="earlier outputs of this script (their rows are read, not recomputed): the picks are over those runs and --recipes")
    args = parser.parse_args(argv)

    print(cpu_line())
    catalog, photos = load_catalog(args.catalog), load_catalog(args.shift_catalog)
    started = time.perf_counter()
    rows, modes = [], []
    for name in args.recipes.split(","):
        config = recipe_config(name, None, args.shift_catalog)
        model = find_finetuned(catalog, args.workdir, "mini-siglip", config=config)
        if model is None:
            raise SystemExit(f"--recipes: no finished run of {name!r} in {args.workdir}")
        loaded = load_result(model)
        coefficient = loaded["result"].get("alpha")
        rows.append({"recipe": name, "coefficient": coefficient, **selection_gains(loaded.get("alpha"), coefficient)})
        check = mixed_catalog_check(catalog, photos, args.workdir, model, config=config, n_bootstrap=args.n_bootstrap, sets="selection")
        for mode in check.eligibility(MIXED_TOLERANCE).to_dict("records"):
            modes.append({"recipe": name, **mode, "n studio": check.n_studio, "n photo": check.n_photo})
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    table, mixed = pd.DataFrame(rows), pd.DataFrame(modes)
    both = table.merge(mixed, on="recipe").round(4)
    earlier = [pd.read_csv(path) for path in args.with_earlier.split(",") if path]
    pool = pd.concat([*earlier, both], ignore_index=True)  # earlier runs first: ties go to the earlier row
    if pool.duplicated(["recipe", "serving"]).any():
        raise SystemExit("--with-earlier: a recipe appears twice; each run is read once")
    table, mixed = pool.drop_duplicates("recipe")[["recipe", "coefficient", "val gain", "selection change"]], pool
    round4 = choose_by_rule(table, ROUND2_TOLERANCE)
    try:
        recipe, mode = choose_with_mixed_check(table, ROUND2_TOLERANCE, mixed)
        round5 = f"{recipe} ({mode})"
    except ValueError as error:
        round5 = f"none ({error})"
    seconds = time.perf_counter() - started
    rule = RULE.format(t=ROUND2_TOLERANCE, m=MIXED_TOLERANCE)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(both.to_string(index=False))
    print(f"\nover {len(table)} runs: round 4's rule picks: {round4}\nround 5's rule picks: {round5}\ntotal {seconds:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    both.to_csv(args.out.with_suffix(".csv"), index=False)
    args.out.with_suffix(".md").write_text(
        f"{cpu_line()}; the 2 cores were shared with other jobs\n\n"
        f"`{' '.join(['benchmarks/bench_mixed_rule.py', *(argv if argv is not None else sys.argv[1:])])}`\n\n"
        f"Rule: {rule}. Changes are nDCG@5 against efficientnet-lite0 with paired bootstrap (BCa) 95% CIs; "
        f"no evaluation item or reported-half photo is read.\n\n"
        f"Picks over {len(table)} runs ({len(table) - len(rows)} read from {args.with_earlier or 'no earlier table'}): "
        f"round 4's rule: **{round4}**; round 5's rule: **{round5}**. Total {seconds:.0f} s.\n\n"
        f"{both.to_markdown(index=False)}\n"
    )
    print(f"wrote {args.out.with_suffix('.csv')}, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
