"""`vrec models`: what is registered and what loads on this machine."""

from __future__ import annotations

import argparse

from ..models import list_models
from ..models.availability import check_availability
from ._common import print_frame


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models and whether their weights are available here")
    p.add_argument("--all", action="store_true", help="include tiny test models")
    p.add_argument("--no-check", action="store_true", help="skip the (fast, offline) availability check")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    frame = list_models(include_tests=args.all)
    if not args.no_check:
        frame["available_here"] = [check_availability(name) for name in frame["name"]]
    if not args.json:
        frame["description"] = frame["description"].str.slice(0, 80)
    print_frame(frame, as_json=args.json)
    return 0
