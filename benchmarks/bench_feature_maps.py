"""Notebook 07's feature-map step: the old decode path against the one ``vrec extract`` uses.

``vrec_utils.train.feature_maps.extract_feature_maps`` used a DataLoader (one worker process) and the
per-image float transform; it now decodes like ``vrec extract`` (``image_batches``: a thread pool in
this process on the CPU; ``split_transform``: uint8 PIL stage, per-batch normalisation). This runs
both on the same images, alternating A, B, A, B in one run (the machine is shared: compare within
the run), and prints wall seconds and CPU seconds (this process and its finished children, which
a freeze of the job does not inflate). A (the baseline, kept here only) computes the maps in memory;
B is ``extract_feature_maps`` into a fresh folder (what the notebook runs). Checks that both give
the same maps.

Usage::

    .venv/bin/python benchmarks/bench_feature_maps.py [--n 1000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import cpu_line

from vrec_utils.catalog import load_catalog
from vrec_utils.extract import ImageDataset, collate_skipping_failures
from vrec_utils.models import create_embedder
from vrec_utils.train.feature_maps import extract_feature_maps


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def old_path(paths: list[str], tower, batch_size: int = 64) -> np.ndarray:
    """The previous extract_feature_maps loop: DataLoader, one worker, per-image float transform."""
    loader = DataLoader(ImageDataset(paths, tower.image_transform), batch_size=batch_size, num_workers=1, collate_fn=collate_skipping_failures)
    out = []
    for _, pixels, _ in loader:
        if tower.prefers_channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out.append(tower.encode_maps(pixels).float().numpy().astype(np.float16))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=Path(os.environ.get("VREC_FASHION_SMALL", REPO.parent / "shared" / "data" / "fashion-small")))
    parser.add_argument("--n", type=int, default=1000, help="images (the catalogue's first N)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "feature_maps_decode")
    args = parser.parse_args(argv)

    print(cpu_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the 2 cores are shared with other jobs")
    catalog = load_catalog(args.catalog).head(args.n)
    tower = create_embedder("efficientnet-lite0", device="cpu")
    paths = [str(catalog.image_path(i)) for i in catalog.ids]
    rows, maps = [], {}
    for repeat in range(args.repeats):
        for variant in ("A: DataLoader + per-image transform", "B: image_batches + split_transform"):
            wall, cpu = time.perf_counter(), cpu_seconds()
            if variant.startswith("A"):
                got = old_path(paths, tower)
            else:
                with tempfile.TemporaryDirectory(prefix="s9-ft13-maps-") as work:
                    got = np.array(extract_feature_maps(catalog, tower, work, progress=False).maps)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            maps.setdefault(variant, got)
            rows.append({"repeat": repeat, "variant": variant, "images": len(paths), "wall s": round(wall, 2), "cpu s": round(cpu, 2), "img/s wall": round(len(paths) / wall, 1)})
            print(rows[-1], flush=True)
    a, b = maps.values()
    same = bool(np.array_equal(a, b))
    table = pd.DataFrame(rows)
    summary = table.groupby("variant", sort=False)[["wall s", "cpu s"]].median()
    ratio = summary.iloc[0] / summary.iloc[1]
    print(f"\nmaps identical: {same}\n{summary}\nA / B (median): wall {ratio['wall s']:.2f}x, cpu {ratio['cpu s']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    args.out.with_suffix(".md").write_text(
        f"{cpu_line()}; the 2 cores were shared with other jobs (compare A and B within this run)\n\n"
        f"`{' '.join(['benchmarks/bench_feature_maps.py', *(argv if argv is not None else sys.argv[1:])])}`\n\n"
        f"{table.to_markdown(index=False)}\n\nMedians: A {summary.iloc[0]['wall s']:.1f} s wall / {summary.iloc[0]['cpu s']:.1f} s CPU, "
        f"B {summary.iloc[1]['wall s']:.1f} s wall / {summary.iloc[1]['cpu s']:.1f} s CPU; A / B: wall {ratio['wall s']:.2f}x, "
        f"CPU {ratio['cpu s']:.2f}x. Maps identical: {same}.\n"
    )
    print(f"wrote {args.out.with_suffix('.md')}, .csv")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
