"""`vrec recommend` (similar items of a catalog item) and `vrec search` (by image or text)."""

from __future__ import annotations

import argparse

from ..catalog import load_catalog
from ..engines import ENGINES
from ..search import recommend, search_by_image, search_by_text
from ._common import UserError, add_allow_partial_arg, add_catalog_args, add_model_args, positive_int, print_frame
from .index_cmd import add_backend_args, index_config


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "recommend",
        help="similar items for catalog item(s), without the item itself",
        description="The k items whose cached embeddings are closest to the item's (cosine similarity).",
    )
    add_catalog_args(r)
    add_allow_partial_arg(r)
    r.add_argument("--model", required=True, help="model whose cached embeddings to use (see `vrec models`)")
    r.add_argument("--item", action="append", required=True, metavar="ID", help="catalog item id (repeat for several)")
    r.add_argument("-k", type=positive_int, default=5, help="results per item (default 5)")
    r.add_argument("--same-category", metavar="COLUMN", default=None, help="only items with the query item's value of this label column, e.g. articleType")
    add_backend_args(r)
    r.add_argument("--json", action="store_true", help="print the results as JSON records")
    r.set_defaults(handler=run_recommend)

    s = sub.add_parser(
        "search",
        help="visual search with an image, or text-to-image search with a vision-language model",
        description="Embed the query image(s) or text(s) with the model and return the closest catalog items.",
    )
    add_catalog_args(s)
    add_allow_partial_arg(s)
    add_model_args(s)
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", action="append", type=str, metavar="PATH|URI", help="query image file or URI (s3://, gs://, file://; repeat for several)")
    what.add_argument("--text", action="append", metavar="TEXT", help='query text, e.g. "red summer dress" (repeat for several)')
    s.add_argument("-k", type=positive_int, default=10, help="results per query (default 10)")
    s.add_argument("--engine", choices=ENGINES, default="torch", help="engine that embeds the query images or texts: torch, openvino (CPU) or auto")
    s.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE", help="keep only items with this label value (repeatable)")
    add_backend_args(s)
    s.add_argument("--json", action="store_true", help="print the results as JSON records")
    s.set_defaults(handler=run_search)


def run_recommend(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    config = index_config(args)
    frame = recommend(
        catalog, args.workdir, args.model, args.item, args.k, same_category=args.same_category, backend=args.backend,
        allow_partial=args.allow_partial, **config,
    )
    print_frame(frame, as_json=args.json)
    return 0


def run_search(args: argparse.Namespace) -> int:
    filters = {}
    for text in args.filter:
        column, sep, value = text.partition("=")
        if not sep or not column:
            raise UserError(f"--filter takes COLUMN=VALUE, got {text!r}")
        filters[column.strip()] = value.strip()
    catalog = load_catalog(args.catalog)
    for column in filters:
        catalog.require_column(column)
    config = index_config(args)
    common = dict(weights=args.weights, device=args.device, filters=filters or None, backend=args.backend, allow_partial=args.allow_partial, **config)
    if args.image:
        frame = search_by_image(catalog, args.workdir, args.model, args.image, args.k, engine=args.engine, **common)
    else:
        frame = search_by_text(catalog, args.workdir, args.model, args.text, args.k, engine=args.engine, **common)
    print_frame(frame, as_json=args.json)
    return 0
