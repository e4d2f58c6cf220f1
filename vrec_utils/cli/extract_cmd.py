"""`vrec extract`: catalog -> cached image (or text) embeddings."""

from __future__ import annotations

import argparse
import functools
import sys

from ..catalog import load_catalog
from ..engines import ENGINES, PRECISIONS
from ..extract import extract_image_embeddings, extract_text_embeddings
from ..models import create_embedder
from ..runners import RUNNERS, RayOptions, ray_runner
from ._common import (
    add_catalog_args,
    add_model_args,
    non_negative_int,
    positive_int,
    print_json,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="embed a catalog's images (or titles) into the resumable cache")
    add_catalog_args(p)
    add_model_args(p)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=None, help="local: DataLoader worker processes decoding images (default: on a CPU, a thread per core decodes each batch, between torch's forward passes or while OpenVINO runs the batch before; on a GPU, cores - 1 workers, at most 4); ray: embedding actors, each holding the model once (default 1)")
    p.add_argument("--runner", choices=RUNNERS, default="local", help="local: this process runs the model; ray: a Ray cluster does (needs the 'ray' extra)")
    p.add_argument("--ray-address", default=None, metavar="auto|ADDR", help="with --runner ray: join this cluster ('auto': the one `ray start` made here); default: start a local one")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="N", help="with --runner ray: GPUs per embedding actor (0: embed on CPUs)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N items")
    p.add_argument("--chunk-size", type=positive_int, default=None, help="images per cache chunk (a killed run loses at most one)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: on a CPU the faster of fp32/bf16 within cosine 0.999 of fp32, measured once per CPU, model and engine (GPU: bf16 where native)")
    p.add_argument(
        "--engine", choices=ENGINES, default="torch",
        help="inference engine for images or texts: torch, openvino (CPU; pip install 'vrec[openvino]') or auto "
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
    runner = _runner(args)
    embedder = create_embedder(args.model, weights=args.weights, device=args.device)
    if args.text:
        precision = "fp32" if args.precision == "auto" else args.precision  # texts: fp32 unless asked (cheap next to images)
        result = extract_text_embeddings(
            catalog, embedder, args.workdir, column=args.text, precision=precision, engine=args.engine, normalize=not args.no_normalize
        )
    else:
        result = extract_image_embeddings(
            catalog, embedder, args.workdir, batch_size=args.batch_size, num_workers=args.workers,
            precision=args.precision, engine=args.engine, normalize=not args.no_normalize, limit=args.limit, runner=runner,
            **({"chunk_size": args.chunk_size} if args.chunk_size else {}),
        )
    if args.json:
        print_json(result.to_json())
    else:
        print(result.summary())
    if len(result.skipped):
        print(f"{len(result.skipped)} item(s) skipped, listed in {result.cache_dir / 'skipped.csv'}", file=sys.stderr)
    return 0


def _runner(args: argparse.Namespace):
    """The runner the flags ask for (None: this process's pipeline, with the chosen --engine); a
    Ray run checks that Ray is installed before any work."""
    ray_flags = [f for f, v in (("--ray-address", args.ray_address), ("--gpus-per-worker", args.gpus_per_worker)) if v]
    if args.runner == "local":
        if ray_flags:
            raise ValueError(f"{ray_flags[0]} needs --runner ray")
        return None
    if args.text:
        raise ValueError("--runner ray embeds images; text embeddings run locally (drop --runner ray)")
    if args.engine != "torch":
        raise ValueError(f"--runner ray runs the torch engine; drop --engine {args.engine}")
    device = "cuda" if args.gpus_per_worker else "cpu"
    factory = functools.partial(create_embedder, args.model, weights=args.weights, device=device)
    options = RayOptions(address=args.ray_address, workers=args.workers or 1, gpus_per_worker=args.gpus_per_worker)
    return ray_runner(factory, options)
