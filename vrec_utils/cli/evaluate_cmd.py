"""`vrec evaluate`: cached embeddings -> nDCG@k & co. with bootstrap CIs and paired comparisons."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from ..catalog import Split, load_catalog
from ..evaluation import CI_METHODS, MATRIX, EvaluationResult, evaluate_models
from ..metrics import GAINS
from ._common import add_allow_partial_arg, add_catalog_args, model_names, positive_int, positive_int_list, print_frame, split_list
from .index_cmd import byte_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="nDCG@k, precision, recall, MRR, mAP of cached embeddings, with bootstrap CIs and paired tests",
        description="Leave-one-out evaluation of cached embeddings: every evaluated item queries the others. "
        "Relevance comes from a label column (default articleType), a label hierarchy, or an interaction log.",
    )
    add_catalog_args(p)
    add_allow_partial_arg(p)
    p.add_argument("--models", required=True, type=model_names, help="comma-separated cached models; the first is the baseline of comparisons")
    rel = p.add_mutually_exclusive_group()
    rel.add_argument("--label", default=None, metavar="COLUMN", help="binary relevance: same value of COLUMN (default: articleType)")
    rel.add_argument("--hierarchy", default=None, metavar="C1,C2,C3", help="graded relevance along columns, coarse to fine")
    rel.add_argument("--interactions", default=None, metavar="CSV", help="graded relevance from query_id,item_id[,weight]")
    p.add_argument("-k", "--k", default="5,10", help="cut-offs, comma-separated (default: 5,10)")
    p.add_argument("--metrics", default=None, help="metric strings such as ndcg@5,map@10,mrr (default: ndcg, precision, recall, mrr, map at each k)")
    p.add_argument("--filter-column", default=None, metavar="COLUMN", help="also evaluate with candidates filtered to the query's COLUMN value")
    p.add_argument("--split", default=None, metavar="JSON", help="a saved split (Split.save): evaluate on its eval items, fit PCA on its train items")
    p.add_argument("--keep-duplicates", action="store_true", help="keep byte-identical image copies as candidates (free rank-1 hits)")
    p.add_argument("--gain", choices=GAINS, default="exp2", help="nDCG gain: exp2 = 2**rel - 1 (default), linear = rel")
    p.add_argument("--pca-dims", default=None, metavar="D1,D2", help="also evaluate PCA-reduced vectors (e.g. 32,64,128)")
    p.add_argument("--fuse", action="append", default=[], metavar="M1+M2", help="also evaluate a fusion (mean cosine) of models; repeatable")
    p.add_argument("--backend", default=MATRIX,
                   help="matrix (default: exact similarity-matrix blocks) or an index backend: faiss, ivf-ondisk, elasticsearch (the serving path)")
    p.add_argument("--ann", default=None, choices=("none", "hnsw", "ivf"), help="with --backend faiss: approximate index kind")
    p.add_argument("--nprobe", type=positive_int, default=None, help="with --backend faiss --ann ivf or ivf-ondisk: lists probed per query")
    p.add_argument("--memory-budget", type=byte_size, default=None, metavar="SIZE", help="with --backend ivf-ondisk: bytes its lists may take (default 4G)")
    p.add_argument("--sample-queries", type=positive_int, default=None, metavar="N",
                   help="large catalogs: evaluate N queries (seeded by --seed, stratified by the label) against every candidate")
    p.add_argument("--ci", choices=CI_METHODS, default="bca", help="bootstrap interval method (default: bca)")
    p.add_argument("--n-bootstrap", type=positive_int, default=2000)
    p.add_argument("--n-permutations", type=positive_int, default=10000, help="random sign flips of the paired permutation test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-category", nargs="?", const="", default=None, metavar="COLUMN",
                   help="also print nDCG per category (default column: the relevance's finest label)")
    p.add_argument("--json", default=None, metavar="OUT", help="write results, CIs and comparisons as JSON to OUT")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    models = args.models
    options = {
        "ks": positive_int_list(args.k, "-k"),
        "metrics": split_list(args.metrics) if args.metrics else None,
        "filter_column": args.filter_column,
        "split": Split.load(args.split) if args.split else None,
        "exclude_duplicates": not args.keep_duplicates,
        "gain": args.gain,
        "pca_dims": positive_int_list(args.pca_dims, "--pca-dims"),
        "fusions": [split_list(f.replace("+", ",")) for f in args.fuse],
        "backend": args.backend,
        "index_options": {k: v for k, v in (("ann", args.ann), ("nprobe", args.nprobe), ("memory_budget", args.memory_budget)) if v is not None} or None,
        "ci_method": args.ci,
        "n_bootstrap": args.n_bootstrap,
        "n_permutations": args.n_permutations,
        "seed": args.seed,
        "sample_queries": args.sample_queries,
    }
    if args.label:
        options["label"] = args.label
    elif args.hierarchy:
        options["hierarchy"] = split_list(args.hierarchy)
    elif args.interactions:
        options["interactions"] = args.interactions
    result = evaluate_models(catalog, args.workdir, models, allow_partial=args.allow_partial, **options)
    print_result(result)
    if args.per_category is not None:
        ndcg = next((m for m in result.metrics if m.startswith("ndcg")), result.metrics[0])
        print(f"\nper category ({ndcg}, unfiltered):")
        print_frame(_rounded(result.per_category(args.per_category or None, metric=ndcg)))
    if args.json:
        result.to_json(args.json)
        print(f"\nwrote {args.json}")
    return 0


def print_result(result: EvaluationResult) -> None:
    """Header, a metric table (CIs for nDCG) and the nDCG paired comparisons."""
    cfg, rep = result.config, result.report
    ci = f"{cfg['confidence']:.0%} {'BCa' if cfg['ci_method'] == 'bca' else cfg['ci_method']} bootstrap"
    print(f"relevance: {cfg['relevance']}")
    print(f"nDCG gain: {cfg['gain']} ({cfg['gain_formula']}); CIs: {ci}, {cfg['n_bootstrap']} resamples, seed {cfg['seed']}")
    lonely = rep["no_relevant"]
    print(
        f"{result.n_queries} queries among {rep['candidates']} candidates; {rep['duplicates_excluded']} duplicate image(s) "
        f"excluded; {lonely['count']} item(s) with no relevant candidate left out of the means"
        + (f" (classes: {_preview(lonely['classes'])})" if lonely["classes"] else "")
    )
    sample = rep.get("query_sample")
    if sample:
        print(f"queries: a sample of {sample['queries']} of {sample['of']} (seed {sample['seed']}, stratified by {sample['stratified_by']}); the CIs include the sampling uncertainty")
    print(f"answered by: {cfg.get('answered_by', cfg['backend'])}")
    missing = {m: n for m, n in rep["missing_embeddings"].items() if n}
    if missing:
        print(f"eval items without a cached vector (skipped): {missing}", file=sys.stderr)
    if "interactions" in rep:
        r = rep["interactions"]
        print(
            f"interactions: {r['used_rows']} of {r['rows']} rows used; {r['unknown_id_rows']} row(s) with ids not in the "
            f"catalog ({r['unknown_query_ids']} query id(s), {r['unknown_item_ids']} item id(s)"
            + (f", e.g. {', '.join(r['unknown_id_examples'][:5])}" if r["unknown_id_examples"] else "")
            + f"); {r['outside_candidates_rows']} outside the evaluated items; {r['self_pair_rows']} self pair(s)",
            file=sys.stderr if r["unknown_id_rows"] else sys.stdout,
        )
    for note in cfg["notes"]:
        print(f"note: {note}")

    print()
    print_frame(_rounded(summary_table(result)))

    comparisons = result.comparisons([m for m in result.metrics if m.startswith("ndcg")] or None)
    if len(comparisons):
        print(f"\npaired comparisons (b vs a on the same queries; diff = b - a, two-sided sign-flip p, {cfg['n_permutations']} flips):")
        frame = pd.DataFrame(
            {
                "a": comparisons["model_a"] + " / " + comparisons["setting_a"],
                "b": comparisons["model_b"] + " / " + comparisons["setting_b"],
                "metric": comparisons["metric"],
                "mean_a": comparisons["mean_a"],
                "mean_b": comparisons["mean_b"],
                "diff": comparisons["diff"],
                "diff CI": [f"[{lo:+.4f}, {hi:+.4f}]" for lo, hi in zip(comparisons["diff_ci_low"], comparisons["diff_ci_high"])],
                "p": comparisons["p_value"],
                "rel %": comparisons["rel_improvement_pct"],
                "rel % CI": [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in zip(comparisons["rel_ci_low"], comparisons["rel_ci_high"])],
            }
        )
        print_frame(_rounded(frame))


def summary_table(result: EvaluationResult) -> pd.DataFrame:
    """:meth:`EvaluationResult.table` with each nDCG interval as one text column after its mean
    and the other intervals left out (they are in the JSON)."""
    table = result.table()
    for metric in result.metrics:
        low, high = table.pop(f"{metric}_low"), table.pop(f"{metric}_high")
        if metric.startswith("ndcg"):
            table.insert(table.columns.get_loc(metric) + 1, f"{metric} CI", [f"[{lo:.4f}, {hi:.4f}]" for lo, hi in zip(low, high)])
    return table


def _rounded(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = np.round(out[column], 4)
    return out


def _preview(classes: dict[str, int], n: int = 8) -> str:
    names = list(classes)
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n} more)" if len(names) > n else "")
