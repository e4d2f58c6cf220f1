"""Where extraction time goes, per model and engine, against the source article's plain loop.

For each model and engine (torch, openvino when installed) on the same images:

* ``prep img/s``: decode + preprocess alone (one thread: the PIL stage to the uint8 batch);
* ``forward img/s``: the engine alone on a batch already in memory, in the form and the way the
  pipeline feeds it (:func:`vrec_utils.extract.encode_batches`: OpenVINO's queued parts over its
  streams, torch one batch at a time; the normalisation included: torch's in Python, OpenVINO's
  inside the compiled model);
* ``pipeline img/s``: ``vrec extract``'s steady rate (decoding, engine and cache writes; on a CPU
  the decode threads run between torch's forward passes, or while OpenVINO's streams run the
  batch before, see :func:`vrec_utils.extract.image_batches` and ``encode_batches``),
  timed in whole calls after the first (the engine compiled and warm, as on every batch of a long
  run but the first few), in ``--rounds`` rounds interleaved with the forward loop (medians;
  ``pipeline/forward per round`` shows the spread), and ``pipeline/forward``, the share of the forward rate the pipeline keeps
  (target >= 0.9 for ResNet50 and SigLIP-B/16, >= 0.8 for efficientnet-lite0); ``pipeline img/s,
  first call``: the first call's rate, which also pays the engine's first passes at the batch
  shape and the loader's start (on 1,024 images at ~180 img/s, a 0.8 s start is 13% of the run);
* ``whole vs article``: the article loop's seconds over the whole ``extract_image_embeddings``
  call's in a fresh workdir (model export/compile, the fp32 check, precision auto's measurement
  and cache writes included): how many times faster the whole is; ``whole (compiled cached)``:
  the same call again in that workdir with its vectors deleted (a second catalog's first run: the
  compiled model and the precision decision are found under ``<workdir>/engines``);
  ``outside extraction s``: the first whole call's seconds outside its steady extraction loop.

The article's loop: open a batch of images with PIL, run the model's preprocessing, forward in
fp32 under ``no_grad``, one process, no DataLoader. Models without offline weights (resnet50,
siglip-base) run with the real architecture and random weights: the arithmetic is the same.
Results are printed and saved to benchmarks/results/extract-<host>.csv.

    .venv/bin/python benchmarks/bench_extract.py --n 512
    .venv/bin/python benchmarks/bench_extract.py --models efficientnet-lite0 --n 1024 --engines openvino
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_line

from vrec_utils.catalog import load_catalog
from vrec_utils.engines import openvino_engine, select_engine
from vrec_utils.extract import encode_batches, extract_image_embeddings
from vrec_utils.images import load_rgb, pixel_batch
from vrec_utils.models import create_embedder, get_model_entry

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-small"
RESULTS = Path(__file__).resolve().parent / "results"


def article_loop(embedder, paths: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    """The baseline, written the way the article's extractor is."""
    outputs = []
    start = time.perf_counter()
    for begin in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[begin : begin + batch_size]]
        pixels = torch.stack([embedder.image_transform(im) for im in images])
        with torch.no_grad():
            outputs.append(embedder.encode_image(pixels).float().numpy())
    return time.perf_counter() - start, np.concatenate(outputs)


def prep_rate(embedder, paths: list[str], batch_size: int) -> float:
    """Decode + the batch the engine takes (pixel_batch: the PIL stage's uint8 where the transform
    splits; the engine's own normalisation counts in its forward rate, as in the pipeline)."""
    start = time.perf_counter()
    for begin in range(0, len(paths), batch_size):
        pixel_batch([load_rgb(p) for p in paths[begin : begin + batch_size]], embedder.image_transform)
    return len(paths) / (time.perf_counter() - start)


def forward_rate(engine, pixels: torch.Tensor, seconds: float) -> float:
    # Warm-up, the way the timed loop runs: the trace, then TorchScript's profiling executor
    # optimises on the next calls (one warm-up call left the optimisation inside the timed loop, so
    # forward came out below pipeline); OpenVINO's queued parts have their own, smaller shapes.
    for _ in encode_batches(engine, [(None, pixels)] * 3, normalize=False):
        pass
    done, start = 0, time.perf_counter()

    def same_batch_until_time_is_up():
        while time.perf_counter() - start < seconds:
            yield None, pixels

    for _, vectors in encode_batches(engine, same_batch_until_time_is_up(), normalize=False):
        done += len(vectors)
    return done / (time.perf_counter() - start)


