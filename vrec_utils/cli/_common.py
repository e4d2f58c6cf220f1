"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ..store import DEFAULT_WORKDIR


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def error_types() -> tuple[type[BaseException], ...]:
    """Exceptions shown as a one-line message (exit 2) instead of a traceback."""
    from ..catalog import CatalogError
    from ..images import ImageLoadError
    from ..models.base import ModelUnavailableError, TextNotSupportedError
    from ..store import CacheError, EmbeddingsNotFoundError

    return (
        UserError,
        CatalogError,
        ImageLoadError,
        ModelUnavailableError,
        TextNotSupportedError,
        EmbeddingsNotFoundError,
        CacheError,
        KeyError,
        ValueError,
        FileNotFoundError,
    )


def add_catalog_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--catalog", required=required, type=Path, help="catalog folder (styles.csv + images/) or CSV with id,image")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache and results folder (default: ./work)")


def add_allow_partial_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-partial", action="store_true",
        help="use the catalog items that have a cached vector even when some do not yet (default: refuse and name the vrec extract command that fills them)",
    )  # fmt: skip


def add_model_args(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    if multiple:
        parser.add_argument("--models", required=True, help="comma-separated model names (see `vrec models`)")
    else:
        parser.add_argument("--model", required=True, help="model name (see `vrec models`)")
    parser.add_argument("--weights", default=None, help="local weights (directory or file) instead of the hub/default")
    parser.add_argument("--device", default="auto", help="auto (CUDA/MPS when present), cpu, cuda, cuda:1, mps")


def print_frame(frame: pd.DataFrame, as_json: bool = False) -> None:
    if as_json:
        print(frame.to_json(orient="records", indent=2, force_ascii=False))
    else:
        with pd.option_context("display.max_rows", 200, "display.max_colwidth", 60, "display.width", 200):
            print(frame.to_string(index=False))


def print_json(payload: Any) -> None:
    json.dump(payload, sys.stdout, indent=2, default=str, ensure_ascii=False)
    print()


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
