"""Fine-tuning recipes study: which mini-SigLIP recipe gains in-domain and holds on real photos.

Every recipe of ``vrec_utils.train.RECIPES`` trains the mini-SigLIP heads on fashion-small's
train split (same split, seeds and epochs) and is measured against efficientnet-lite0 (the
model the heads start from) on

* fashion-small's evaluation split (in-domain, articleType), and
* the *reported half* of ``../shared/data/clothing-dev`` (real photos; split by ``sender_id``,
  seed 0: recipes "…-shift" choose their coefficient on the other, selection half only),

each a paired bootstrap 95% CI (vrec_utils.evaluation). Prints the CPU line and one table:
recipe, coefficient, in-domain diff [CI], shift diff [CI], training seconds; writes it as CSV
and Markdown under ``benchmarks/results/``. The other senders' photos of the same source are
kept out of the repository and are not measured here.

The default recipe is chosen by a stated rule (``RULE``, :func:`choose_by_rule`) that reads only
validation and selection-half numbers; the table, the rule and the rule's choice go into the
Markdown, and ``.png`` draws each recipe's coefficients (validation gain against selection-half change).

Usage::

    .venv/bin/python benchmarks/bench_finetune_recipes.py [--workdir /tmp/vrec-recipes] [--recipes a,b]
    # round 2 (benchmarks/results/finetune_recipes_round2.md):
    .venv/bin/python benchmarks/bench_finetune_recipes.py --out benchmarks/results/finetune_recipes_round2 \
        --recipes alpha-mix,alpha-mix-shift-tol,gated-alpha-mix-shift,lp-ft,lp-ft-shift,gated-lp-ft-shift,l2sp-shift,gated-l2sp-shift,distill3-augment-shift,gated-distill3-augment-shift

    # round 3 (benchmarks/results/finetune_recipes_round3.md): the round-2 rows plus
    #   diagonal-shift,gated-diagonal-shift,low-rank-shift,gated-low-rank-shift,alpha-mix-60ep-shift,
    #   gated-alpha-mix-60ep-shift,distill10-augment-shift,gated-distill10-augment-shift
    # round 4 (benchmarks/results/finetune_recipes_round4.md): the round-3 rows plus
    #   block-distill10-augment-shift,gated-block-distill10-augment-shift (efficientnet-lite0's last block
    #   tuned on cached feature maps, which the first run extracts under WORKDIR/feature-maps),
    #   distill10-augment2-shift,gated-distill10-augment2-shift
    # round 5: the round-4 rows plus block-distill10-augment2-shift,gated-block-distill10-augment2-shift;
    # round 6 (benchmarks/results/finetune_recipes_round6.md): plus block-lr3-distill10-augment-shift,
    #   gated-block-lr3-distill10-augment-shift

A rerun reuses the cached features and finished runs (ensure_finetuned).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import cpu_line
from _study_args import add_study_arguments

from vrec_utils.catalog import load_catalog
from vrec_utils.studies.recipe_study import HOLD_MARGIN, choose_by_rule, run_recipe_study
from vrec_utils.train import RECIPES, FinetuneConfig
from vrec_utils.train.recipes import ROUND2_TOLERANCE

RULE = (
    "each recipe's output-mix coefficient: among ALPHA_GRID, those whose nDCG@5 on clothing-dev's selection half "
    "(senders hashed with seed 0) is at least the base's minus {t:g}, the one with the best in-domain validation "
    "nDCG@5 (validation part of the train split); the default: among recipes chosen that way, the best validation "
    "gain. The evaluation split and the reported half are measured once per finished recipe and never read by the rule."
)


def plot_tradeoff(study, tolerance: float, path: Path, pick: str | None = None) -> None:
    """Validation gain against selection-half change, one line per recipe over its coefficients
    (the data the rule reads), the chosen coefficient ringed, the tolerance as a dashed line, and
    the rule's pick named on the plot (26 recipes repeat the palette's colours)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 recipes, each its own colour
    for name, alpha in study.alpha_tables.items():
        if "shift_select_ndcg@5" not in alpha:
            continue
        x = alpha["shift_select_ndcg@5"] - alpha.loc[alpha["alpha"] == 0, "shift_select_ndcg@5"].item()
        y = alpha["val_ndcg@5"] - alpha.loc[alpha["alpha"] == 0, "val_ndcg@5"].item()
        gated = name.startswith("gated-")  # gated recipes sit on x = 0: dashed, so they read apart
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=name, linestyle="--" if gated else "-", alpha=0.8 if gated else 1.0)
        chosen = (alpha["alpha"] - study.runs[name]["alpha"]).abs() < 1e-9
        ax.scatter(x[chosen], y[chosen], s=120, facecolors="none", edgecolors=line.get_color(), linewidths=2)
        if name == pick and chosen.any():
            ax.annotate(f"rule's pick: {name}", (x[chosen].iloc[0], y[chosen].iloc[0]), xytext=(-280, 6),
                        textcoords="offset points", fontsize=9, fontweight="bold", arrowprops={"arrowstyle": "->", "color": "black"})
    ax.axvline(-tolerance, color="grey", linestyle="--", linewidth=1)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("nDCG@5 change on clothing-dev's selection half (real photos)")
    ax.set_ylabel("nDCG@5 gain on in-domain validation")
    ax.set_title(f"Each recipe's mix coefficients 0..1 (points); ringed: chosen by the rule\n"
                 f"(selection-half change >= -{tolerance:g} (dashed), then best validation gain)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the axes: 20+ recipes would cover the curves
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, "finetune_recipes", workdir=REPO / "work")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every recipe (default: FinetuneConfig's)")
    parser.add_argument("--rule-tolerance", type=float, default=ROUND2_TOLERANCE, help="selection-half tolerance of the default's rule")
    args = parser.parse_args(argv)

    print(cpu_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (the CPUs are shared with other jobs)")
    catalog = load_catalog(args.catalog)
    started = time.perf_counter()
    config = FinetuneConfig() if args.epochs is None else FinetuneConfig(epochs=args.epochs)
    print(f"every recipe: {config.epochs} epochs, batch {config.batch_size}, lr {config.lr:g}, seed {config.seed}, split seed {config.split_seed}")
    study = run_recipe_study(catalog, args.shift_catalog, args.workdir, recipes=args.recipes.split(","), config=config, n_bootstrap=args.n_bootstrap)
    total = time.perf_counter() - started
    table = study.table
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 80):
        print(f"\nnDCG@5 change vs efficientnet-lite0: {catalog.name} evaluation split (articleType) and {args.shift_catalog.name} "
              f"reported half (label); paired bootstrap 95% CIs; holds = shift CI lower bound > -{HOLD_MARGIN:g}")
        print(table.drop(columns=["verdict"]).to_string(index=False))
        print()
        for row in table.itertuples(index=False):
            print(f"{row.recipe}: {row.verdict}")
    rule = RULE.format(t=args.rule_tolerance)
    try:
        chosen = choose_by_rule(table, args.rule_tolerance)
    except ValueError as error:
        chosen = f"none ({error})"
    print(f"\nselection rule: {rule}\nchosen by the rule: {chosen}")
    print(f"\ntotal {total:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    study.sides.to_csv(args.out.with_name(args.out.name + "_sides.csv"), index=False)
    header = (
        f"{cpu_line()}; the 2 cores were shared with other jobs (times are under load)\n\n"
        f"`{' '.join(['benchmarks/bench_finetune_recipes.py', *(argv or sys.argv[1:])])}`\n\n"
        f"Candidates: {len(table)} recipes in this table. Selection rule: {rule}\n\n"
        f"Chosen by the rule: **{chosen}**. Total {total:.0f} s.\n\n"
    )
    args.out.with_suffix(".md").write_text(header + study.markdown_table() + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps({"runs": study.runs, "total_seconds": total}, indent=2, default=str))
    plot_tradeoff(study, args.rule_tolerance, args.out.with_suffix(".png"), pick=chosen)
    print(f"wrote {args.out.with_suffix('.csv')}, .md, .png, _sides.csv, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
