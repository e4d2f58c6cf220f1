"""`vrec extract`: catalog -> cached image (or text) embeddings."""

from __future__ import annotations

import argparse
import sys

from ..catalog import load_catalog
from ..engines import ENGINES, PRECISIONS
from ..extract import extract_image_embeddings, extract_text_embeddings
from ..models import create_embedder
from ._common import UserError, add_catalog_args, add_model_args, non_negative_int, positive_int, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="embed a catalog's images (or titles) into the resumable cache")
    add_catalog_args(p)
    add_model_args(p)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=None, help="DataLoader workers decoding images (default: cores - 1, at most 4)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N items")
    p.add_argument("--chunk-size", type=positive_int, default=None, help="images per cache chunk (a killed run loses at most one)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto = bf16 where the hardware runs it natively")
    p.add_argument(
        "--engine", choices=ENGINES, default="torch",
        help="inference engine for images: torch, openvino (CPU; pip install 'vrec[openvino]') or auto "
        "(OpenVINO when installed and the model exports, torch otherwise); each engine has its own cache",
    )
    p.add_argument("--no-normalize", action="store_true", help="keep raw vectors instead of L2-normalising them")
    p.add_argument("--text", nargs="?", const="title", default=None, metavar="COLUMN", help="embed a text column (default: title) instead of images")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    if not catalog.report.ok:
        print(f"catalog: {catalog.report.summary()}", file=sys.stderr)
    embedder = create_embedder(args.model, weights=args.weights, device=args.device)
    if args.text:
        if args.engine == "openvino":
            raise UserError("--engine openvino runs image towers only for now; drop --engine (or use torch) with --text")
        result = extract_text_embeddings(catalog, embedder, args.workdir, column=args.text, normalize=not args.no_normalize)
    else:
        result = extract_image_embeddings(
            catalog, embedder, args.workdir, batch_size=args.batch_size, num_workers=args.workers,
            precision=args.precision, engine=args.engine, normalize=not args.no_normalize, limit=args.limit,
            **({"chunk_size": args.chunk_size} if args.chunk_size else {}),
        )
    if args.json:
        print_json(result.to_json())
    else:
        print(result.summary())
    if len(result.skipped):
        print(f"{len(result.skipped)} item(s) skipped, listed in {result.cache_dir / 'skipped.csv'}", file=sys.stderr)
    return 0
