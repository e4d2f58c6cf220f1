"""`vrec index`: build (or reload) a model's vector index from its cached embeddings."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..catalog import load_catalog
from ..index import build_index
from ._common import UserError, add_allow_partial_arg, add_catalog_args, positive_int, print_json, split_list

FAISS_OPTIONS = ("ann", "hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe", "threads", "exact_method")
ES_OPTIONS = ("config_file", "index_name", "index_type", "num_candidates")
IVF_ONDISK_OPTIONS = ("memory_budget", "nlist", "nprobe", "shard_rows", "threads")
BACKEND_OPTIONS = {"faiss": FAISS_OPTIONS, "elasticsearch": ES_OPTIONS, "ivf-ondisk": IVF_ONDISK_OPTIONS}
_FLAGS = {"config_file": "--es-config", "index_name": "--es-index", "index_type": "--es-index-type"}
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def byte_size(text: str) -> int:
    """``4G``, ``512M``, ``1.5G`` or a number of bytes -> bytes (binary units)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 4G, 512M or 1000000 (bytes), got {text!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}")
    return int(number * _SIZE_UNITS[unit])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build or reload a vector index (FAISS, on-disk IVF or Elasticsearch) from cached embeddings",
        description=(
            "FAISS and on-disk IVF indexes are saved next to the embedding cache and reloaded while the embeddings are "
            "unchanged; Elasticsearch gets the documents that lack this model's vector (a backfill)."
        ),
    )
    add_catalog_args(p)
    add_allow_partial_arg(p)
    p.add_argument("--model", required=True, help="model whose cached embeddings to index (see `vrec models`)")
    p.add_argument("--filter-columns", default=None, help="comma-separated label columns usable as filters (default: all)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if a saved index matches (ES: re-send every document)")
    add_backend_args(p)
    p.add_argument("--json", action="store_true", help="print the index summary as JSON")
    p.set_defaults(handler=run)


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """--backend and its settings (shared with `vrec recommend` / `vrec search`)."""
    p.add_argument("--backend", choices=tuple(BACKEND_OPTIONS), default="faiss",
                   help="index backend (default: faiss; ivf-ondisk: an IVF on disk, searched memory-mapped, for caches over RAM)")
    g = p.add_argument_group("FAISS settings")
    g.add_argument("--ann", choices=("none", "hnsw", "ivf"), default=None, help="approximate search structure (default: none = exact)")
    g.add_argument("--hnsw-m", type=positive_int, default=None, help="HNSW graph degree (default 32)")
    g.add_argument("--ef-construction", type=positive_int, default=None, help="HNSW build candidate list (default 80)")
    g.add_argument("--ef-search", type=positive_int, default=None, help="HNSW search candidate list (default 64)")
    g.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default sqrt(n))")
    g.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists probed per query (default 1.5*sqrt(nlist))")
    g.add_argument("--threads", type=positive_int, default=None, help="FAISS threads (default: the CPUs available)")
    g.add_argument(
        "--exact-method", choices=("auto", "fp32", "bf16-rescored"), default=None,
        help="exact search: bf16 first pass + fp32 rescoring, same answers (auto: on AMX CPUs, 256+ queries); fp32: faiss only",
    )  # fmt: skip
    o = p.add_argument_group("ivf-ondisk settings (also --nlist, --nprobe, --threads)")
    o.add_argument("--memory-budget", type=byte_size, default=None, metavar="SIZE",
                   help="bytes the inverted lists may take (e.g. 4G, the default): SQ8 codes if they fit, else the largest PQ that does")
    o.add_argument("--shard-rows", type=positive_int, default=None, help="vectors filled per shard (default 250000)")
    e = p.add_argument_group("Elasticsearch settings (connection from VREC_ES_* variables or --es-config)")
    e.add_argument("--es-config", dest="config_file", default=None, metavar="FILE", help="JSON/TOML file: url, api_key or username/password, ca_certs, index")
    e.add_argument("--es-index", dest="index_name", default=None, metavar="NAME", help="index name (default: VREC_ES_INDEX or vrec-<catalog>)")
    e.add_argument("--es-index-type", dest="index_type", default=None, help="dense_vector index_options type: hnsw (default, float), flat (exact), int8_hnsw, bbq_hnsw, ...")
    e.add_argument("--num-candidates", type=positive_int, default=None, help="kNN candidates per shard (default 10*k, at least 100; at most 10,000)")


def index_config(args: argparse.Namespace) -> dict[str, Any]:
    """The backend settings given on the command line; refuses settings of the other backend."""
    mine = BACKEND_OPTIONS[args.backend]
    every = dict.fromkeys(name for names in BACKEND_OPTIONS.values() for name in names)
    wrong = [name for name in every if name not in mine and getattr(args, name, None) is not None]
    if wrong:
        flags = ", ".join(_FLAGS.get(w, "--" + w.replace("_", "-")) for w in wrong)
        raise UserError(f"{flags}: not a setting of the {args.backend} backend")
    return {name: getattr(args, name) for name in mine if getattr(args, name, None) is not None}


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    columns = split_list(args.filter_columns) if args.filter_columns is not None else None
    start = time.perf_counter()
    config = index_config(args)
    index = build_index(
        args.workdir, catalog, args.model, backend=args.backend, filter_columns=columns, rebuild=args.rebuild,
        allow_partial=args.allow_partial, **config,
    )
    seconds = time.perf_counter() - start
    summary = {**index.describe(), "seconds": round(seconds, 3), **{k: v for k, v in index.info.items() if k != "fingerprint"}}
    if args.json:
        print_json(summary)
    else:
        verb = "reloaded" if summary.get("reused") else "built"
        print(f"{args.backend} index of {summary['model']} ({summary['size']} items, {summary['dim']}-d) {verb} in {seconds:.2f}s", file=sys.stderr)
        for key, value in summary.items():
            if key not in ("model", "size", "dim", "backend", "seconds", "reused"):
                print(f"  {key}: {value}")
    return 0
