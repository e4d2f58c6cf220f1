"""`vrec decide`: the decision report (CNN vs VLM: quality against cost, index fidelity, the
category filter, per-category wins, the A/B plan, standard protocols, the verdict) as tables and a
figure, without Jupyter."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..catalog import load_catalog
from ..decision.categories import CORRECTIONS
from ..decision.es_server import ES_INDEX_TYPES, ES_NUM_CANDIDATES, ES_QUERIES
from ..decision.fidelity import HNSW_EF, IVF_NPROBE
from ..decision.power import ABPlan
from ..decision.run import DecisionParams, embedding_throughput, run_decision
from ..models import create_embedder
from ..plots import quality_cost_frontier, save_figure
from ..store import load_embeddings
from ._common import (
    UserError,
    add_catalog_args,
    directory_path,
    model_names,
    positive_int,
    positive_int_list,
    print_frame,
    split_list,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decide",
        help="should the shop switch from the CNN to the VLM: quality vs cost, serving index, filter, A/B plan, verdict",
        description="The decision report from cached embeddings (first model = the baseline CNN, second = the candidate): "
        "writes decision_*.csv and decision_verdict.md to OUT/tables and the quality-cost frontier to OUT/figures.",
    )
    add_catalog_args(p)
    p.add_argument("--models", required=True, type=model_names, help="two comma-separated cached models: baseline first (e.g. efficientnet-lite0,local:DIR)")
    p.add_argument("--out", type=directory_path, default=Path("reports/decision"), help="output folder (default: reports/decision)")
    p.add_argument("--label", default="articleType", help="relevance: same value of this column (default: articleType)")
    p.add_argument("--category-column", default="subCategory", help="the category filter of parts 2-4 (default: subCategory)")
    p.add_argument("--max-queries", type=positive_int, default=None, help="a seeded subset of the queries (default: all)")
    p.add_argument("--hnsw-ef", default=",".join(map(str, HNSW_EF)), help="HNSW ef_search values to sweep (empty: none)")
    p.add_argument("--nprobe", default=",".join(map(str, IVF_NPROBE)), help="IVF nprobe values to sweep (empty: none)")
    p.add_argument("--interactions", default=None, metavar="CSV",
                   help="an interaction log (query_id,item_id[,weight]): its paired nDCG@5 difference joins the label one in the verdict")
    p.add_argument("--es", choices=("auto", "on", "off"), default="auto",
                   help="measure Elasticsearch on the server (auto: when VREC_ES_URL is set; off: emulate only)")
    p.add_argument("--es-types", default=",".join(ES_INDEX_TYPES), help="index_options types to measure ('default': left to the server)")
    p.add_argument("--es-num-candidates", default=",".join(map(str, ES_NUM_CANDIDATES)), help="num_candidates values to sweep")
    p.add_argument("--es-queries", type=positive_int, default=ES_QUERIES, help=f"a seeded subset of queries sent to the server (default {ES_QUERIES})")
    p.add_argument("--es-keep", action="store_true", help="keep the report's indexes (vrec-decision-*) for the next run instead of deleting them")
    p.add_argument("--correction", choices=tuple(CORRECTIONS), default="holm", help="per-category multiple-comparison control")
    p.add_argument("--baseline-rate", type=float, default=ABPlan.baseline_rate, help="A/B: current click-through rate (default 0.05)")
    p.add_argument("--daily-traffic", type=positive_int, default=ABPlan.daily_traffic, help="A/B: users per day (default 10000)")
    p.add_argument("--mde", type=float, default=ABPlan.mde_relative, help="A/B: minimum detectable relative lift (default 0.05)")
    p.add_argument("--alpha", type=float, default=ABPlan.alpha)
    p.add_argument("--power", type=float, default=ABPlan.power)
    p.add_argument("--traffic-share", type=float, default=ABPlan.traffic_share, help="A/B: share of traffic in the test (default 1)")
    p.add_argument("--time-embedding", type=int, default=64, metavar="N",
                   help="measure images/s on N images with each model (0: skip; loads the models)")
    p.add_argument("--text", action="store_true", help="run the text protocols with the models' text towers (loads the models)")
    p.add_argument("--device", default="cpu", help="device of the models for --time-embedding / --text (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-bootstrap", type=positive_int, default=1000)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    models = args.models
    if args.interactions and not Path(args.interactions).is_file():
        raise UserError(f"--interactions: file {args.interactions!r} does not exist")
    try:
        plan = ABPlan(baseline_rate=args.baseline_rate, daily_traffic=args.daily_traffic, mde_relative=args.mde, alpha=args.alpha,
                      power=args.power, traffic_share=args.traffic_share)
    except ValueError as exc:
        raise UserError(f"A/B plan: {exc}") from None
    params = DecisionParams(label=args.label, hnsw_ef=tuple(positive_int_list(args.hnsw_ef, "--hnsw-ef")), ivf_nprobe=tuple(positive_int_list(args.nprobe, "--nprobe")), category_column=args.category_column, max_queries=args.max_queries, seed=args.seed,
                            n_bootstrap=args.n_bootstrap, correction=args.correction, ab=plan, elasticsearch=args.es,
                            es_index_types=tuple(split_list(args.es_types)), es_num_candidates=tuple(positive_int_list(args.es_num_candidates, "--es-num-candidates")),
                            es_queries=args.es_queries, es_keep=args.es_keep)
    embeddings = {m: load_embeddings(args.workdir, catalog, m) for m in models}  # a missing cache: the command that makes it, first
    embedders = {m: create_embedder(m, device=args.device) for m in models} if args.time_embedding > 0 or args.text else {}
    throughput = {m: embedding_throughput(e, catalog, args.time_embedding, args.seed) for m, e in embedders.items()} if args.time_embedding > 0 else None
    text = {m: e.embed_texts for m, e in embedders.items() if args.text and e.has_text}
    report = run_decision(catalog, embeddings, params=params, throughput=throughput, text_encoders=text,
                          tables_dir=Path(args.out) / "tables", progress=print, interactions=args.interactions)
    figure = save_figure(quality_cost_frontier(report.tables["frontier"]), "decision_frontier", Path(args.out) / "figures")
    print()
    print("\n\n".join(line.replace("**", "") for line in report.verdict))
    for note in report.notes:
        print(f"note: {note}")
    print()
    print_frame(report.tables["frontier"].drop(columns=["description"]).round(4))
    print(f"\ntables: {Path(args.out) / 'tables'} ({len(report.written)} files); figure: {figure}")
    return 0


__all__ = ["register", "run"]
