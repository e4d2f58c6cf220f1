"""The ``vrec`` command line: one subcommand per library function, no logic of its own.

Each subcommand lives in a module of this package exposing ``register(subparsers)``; the
module's handler returns an exit code. Errors users can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._common import UserError, error_types

# Subcommand modules, in the order `vrec --help` lists them.
_COMMANDS = ("extract", "models", "index", "search", "evaluate", "finetune", "report", "data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vrec",
        description="Visual product recommendation workbench: CNN vs vision-language embeddings.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    import importlib

    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"vrec_utils.cli.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name == f"vrec_utils.cli.{name}_cmd":
                continue  # not written yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("vrec: interrupted; cached work is kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except error_types() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"vrec {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
