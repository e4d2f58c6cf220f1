"""`vrec report`: run the numbered notebooks headless and write one HTML report plus the figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..profiles import PROFILES, parse_weights_option
from ..store import DEFAULT_WORKDIR
from ._common import UserError, directory_path, positive_int, split_list


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="run the notebooks headless: one HTML report and the PNG figures (the demo)",
        description="Run notebooks/NN_*.ipynb in order with papermill and export one HTML report. "
        "A profile whose weights are missing falls back to 'offline' (said at the top of the report) "
        "unless --no-fallback.",
    )
    p.add_argument("--profile", choices=list(PROFILES), default="offline",
                   help="which models to compare: offline (no download), article (ResNet50 vs SigLIP-base), smoke (tiny test models)")
    p.add_argument("--catalog", type=Path, default=None, help="catalog folder or CSV (default: the bundled sample, data/sample)")
    p.add_argument("--workdir", type=directory_path, default=DEFAULT_WORKDIR, help="cache and fine-tuned models (default: ./work)")
    p.add_argument("--out", type=directory_path, default=None, help="report folder (default: reports/<profile>)")
    p.add_argument("--notebooks", type=split_list, default=None, metavar="00,03",
                   help="only these notebooks, by number or name (default: all)")
    p.add_argument("--notebooks-dir", type=Path, default=None, help="folder of numbered notebooks (default: the repository's notebooks/)")
    p.add_argument("--sample-size", type=positive_int, default=None, help="a seeded sample of N catalog items instead of all")
    p.add_argument("-k", type=positive_int, default=None, help="results per query in the figures (notebook default: 5)")
    p.add_argument("--label-column", default=None, help="label that decides hits and relevance (notebook default: articleType)")
    p.add_argument("--interactions", type=Path, default=None, metavar="CSV",
                   help="interaction log (query_id,item_id[,weight]): the decision section's verdict adds its nDCG@5 difference")
    p.add_argument("--weights", default=None, metavar="MODEL=PATH[,MODEL=PATH]",
                   help="local weights per model instead of the hub/torch caches, e.g. siglip-base=DIR,resnet50=FILE (named in the report)")
    p.add_argument("--no-fallback", action="store_true", help="stop with an error instead of falling back to the offline profile")
    p.add_argument("--timeout", type=positive_int, default=1800, help="seconds one notebook cell may run (default: 1800)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..report import NotebookError, run_report  # matplotlib and the notebook runner: not for every `vrec` command

    parameters = {key: value for key, value in (("k", args.k), ("label_column", args.label_column)) if value is not None}
    if args.interactions is not None:
        if not args.interactions.is_file():
            raise UserError(f"--interactions: no file {args.interactions}")
        parameters["interactions"] = str(args.interactions.resolve())  # notebooks run in notebooks/, not here
    try:
        weights = parse_weights_option(args.weights)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        result = run_report(
            profile=args.profile,
            catalog=args.catalog,
            out=args.out,
            workdir=args.workdir,
            notebooks=args.notebooks,
            notebooks_dir=args.notebooks_dir,
            fallback=not args.no_fallback,
            sample_size=args.sample_size,
            parameters=parameters,
            timeout=args.timeout,
            progress=not args.quiet,
            weights=weights,
        )
    except NotebookError as exc:
        print(f"vrec report: error: {exc}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"note: {note}")
    print(result.summary())
    return 0
