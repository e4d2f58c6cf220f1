"""Images/s of `vrec extract` against the source article's straightforward loop, same images and model.

The article's loop: open a batch of images with PIL, run the model's preprocessing, forward in
fp32 under ``no_grad``, one process, no DataLoader. vrec: DataLoader workers decode while the model
runs, ``inference_mode``, channels_last for CNNs, bf16 autocast where the CPU/GPU runs it natively.

Models without offline weights (resnet50, siglip-base) are timed with the real architecture and
random weights (``--weights random``): the arithmetic is the same as with the trained weights.

    .venv/bin/python benchmarks/bench_extract.py --n 512
    .venv/bin/python benchmarks/bench_extract.py --models efficientnet-lite0 --n 12000   # the full run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from vrec_utils.catalog import load_catalog
from vrec_utils.extract import extract_image_embeddings
from vrec_utils.models import create_embedder, get_model_entry

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-small"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--models", default="efficientnet-lite0,resnet50,siglip-base")
    parser.add_argument("--n", type=int, default=512, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    catalog = load_catalog(args.catalog).head(args.n)
    paths = catalog.items["image"].tolist()
    print(f"{len(paths)} images from {args.catalog}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    rows = []
    for name in args.models.split(","):
        offline = get_model_entry(name)[0].offline
        weights = None if offline else "random"
        embedder = create_embedder(name, weights=weights, device="cpu")
        article_loop(embedder, paths[: args.batch_size], args.batch_size)  # warm-up
        base_s, base_vecs = article_loop(embedder, paths, args.batch_size)
        with tempfile.TemporaryDirectory() as workdir:
            result = extract_image_embeddings(
                catalog, embedder, workdir, batch_size=args.batch_size, precision=args.precision, progress=False
            )
            vecs = np.asarray(result.embeddings.vectors)
        base_norm = base_vecs / np.linalg.norm(base_vecs, axis=1, keepdims=True)
        cosine = float(np.min(np.sum(base_norm * vecs, axis=1)))
        rows.append(
            {
                "model": name,
                "weights": "real" if offline else "random (same arithmetic)",
                "article img/s": len(paths) / base_s,
                "vrec img/s": result.images_per_second,
                "speed-up": (len(paths) / result.seconds) / (len(paths) / base_s),
                "precision": result.precision,
                "min cosine vs fp32": cosine,
            }
        )
        print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    print()
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
