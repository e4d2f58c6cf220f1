"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ..catalog import CatalogError
from ..image_files import FilesystemUnavailableError
from ..images import ImageLoadError
from ..store import DEFAULT_WORKDIR, CacheError, EmbeddingsNotFoundError


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def error_types() -> tuple[type[BaseException], ...]:
    """Exceptions shown as a one-line message (exit 2) instead of a traceback."""
    from ..models.base import ModelUnavailableError, TextNotSupportedError  # imports torch: not at `import vrec_utils.cli`
    from ..runners import RayUnavailableError  # imports extract (torch): not at `import vrec_utils.cli`

    return (
        UserError,
        CatalogError,
        ImageLoadError,
        FilesystemUnavailableError,
        ModelUnavailableError,
        RayUnavailableError,
        TextNotSupportedError,
        EmbeddingsNotFoundError,
        CacheError,
        KeyError,
        ValueError,
        FileNotFoundError,
    )


# ------------------------------------------------------------------ argument types (checked at parsing)


def _count(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


#: ``type=`` of counts that must be >= 1 (--limit, -k, --batch-size, ...)
positive_int = _count(1)
#: ``type=`` of counts that may be 0 (--workers, --warmup-steps, ...)
non_negative_int = _count(0)


def model_names(text: str) -> list[str]:
    """``type=`` of ``--models``: comma-separated names, at least one."""
    names = split_list(text)
    if not names:
        raise argparse.ArgumentTypeError(f"needs at least one model name, got {text!r}")
    return names


def directory_path(text: str) -> Path:
    """``type=`` of --workdir / --out: an existing folder, or one that can be created (nothing is
    created while parsing)."""
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder; give a folder (it is created if missing)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"folder {text!r} is not writable by you; choose another one")
        return path
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: folder {str(parent)!r} is not writable by you")
    return path


def check_device(value: str | None, flag: str = "--device") -> None:
    """Refuse a --device this machine lacks before any model is loaded."""
    if value is None or value == "auto":
        return
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise UserError(f"{flag} {value!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
            raise UserError(
                f"{flag} {value}: no CUDA GPU is visible here (torch {torch.__version__}, {build}); "
                "use --device cpu, or --device auto to take a GPU when there is one"
            )
        if device.index is not None and device.index >= count:
            raise UserError(f"{flag} {value}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UserError(f"{flag} mps: Apple MPS is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise UserError(f"{flag} {value!r}: vrec runs on cpu, cuda or mps")


def add_catalog_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--catalog", required=required, type=Path, help="catalog folder (styles.csv + images/) or CSV with id,image")
    parser.add_argument("--workdir", type=directory_path, default=DEFAULT_WORKDIR, help="cache and results folder (default: ./work)")


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


def positive_int_list(text: str | None, flag: str) -> list[int]:
    """``"5,10"`` -> ``[5, 10]`` (``[]`` for an empty value); anything else is a one-line error naming ``flag``."""
    try:
        values = [int(v) for v in split_list(text or "")]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise UserError(f"{flag} values must be at least 1, got {text!r}")
    return values
