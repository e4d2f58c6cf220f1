"""`vrec data`: inspect a catalog, make the bundled sample, fetch the full dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..catalog import load_catalog, split_catalog
from ..data import fetch_fashion, make_sample
from ..store import DEFAULT_WORKDIR
from ._common import directory_path, positive_int, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="catalog tools: check, split, sample, fetch")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    check = verbs.add_parser("check", help="validate a catalog and print its report")
    check.add_argument("--catalog", type=Path, required=True)
    check.set_defaults(handler=_check)

    split = verbs.add_parser("split", help="write the deterministic train/eval split of a catalog")
    split.add_argument("--catalog", type=Path, required=True)
    split.add_argument("--workdir", type=directory_path, default=DEFAULT_WORKDIR)
    split.add_argument("--eval-fraction", type=float, default=0.25)
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(handler=_split)

    sample = verbs.add_parser("sample", help="copy a stratified sample of a Fashion-layout catalog")
    sample.add_argument("--source", type=Path, required=True)
    sample.add_argument("--out", type=directory_path, required=True)
    sample.add_argument("--n", type=positive_int, default=1500)
    sample.add_argument("--column", default="articleType")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(handler=_sample)

    fetch = verbs.add_parser("fetch", help="download the full Fashion Product Images (Small) from Kaggle")
    fetch.add_argument("--out", type=directory_path, default=Path("data/fashion"))
    fetch.set_defaults(handler=_fetch)


def _check(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    print(f"{catalog.name}: {catalog.report.summary()}")
    print(f"label columns: {', '.join(catalog.label_columns)}")
    return 0 if catalog.report.ok else 1


def _split(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    split = split_catalog(catalog, args.eval_fraction, args.seed)
    path = split.save(Path(args.workdir) / "split.json")
    print_json({"train": len(split.train), "eval": len(split.eval), "seed": split.seed, "path": str(path)})
    return 0


def _sample(args: argparse.Namespace) -> int:
    out = make_sample(args.source, args.out, n=args.n, column=args.column, seed=args.seed)
    print(f"wrote {load_catalog(out).report.n_rows} items to {out}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    print(f"downloaded to {fetch_fashion(args.out)}")
    return 0
