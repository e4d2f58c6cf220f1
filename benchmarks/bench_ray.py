"""Images/s of `vrec extract --runner ray` (local Ray cluster: the default fused pipeline with 1
and 2 embedding actors, and the split decode-tasks/actors pipeline that GPU actors use) against
the local runner, same images, model and precision (fp32); the vectors are compared too.

The runs are interleaved in rounds (local, then Ray; the next round Ray first, then local), each
in its own fresh cache, so that other jobs on a shared machine slow both sides alike; the local
runner runs with no Ray cluster up (the cluster is started before, and shut down after, each
round's Ray runs; its start is not in the timings). The table gives each run's images/s, the
load average at its end, the ratio to the local run of the same round (the median ratio is the
number to quote), and where this run's CPU seconds went: the driver, its DataLoader workers
(reaped children), Ray's workers (actors, decode tasks) and Ray's system processes (raylet, GCS,
agents), with the CPU seconds per image of all of them: under load the images/s ratio measures
who wins the shared cores, the CPU seconds per image measure the engine's overhead. Ends with a *projected* table for N nodes, computed from the measured
per-worker rate (a projection, not a measurement: it assumes linear scaling and images already
on fast storage).

    RAY_worker_niceness=0 .venv/bin/python benchmarks/bench_ray.py     # 2,000 fashion-small images, 2 rounds
    .venv/bin/python benchmarks/bench_ray.py --n 500 --rounds 1 --model efficientnet-lite0
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
import psutil  # pinned in constraints.txt (ipython and the notebooks bring it)
from _machine import cpu_line

from vrec_utils.catalog import load_catalog
from vrec_utils.extract import extract_image_embeddings
from vrec_utils.models import create_embedder, get_model_entry
from vrec_utils.runners import RayOptions, ray_runner

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-small"
PROJECTED_NODES = (1, 4, 16, 64)
PROJECTED_IMAGES = (10_000_000, 100_000_000)


CPU_KINDS = ("driver", "reaped children", "other children", "ray workers", "ray system")
RAY_SETUPS = (("ray fused", 1, None), ("ray fused", 2, None), ("ray split", 1, False))  # (label, workers, fuse)


def cpu_seconds() -> dict[tuple[str, int], float]:
    """CPU seconds (user + system) so far of this process, the children it reaped (DataLoader
    workers) and each live descendant (Ray's system processes and its workers), keyed by
    (kind, pid): where the cores went during a run."""
    me = psutil.Process()
    own = me.cpu_times()
    out = {("driver", 0): own.user + own.system, ("reaped children", 0): own.children_user + own.children_system}
    for child in me.children(recursive=True):
        try:
            command, times = " ".join(child.cmdline()[:2]), child.cpu_times()
        except psutil.Error:
            continue
        kind = "ray workers" if command.startswith("ray::") else "ray system" if "ray" in command else "other children"
        out[(kind, child.pid)] = times.user + times.system
    return out


def run(label, catalog, factory, workdir, batch_size, runner=None) -> dict:
    before = cpu_seconds()
    result = extract_image_embeddings(catalog, factory(), workdir, batch_size=batch_size, precision="fp32", progress=False, runner=runner)
    after = cpu_seconds()
    print(f"{label}: {result.summary()}", flush=True)
    spent = {kind: 0.0 for kind in CPU_KINDS}
    for (kind, pid), seconds in after.items():
        spent[kind] += seconds - before.get((kind, pid), 0.0)
    return {"result": result, "images/s": result.images_per_second, "seconds": result.seconds, "load avg": os.getloadavg()[0],
            **{f"cpu s {kind}": round(value, 1) for kind, value in spent.items()}}  # fmt: skip


def local_run(catalog, factory, root, batch_size) -> dict:
    return {"runner": "local (DataLoader)", "workers": 1, **run("local", catalog, factory, root / "local", batch_size)}


def ray_round(ray, catalog, factory, root, batch_size) -> tuple[list[dict], float]:
    """Start a local cluster, run every Ray setup, shut it down; returns the runs and the start seconds."""
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    init_s = time.perf_counter() - start
    runs = []
    for label, workers, fuse in RAY_SETUPS:
        runner = ray_runner(factory, RayOptions(workers=workers, fuse=fuse))
        runs.append({"runner": label, "workers": workers, **run(f"{label} x{workers}", catalog, factory, root / f"{label}-{workers}".replace(" ", "-"), batch_size, runner)})
    ray.shutdown()
    return runs, init_s


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
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every runner (default 2)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    import ray  # optional extra: this benchmark needs it

    print(cpu_line())
    print(f"load average at start: {os.getloadavg()[0]:.1f} (other jobs may share these cores)")
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray renices workers to 15; the local runner runs at 0
    catalog = load_catalog(args.catalog).head(args.n)
    weights = None if get_model_entry(args.model)[0].offline else "random"
    factory = functools.partial(create_embedder, args.model, weights=weights, device="cpu")
    rows, init_times = [], []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        root = args.workdir or Path(tmp)
        for n in range(args.rounds):
            here = root / f"round{n}"
            if n % 2 == 0:  # local first, then Ray; the next round the other way round
                local = local_run(catalog, factory, here, args.batch_size)
                ray_runs, init_s = ray_round(ray, catalog, factory, here, args.batch_size)
            else:
                ray_runs, init_s = ray_round(ray, catalog, factory, here, args.batch_size)
                local = local_run(catalog, factory, here, args.batch_size)
            runs = [local, *ray_runs]
            init_times.append(init_s)
            base = runs[0]["result"].embeddings
            for r in runs:
                emb = r.pop("result").embeddings
                assert emb.ids.tolist() == base.ids.tolist(), "the runners embedded different items"
                r["max |diff| vs local"] = float(np.max(np.abs(np.asarray(emb.vectors) - np.asarray(base.vectors))))
                r["ratio vs local"] = r["images/s"] / runs[0]["images/s"]
                r["cpu s/img"] = sum(r[f"cpu s {kind}"] for kind in CPU_KINDS) / max(1, len(emb.ids))
                r["cpu-time ratio vs local"] = runs[0]["cpu s/img"] / r["cpu s/img"]  # > 1: fewer CPU seconds per image
                rows.append({"round": n, **r})
    table = pd.DataFrame(rows)
    print(f"\n{args.n} images, {args.model} ({'real' if weights is None else 'random'} weights), fp32, batch {args.batch_size}; "
          f"Ray cluster start {np.mean(init_times):.1f} s (not in the timings); load average now {os.getloadavg()[0]:.1f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    summary = table.groupby(["runner", "workers"], sort=False)[["images/s", "ratio vs local", "cpu s/img", "cpu-time ratio vs local", "load avg"]].median()
    print(f"\nmedian over {args.rounds} round(s) (ratio: against the local run of the same round):")
    print(summary.to_string(float_format=lambda v: f"{v:.3g}"))
    fused = summary.loc[("ray fused", 1), "ratio vs local"]
    cpu = summary.loc[("ray fused", 1), "cpu-time ratio vs local"]
    print(f"\nRATIO ray (fused, 1 actor) / local = {fused:.2f} images/s (target >= 0.8); CPU seconds per image, local / ray = {cpu:.2f} "
          "(the load-independent view: on a quiet machine where both keep the cores busy, the images/s ratio approaches it)")
    best = table.loc[table["runner"] != "local (DataLoader)", "images/s"].max()
    print(f"\nPROJECTION (not measured): N CPU nodes like this one at the best measured Ray rate ({best:.1f} img/s per node), linear scaling assumed")
    print(projection(best, "this CPU node").to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
