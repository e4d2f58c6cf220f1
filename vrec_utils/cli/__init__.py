"""The ``vrec`` command line: one subcommand per library function, no logic of its own.

Each subcommand lives in a module of this package exposing ``register(subparsers)``; the
module's handler returns an exit code.

Errors: a failure users can fix (a setting, a file, the disk, a device, the Elasticsearch server,
a refused checkpoint) prints ONE line ``vrec <cmd>: error: ...`` and exits 2; anything else is a
bug and prints one line too, exit 1. ``--debug`` (or ``VREC_DEBUG=1``) adds the traceback.
Nothing printed carries a secret (see :mod:`vrec_utils.redact`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import NoReturn

from ..redact import known_secrets, redact_text
from ._common import UserError, check_device
from ._errors import describe_error, one_line

# Subcommand modules, in the order `vrec --help` lists them.
_COMMANDS = ("extract", "models", "index", "search", "evaluate", "decide", "finetune", "report", "data")
DEBUG_HELP = "show the traceback of an error (also VREC_DEBUG=1)"


class ArgumentError(Exception):
    """A command line argparse refused; ``prog`` is the (sub)command it belongs to."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class VrecParser(argparse.ArgumentParser):
    """Argument errors as one line (``vrec extract: error: argument --limit: ...``), not usage + error."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = VrecParser(
        prog="vrec",
        description="Visual product recommendation workbench: CNN vs vision-language embeddings.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:  # imported here, not at `import vrec_utils.cli`: extract and finetune import torch
        try:
            module = importlib.import_module(f"vrec_utils.cli.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name == f"vrec_utils.cli.{name}_cmd":
                continue  # not written yet
            raise
        module.register(sub)
    _add_debug_flag(sub)
    return parser


def _add_debug_flag(sub: argparse._SubParsersAction) -> None:
    """``--debug`` after the subcommand too (``vrec extract ... --debug``), at every level."""
    for parser in set(sub.choices.values()):
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug_flag(action)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("VREC_DEBUG", "").strip().lower() in ("1", "true", "yes")
    try:
        args = build_parser().parse_args(argv)
    except ArgumentError as exc:
        _error(exc.prog, f"{exc}; see `{exc.prog} --help`")
        return 2
    debug = debug or args.debug
    command = " ".join(p for p in (args.command, getattr(args, "verb", None)) if p)
    with _one_line_warnings(command, debug):
        try:
            check_device(getattr(args, "device", None))
            return int(args.handler(args) or 0)
        except KeyboardInterrupt:
            print("vrec: interrupted; cached work is kept, rerun the same command to resume", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - the one place that turns failures into messages
            if debug:
                print(redact_text("".join(traceback.format_exc()), known_secrets()), end="", file=sys.stderr)
            message = describe_error(exc, args)
            if message is not None:
                _error(f"vrec {command}", message)
                return 2
            hint = "" if debug else "; run with --debug for the traceback"
            _error(f"vrec {command}", f"unexpected {type(exc).__name__}: {one_line(exc) or '(no message)'} (a bug: please report it{hint})")
            return 1


def _error(prog: str, message: str) -> None:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)


@contextlib.contextmanager
def _one_line_warnings(command: str, debug: bool) -> Iterator[None]:
    """Warnings (ours and libraries') as ``vrec <cmd>: warning: ...`` lines, secrets masked; log
    records of libraries without a handler (e.g. the Elasticsearch transport) likewise."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        where = f" [{category.__name__} at {filename}:{lineno}]" if debug else ""
        print(f"vrec {command}: warning: {one_line(message)}{where}", file=sys.stderr)

    class OneLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            level = record.levelname.lower()
            print(f"vrec {command}: {level}: {one_line(record.getMessage())}", file=sys.stderr)

    root = logging.getLogger()
    handler = None
    if not root.handlers:  # leave a configured logging setup alone
        handler = OneLine(logging.WARNING)
        root.addHandler(handler)
    # "Node <...> has failed for 1 times in a row": the error line that follows says it better
    node_pool = logging.getLogger("elastic_transport.node_pool")
    node_pool_level = node_pool.level
    if not debug:
        node_pool.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            yield
        finally:
            node_pool.setLevel(node_pool_level)
            if handler is not None:
                root.removeHandler(handler)


__all__ = ["UserError", "build_parser", "main"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
