"""The arguments the fine-tuning study benchmarks share: the catalogue, the shifted catalogue, the
workdir, bootstrap resamples and where results go (bench_finetune_recipes, bench_mixed_catalog,
bench_mixed_rule, bench_routed_in_domain)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def add_study_arguments(parser: argparse.ArgumentParser, out_name: str, workdir: Path | None = None) -> None:
    """``--catalog`` (fashion-small, or $VREC_FASHION_SMALL), ``--shift-catalog`` (clothing-dev),
    ``--workdir`` (required unless ``workdir`` gives a default), ``--n-bootstrap`` and ``--out``
    (``benchmarks/results/<out_name>``)."""
    parser.add_argument("--catalog", type=Path, default=Path(os.environ.get("VREC_FASHION_SMALL", REPO.parent / "shared" / "data" / "fashion-small")))
    parser.add_argument("--shift-catalog", type=Path, default=REPO.parent / "shared" / "data" / "clothing-dev")
    if workdir is None:
        parser.add_argument("--workdir", type=Path, required=True)
    else:
        parser.add_argument("--workdir", type=Path, default=workdir)
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / out_name)
