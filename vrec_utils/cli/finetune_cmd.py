"""`vrec finetune`: sigmoid-loss fine-tuning on a catalog's (image, title) pairs -> local:DIR model."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..catalog import load_catalog
from ..models import get_model_entry
from ..models.local import LOCAL_SCHEME, serving_mode
from ..models.mini_siglip import read_model_json
from ..studies.recipe_study import both_sides, default_shift_catalog, routed_in_domain, sides_text
from ..train import (
    RECIPES,
    SCHEDULES,
    SELECT_BY,
    SERVING_MODES,
    TRAINABLE,
    FinetuneConfig,
    finetune,
    recipe_config,
)
from ..train.recipes import DEFAULT_RECIPE
from ._common import (
    add_catalog_args,
    directory_path,
    non_negative_int,
    positive_int,
    print_json,
)

_DEFAULTS = FinetuneConfig()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a vision-language model with the sigmoid loss on image-title pairs",
        description=(
            "Train on the catalog's train split (the evaluation split is never seen), choose the epoch and "
            "the output mix on a validation part of it, checkpoint every epoch (rerun to resume), and save "
            "a model that loads as --model local:OUT/model."
        ),
    )
    add_catalog_args(p)
    p.add_argument("--base", default="mini-siglip", help="base model with a text tower (default: mini-siglip, offline)")
    p.add_argument("--out", required=True, type=directory_path, help="run folder: model/, checkpoints/, history.csv, ...")
    p.add_argument("--device", default="auto", help="auto (CUDA/MPS when present), cpu, cuda, mps")
    g = p.add_argument_group("training")
    g.add_argument("--trainable", choices=TRAINABLE, default=_DEFAULTS.trainable, help="parts to train (mini-siglip: heads, or last: also its image tower's last block)")
    g.add_argument("--last-blocks", type=positive_int, default=_DEFAULTS.last_blocks, help="blocks per tower for --trainable last")
    g.add_argument("--epochs", type=positive_int, default=_DEFAULTS.epochs)
    g.add_argument("--batch-size", type=positive_int, default=_DEFAULTS.batch_size)
    g.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    g.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    g.add_argument("--schedule", choices=SCHEDULES, default=_DEFAULTS.schedule)
    g.add_argument("--warmup-steps", type=non_negative_int, default=_DEFAULTS.warmup_steps)
    g.add_argument("--grad-clip", type=float, default=_DEFAULTS.grad_clip, help="max grad norm; 0 disables")
    g.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    g.add_argument("--loss-init", choices=("paper", "model"), default=_DEFAULTS.loss_init,
                   help="paper: t'=log 10, b=-10; model: the base's logit scale/bias")
    d = p.add_argument_group("data and selection")
    d.add_argument("--title-column", default=_DEFAULTS.title_column)
    d.add_argument("--eval-fraction", type=float, default=_DEFAULTS.eval_fraction, help="held-out evaluation split")
    d.add_argument("--split-seed", type=int, default=_DEFAULTS.split_seed)
    d.add_argument("--val-fraction", type=float, default=_DEFAULTS.val_fraction, help="validation part of the train split")
    d.add_argument("--exclude", action="append", default=[], metavar="COLUMN=VALUE",
                   help="keep matching items out of training (repeatable), e.g. masterCategory=Accessories")
    d.add_argument("--max-pairs", type=positive_int, default=None, help="train on at most N pairs (seeded subset)")
    d.add_argument("--label", default=_DEFAULTS.label, help="label for validation nDCG@5 ('' to select by val loss)")
    d.add_argument("--select-by", choices=SELECT_BY, default=_DEFAULTS.select_by)
    d.add_argument("--patience", type=positive_int, default=None, help="early stop after N epochs without improvement")
    d.add_argument("--alpha", type=float, default=None, help="mini-siglip output mix (default: chosen on validation)")
    d.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help=f"mini-siglip robustness recipe (default: {DEFAULT_RECIPE!r}, chosen by benchmarks/bench_finetune_recipes.py)")
    shift = default_shift_catalog()
    d.add_argument("--shift-catalog", default=str(shift) if shift else "", metavar="DIR",
                   help="real shifted catalog (label, sender_id): its selection half may choose the mix coefficient, its "
                   f"reported half is measured after training (default: {shift or 'none; ../shared/data/clothing-dev is absent'}; '' for none)")
    d.add_argument("--serving", choices=SERVING_MODES, default=_DEFAULTS.serving,
                   help="a gated mini-siglip's serving mode, recorded in the saved model: routed (image queries outside "
                   "its in-domain gate search efficientnet-lite0's vectors) or served (every query searches its vectors)")
    d.add_argument("--image-rank", type=positive_int, default=None, help="mini-siglip: low-rank residual image head")
    d.add_argument("--text-hidden", type=positive_int, default=None, help="mini-siglip: MLP text head width")
    r = p.add_argument_group("run")
    r.add_argument("--no-resume", action="store_true", help="ignore a checkpoint of the same run and start over")
    r.add_argument("--overwrite", action="store_true", help="replace a checkpoint of a different run in --out")
    r.add_argument("--no-warm-cache", action="store_true", help="do not precompute the tuned model's catalog embeddings")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--json", action="store_true", help="print the run summary as JSON")
    r.add_argument("--no-compare", action="store_true", help="skip the in-domain and shift comparison after training")
    r.add_argument("--n-bootstrap", type=positive_int, default=1000, help="bootstrap resamples of the comparison's CIs")
    p.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return dataclasses.replace(
        _DEFAULTS,
        trainable=args.trainable, last_blocks=args.last_blocks, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip or None, seed=args.seed, loss_init=args.loss_init, title_column=args.title_column,
        eval_fraction=args.eval_fraction, split_seed=args.split_seed, val_fraction=args.val_fraction,
        exclude=tuple(args.exclude), max_pairs=args.max_pairs, label=args.label or None, select_by=args.select_by,
        patience=args.patience, alpha=args.alpha, image_rank=args.image_rank, text_hidden=args.text_hidden,
        serving=args.serving,
    )  # fmt: skip


def _is_mini_siglip(base: str) -> bool:
    if base == "mini-siglip":
        return True
    entry, spec = get_model_entry(base)  # local:DIR started from a saved mini-siglip
    try:
        return entry.name == LOCAL_SCHEME and spec is not None and read_model_json(spec).get("family") == "mini-siglip"
    except FileNotFoundError:
        return False


def config_with_recipe(args: argparse.Namespace, mini: bool) -> FinetuneConfig:
    """The CLI's config with the recipe applied (mini-siglip: ``--recipe``, default DEFAULT_RECIPE);
    a recipe that selects on the shift catalog falls back to in-domain validation without one."""
    config = config_from_args(args)
    if not mini:
        if args.recipe:
            raise ValueError(f"--recipe applies to mini-siglip only, not --base {args.base}")
        return config
    name = args.recipe or DEFAULT_RECIPE
    shift = args.shift_catalog or None
    if shift is not None and not Path(shift).expanduser().exists():
        raise ValueError(f"--shift-catalog {shift}: no such catalog")
    if RECIPES[name].get("select_on") == "shift" and shift is None:
        print(f"recipe {name!r} chooses its coefficient on a shift catalog and none is given: chosen on validation", file=sys.stderr)
    return recipe_config(name, config, shift, fallback=True)


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    if not catalog.report.ok:
        print(f"catalog: {catalog.report.summary()}", file=sys.stderr)
    mini = _is_mini_siglip(args.base)
    config = config_with_recipe(args, mini)
    result = finetune(
        catalog, args.base, args.out, workdir=args.workdir, config=config, device=args.device,
        resume=not args.no_resume, overwrite=args.overwrite or args.no_resume, warm_cache=not args.no_warm_cache,
        progress=not args.quiet,
    )
    if result.n_no_title:
        print(f"{result.n_no_title} train-split item(s) without a title were skipped", file=sys.stderr)
    sides = routed = None
    mode = serving_mode(result.model_name)
    if not args.no_compare and config.label and config.label in catalog.items.columns:
        base_model = "efficientnet-lite0" if mini else args.base
        sides = both_sides(
            catalog, args.workdir, result.model_name, config=config, shift_catalog=args.shift_catalog or None,
            base_model=base_model, label=config.label, n_bootstrap=args.n_bootstrap, device=args.device,
        )
        if mode == "routed":  # the in-domain number users get: routed by each query's gate
            table = routed_in_domain(catalog, args.workdir, result.model_name, config=config, base_model=base_model, label=config.label, n_bootstrap=args.n_bootstrap)
            routed = table[table["mode"] == "routed"].iloc[0]
    if args.json:
        print_json(
            {
                "model": result.model_name, "out": str(result.out), "best_epoch": result.best_epoch,
                "epochs_run": len(result.history), "alpha": result.alpha, "n_train": result.n_train,
                "n_val": result.n_val, "n_no_title": result.n_no_title, "n_excluded": result.n_excluded,
                "n_dropped": result.n_dropped, "train_seconds": round(result.train_seconds, 3),
                "feature_seconds": round(result.feature_seconds, 3),
                "history": result.history.to_dict(orient="records"), "recipe": result.info.get("recipe"), "serving": mode,
                "comparison": None if sides is None else sides.assign(serving="served").to_dict(orient="records"),
                "routed_in_domain": None if routed is None else routed.to_dict(),
            }
        )
    else:
        print(result.summary())
        print(_serving_line(mode))
        if sides is not None:
            print("both sides, with the served vectors for every query:")
            print(sides_text(sides))
        if routed is not None:
            print(
                f"in-domain as served to users (routed; {routed['share inside the gate']:.1%} of queries inside the gate): "
                f"{routed['mean_a']:.4f} -> {routed['mean_b']:.4f}, diff {routed['diff']:+.4f} "
                f"[95% CI {routed['diff_ci_low']:+.4f}, {routed['diff_ci_high']:+.4f}]"
            )
        print(f"use it with: vrec extract --catalog {args.catalog} --model {result.model_name}")
    return 0


def _serving_line(mode: str) -> str:
    if mode == "routed":
        return ("serving: routed (recorded in the model): image queries outside its in-domain gate search efficientnet-lite0's "
                "vectors of the catalog (vrec extract --model efficientnet-lite0), the others its own (vrec search/recommend)")
    return "serving: served (recorded in the model): every query searches the model's own vectors"