def measure(name: str, engine_name: str, catalog, args, base_s: float, base_vecs: np.ndarray, prep: float) -> dict:
    offline = get_model_entry(name)[0].offline
    embedder = create_embedder(name, weights=None if offline else "random", device="cpu")
    paths = catalog.items["image"].tolist()
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as workdir:
        def whole_call():
            start = time.perf_counter()  # the whole call: export/compile (or trace) and cache writes too
            result = extract_image_embeddings(
                catalog, embedder, workdir, batch_size=args.batch_size, num_workers=args.workers,
                precision=args.precision, engine=engine_name, progress=False,
            )  # fmt: skip
            return result, time.perf_counter() - start

        result, whole = whole_call()  # a first run: nothing in <workdir>/engines yet
        engine = select_engine(engine_name, embedder, result.precision, workdir)  # the run's precision, its compiled model
        images = [load_rgb(p) for p in paths[: args.batch_size]]  # in the form the pipeline feeds the engine
        batch = pixel_batch(images, embedder.image_transform)
        # Rounds of (pipeline, forward) interleaved, medians reported: on a shared host the rate
        # drifts by 10% within a minute, so one pipeline call against one forward loop is a coin toss.
        # Each pipeline call is a second catalog in the same workdir: the vectors are new, the
        # compiled model (and the precision auto decision) are found under <workdir>/engines.
        rounds = []
        for _ in range(args.rounds):
            shutil.rmtree(Path(workdir) / "embeddings")
            cached, whole_cached = whole_call()
            assert cached.n_new == result.n_new, "the cached run must embed every image again"
            rounds.append((cached.images_per_second, forward_rate(engine, batch, args.forward_seconds), whole_cached))
    pipeline, forward, whole_cached = (float(np.median(column)) for column in zip(*rounds))
    ratio = float(np.median([p / f for p, f, _ in rounds]))
    vecs = np.asarray(result.embeddings.vectors)
    base_norm = base_vecs / np.linalg.norm(base_vecs, axis=1, keepdims=True)
    return {
        "model": name,
        "weights": "real" if offline else "random (same arithmetic)",
        "engine": f"{result.engine} {result.precision}",
        "prep img/s": prep,
        "forward img/s": forward,
        "pipeline img/s": pipeline,
        "pipeline/forward": ratio,
        "pipeline/forward per round": " ".join(f"{p / f:.3f}" for p, f, _ in rounds),
        "pipeline img/s, first call": result.images_per_second,
        "article img/s": len(paths) / base_s,
        "whole vs article": base_s / whole,
        "whole (compiled cached) vs article": base_s / whole_cached,
        "whole s": whole,
        "whole (compiled cached) s": whole_cached,
        "outside extraction s": whole - result.seconds,
        "min cosine vs fp32": float(np.min(np.sum(base_norm * vecs, axis=1))),
        "why": result.engine_reason.split(" in /")[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--models", default="efficientnet-lite0,resnet50,siglip-base")
    parser.add_argument("--engines", default="torch,openvino")
    parser.add_argument("--n", type=int, default=512, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: vrec's: decode threads on a CPU)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--forward-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved (pipeline, forward) rounds; medians are reported")
    parser.add_argument("--out", type=Path, default=None, help="results CSV (default: benchmarks/results/extract-<host>.csv)")
    parser.add_argument("--note", default="", help="saved with the results, e.g. 'cores shared with other jobs'")
    args = parser.parse_args()

    engines = args.engines.split(",")
    if "openvino" in engines and openvino_engine.openvino_module() is None:
        print(f"OpenVINO not installed, timing torch only ({openvino_engine.INSTALL})")
        engines = [e for e in engines if e != "openvino"]
    catalog = load_catalog(args.catalog).head(args.n)
    paths = catalog.items["image"].tolist()
    print(cpu_line())
    print(f"{len(paths)} images from {args.catalog}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    rows = []
    for name in args.models.split(","):
        offline = get_model_entry(name)[0].offline
        embedder = create_embedder(name, weights=None if offline else "random", device="cpu")
        article_loop(embedder, paths[: args.batch_size], args.batch_size)  # warm-up
        base_s, base_vecs = article_loop(embedder, paths, args.batch_size)
        prep = prep_rate(embedder, paths, args.batch_size)
        del embedder
        for engine_name in engines:
            rows.append(measure(name, engine_name, catalog, args, base_s, base_vecs, prep))
            print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    frame = pd.DataFrame(rows)
    frame.insert(0, "cpu", cpu_line())
    frame["images"], frame["note"] = len(paths), args.note
    print()
    print(frame.drop(columns=["cpu", "why", "images", "note"]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"extract-{platform.node() or 'host'}.csv"
    frame.to_csv(out, index=False)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
