"""Images/s of `vrec extract --runner ray` (local Ray cluster, 1 and 2 embedding actors) against the
local runner, same images, model and precision (fp32), measured in the same run; the vectors
are compared too. Ends with a *projected* table for N nodes, computed from the measured
per-worker rate (a projection, not a measurement: it assumes linear scaling and images
already on fast storage).

    .venv/bin/python benchmarks/bench_ray.py               # 2,000 fashion-small images
    .venv/bin/python benchmarks/bench_ray.py --n 500 --model efficientnet-lite0
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _machine import cpu_line

from vrec_utils.catalog import load_catalog
from vrec_utils.extract import extract_image_embeddings
from vrec_utils.models import create_embedder, get_model_entry
from vrec_utils.runners import RayOptions, ray_runner

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-small"
PROJECTED_NODES = (1, 4, 16, 64)
PROJECTED_IMAGES = (10_000_000, 100_000_000)


def run(label, catalog, factory, workdir, batch_size, runner=None):
    result = extract_image_embeddings(catalog, factory(), workdir, batch_size=batch_size, precision="fp32", progress=False, runner=runner)
    print(f"{label}: {result.summary()}", flush=True)
    return result


def projection(rate_per_node: float, what: str) -> pd.DataFrame:
    rows = []
    for nodes in PROJECTED_NODES:
        row = {"nodes": nodes, "node kind": what, "images/s (projected)": rate_per_node * nodes}
        for n in PROJECTED_IMAGES:
            row[f"hours for {n / 1e6:.0f}M (projected)"] = n / (rate_per_node * nodes) / 3600
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    import ray  # optional extra: this benchmark needs it

    print(cpu_line())
    print(f"load average at start: {os.getloadavg()[0]:.1f} (other jobs may share these cores)")
    catalog = load_catalog(args.catalog).head(args.n)
    weights = None if get_model_entry(args.model)[0].offline else "random"
    factory = functools.partial(create_embedder, args.model, weights=weights, device="cpu")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        root = args.workdir or Path(tmp)
        local = run("local", catalog, factory, root / "local", args.batch_size)
        start = time.perf_counter()
        os.environ.setdefault("RAY_worker_niceness", "0")  # Ray renices workers to 15; the local runner runs at 0
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
        init_s = time.perf_counter() - start
        rows = [{"runner": "local (DataLoader)", "workers": 1, "images/s": local.images_per_second, "seconds": local.seconds, "max |diff| vs local": 0.0}]
        for workers in (1, 2):
            result = run(f"ray x{workers}", catalog, factory, root / f"ray{workers}", args.batch_size, ray_runner(factory, RayOptions(workers=workers)))
            diff = float(np.max(np.abs(np.asarray(result.embeddings.vectors) - np.asarray(local.embeddings.vectors))))
            assert result.embeddings.ids.tolist() == local.embeddings.ids.tolist()
            rows.append({"runner": "ray", "workers": workers, "images/s": result.images_per_second, "seconds": result.seconds, "max |diff| vs local": diff})
        ray.shutdown()
    table = pd.DataFrame(rows)
    table["ratio vs local"] = table["images/s"] / local.images_per_second
    print(f"\n{args.n} images, {args.model} ({'real' if weights is None else 'random'} weights), fp32, batch {args.batch_size}; "
          f"Ray cluster start {init_s:.1f} s (not in the timings); load average now {os.getloadavg()[0]:.1f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    best = table.loc[table["runner"] == "ray", "images/s"].max()
    print(f"\nPROJECTION (not measured): N CPU nodes like this one at the best measured Ray rate ({best:.1f} img/s per node), linear scaling assumed")
    print(projection(best, "this CPU node").to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
