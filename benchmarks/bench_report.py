"""Wall time of the demo (`vrec report`) from a clean cache, then again with the cache warm.

Both runs use the same fresh work directory: the first computes the embeddings (and, in the
offline profile, fine-tunes mini-SigLIP), the second must find everything cached. Printed: each
run's total and per-notebook seconds, and what the second run's embeddings notebook recomputed
(it must be nothing). Target for the offline profile on the bundled sample: under 10 minutes on a
2-core CPU from a clean cache.

    .venv/bin/python benchmarks/bench_report.py                      # offline profile, bundled sample
    .venv/bin/python benchmarks/bench_report.py --profile smoke --sample-size 120
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from vrec_utils.report import run_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="offline")
    parser.add_argument("--catalog", type=Path, default=None, help="default: the bundled sample")
    parser.add_argument("--sample-size", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep the work and report folders here (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vrec-bench-report-") as tmp:
        base = args.keep or Path(tmp)
        runs = {}
        for name in ("clean cache", "warm cache"):
            started = time.perf_counter()
            result = run_report(
                args.profile, catalog=args.catalog, out=base / name.replace(" ", "-"), workdir=base / "work",
                sample_size=args.sample_size, progress=False, log=lambda line: None,
            )
            runs[name] = {"total": time.perf_counter() - started, **result.seconds}
            extraction = pd.read_csv(result.tables_dir / "embeddings.csv")
            runs[name]["embedded now"] = int(extraction["embedded now"].sum())
        table = pd.DataFrame(runs).T
        table.insert(0, "resolve + export", table["total"] - table[list(result.seconds)].sum(axis=1))
        print(f"profile {result.profile}, models {', '.join(result.models)}, {os.cpu_count()} CPU cores")
        print(table.round(1).to_string())
        print(f"warm / clean: {runs['warm cache']['total'] / runs['clean cache']['total']:.2f}")
        print(json.dumps({k: round(v["total"], 1) for k, v in runs.items()}))


if __name__ == "__main__":
    main()
