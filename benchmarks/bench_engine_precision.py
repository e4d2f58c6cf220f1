"""Which precision OpenVINO should run by default: speed and agreement with torch fp32, per tower.

For each model, on the same real inputs (fashion-small images through the model's transform, or
fashion-small titles for text towers), in one process so the ratios share the machine's state:

* ``forward/s``: forward-only rate of each engine and precision (images or texts per second);
* ``vs torch best``: that rate over the fastest torch precision's in the same run (torch's best:
  the frozen bf16 trace for CNNs on bf16-native CPUs);
* ``min cosine`` / ``mean cosine``: to torch fp32 on every input, and ``top5 same``: the share of
  inputs whose 5 nearest neighbours (among the inputs) are torch fp32's.

Image models without offline weights run random weights (the same arithmetic; their cosines say
little). Results are printed and saved to benchmarks/results/engine-precision-<host>.csv.

    .venv/bin/python benchmarks/bench_engine_precision.py --n 256 --seconds 5
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_line

from vrec_utils.catalog import load_catalog
from vrec_utils.engines import select_engine, select_text_engine
from vrec_utils.images import load_rgb
from vrec_utils.models import create_embedder, get_model_entry

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-small"
RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = (("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"))


def rate(encode, batch, seconds: float) -> float:
    encode(batch)  # warm-up (and the torch trace)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encode(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def agreement(vectors: torch.Tensor, reference: torch.Tensor) -> dict:
    vectors, reference = (torch.nn.functional.normalize(v, dim=-1) for v in (vectors, reference))
    cosine = (vectors * reference).sum(1)

    def top5(v: torch.Tensor) -> torch.Tensor:
        scores = v @ v.T
        scores.fill_diagonal_(-2.0)
        return scores.topk(5).indices.sort(dim=1).values

    return {"min cosine": cosine.min().item(), "mean cosine": cosine.mean().item(), "top5 same": (top5(vectors) == top5(reference)).all(1).float().mean().item()}


def measure(name: str, catalog, args, workdir: Path) -> list[dict]:
    offline = get_model_entry(name)[0].offline
    embedder = create_embedder(name, weights=None if offline else "random", device="cpu")
    text = not embedder.has_image
    if text:
        inputs = catalog.items["title"].tolist()
        batches = [inputs[i : i + args.batch_size] for i in range(0, len(inputs), args.batch_size)]
    else:
        pixels = torch.stack([embedder.image_transform(load_rgb(p)) for p in catalog.items["image"]])
        batches = list(pixels.split(args.batch_size))
    rows, outputs = [], {}
    for engine_name, precision in SETTINGS:
        if text:
            engine = select_text_engine(engine_name, embedder, precision, workdir, check=batches[0][:16])
            encode = engine.encode_texts
        else:
            engine = select_engine(engine_name, embedder, precision, workdir, check=batches[0][:8])
            encode = engine.encode_images
        outputs[engine_name, precision] = torch.cat([encode(b) for b in batches])
        label = f"{engine.name} {getattr(engine, 'hint', engine.precision)}"
        rows.append({"model": name, "weights": "real" if offline else "random (same arithmetic)", "engine": label, "forward/s": rate(encode, batches[0], args.seconds)})
        print(f"  {name} {label}: {rows[-1]['forward/s']:.1f}/s", flush=True)
    best_torch = max(r["forward/s"] for r in rows if r["engine"].startswith("torch"))
    for row, setting in zip(rows, SETTINGS):
        row["vs torch best"] = row["forward/s"] / best_torch
        row.update(agreement(outputs[setting], outputs["torch", "fp32"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--models", default="efficientnet-lite0,resnet50,minilm")
    parser.add_argument("--n", type=int, default=256, help="images or titles per model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="forward-only timing per engine and precision")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    catalog = load_catalog(args.catalog).head(args.n)
    print(cpu_line())
    print(f"{args.n} inputs from {args.catalog}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as workdir:
        for name in args.models.split(","):
            rows += measure(name, catalog, args, Path(workdir))
    frame = pd.DataFrame(rows)
    print()
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    frame.insert(0, "cpu", cpu_line())
    frame["inputs"], frame["note"] = args.n, args.note
    out = args.out or RESULTS / f"engine-precision-{platform.node() or 'host'}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
