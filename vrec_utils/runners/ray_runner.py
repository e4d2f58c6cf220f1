"""The Ray runner: decode in Ray CPU tasks, embed in actors that hold the model once.

``vrec extract --runner ray`` builds a Ray Dataset of the items still to embed (one block per
cache chunk), decodes and preprocesses them in CPU tasks with the model's own ``image_transform``,
embeds them in a pool of actors (``concurrency=workers``, ``num_gpus=gpus_per_worker``) and streams
the vectors back to the driver, which files them through the same :class:`ChunkWriter` and cache
as the local runner (one writer: no second code path writes the store). So:

* a driver killed mid-run leaves whole chunks behind; a rerun embeds only what they lack;
* a worker killed mid-run is restarted by Ray and its task retried (Ray Data's actor defaults,
  ``max_restarts=-1``, ``max_task_retries=-1``); a row arriving twice is filed once;
* an unreadable image travels as a row with an error and is reported once, in ``skipped.csv``.

Ray is an optional extra (``pip install 'vrec[ray]'``): it is imported only when this runner runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..engines import TorchEngine
from ..extract import ChunkWriter, ImageDataset, encode_batch
from ..models.base import Embedder
from ..store import EmbeddingCache

RAY_VERSION = "2.60.0"
RAY_INSTALL = f"pip install 'vrec[ray]'   (or: pip install 'ray[data]=={RAY_VERSION}')"
DEFAULT_OBJECT_STORE_BYTES = 200 * 1024**2  # a local cluster started here: small, the machine is shared


class RayUnavailableError(RuntimeError):
    """Ray Data is not installed; the message is the install command."""


def require_ray():
    """The ``ray`` module with Ray Data, or :class:`RayUnavailableError` naming the install command."""
    try:
        import ray  # optional extra, heavy: imported only by the Ray runner
        import ray.data
    except ImportError as exc:
        raise RayUnavailableError(f"--runner ray needs Ray Data, which is not installed here; install it with: {RAY_INSTALL}") from exc
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run.

    ``address``: ``None`` uses the cluster this process already joined, else starts a local one;
    ``"auto"`` joins the cluster started with ``ray start`` on this machine; ``"ray://host:10001"``
    or ``"host:6379"`` joins a remote one. ``workers``: embedding actors (each holds the model
    once). ``gpus_per_worker``: 0 embeds on CPUs. ``threads_per_worker``: torch threads of a CPU
    actor (default: this machine's cores / workers). ``decode_cpus``: logical CPUs each decode
    task reserves (decoding 60x80 JPEGs is cheap next to the model).
    """

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None
    decode_cpus: float = 0.25
    object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")

    @property
    def threads(self) -> int:
        if self.threads_per_worker:
            return self.threads_per_worker
        return max(1, (os.cpu_count() or 1) // self.workers)


def ensure_ray(options: RayOptions):
    """Join (or start) the cluster ``options`` names; a session already joined is kept."""
    ray = require_ray()
    if not ray.is_initialized():
        local = options.address is None
        ray.init(
            address=options.address,
            include_dashboard=False,
            log_to_driver=False,
            **({"object_store_memory": options.object_store_memory} if local else {}),
        )
    return ray


# ================================================================================ stages
def decode_batch(batch: dict[str, np.ndarray], transform, pixel_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """CPU task: paths -> the model's input tensors; an unreadable image becomes a row with an
    error (and zero pixels), decoded by the same :class:`ImageDataset` as the local runner."""
    dataset = ImageDataset([str(p) for p in batch["path"]], transform)
    pixels = np.zeros((len(dataset), *pixel_shape), dtype=np.float32)
    errors = []
    for n in range(len(dataset)):
        _, tensor, error = dataset[n]
        if tensor is not None:
            if tuple(tensor.shape) != pixel_shape:
                tensor, error = None, f"preprocessed to shape {tuple(tensor.shape)}, the model takes {pixel_shape}"
            else:
                pixels[n] = tensor.numpy()
        errors.append(error)
    return {"id": batch["id"], "error": np.asarray(errors, dtype=object), "pixels": pixels}


class EmbedActor:
    """Holds one model; embeds the readable rows of each batch (the others pass through)."""

    def __init__(self, factory: Callable[[], Embedder], identity: dict, precision: str, normalize: bool, threads: int) -> None:
        torch.set_num_threads(threads)
        self.embedder = factory()
        if self.embedder.identity() != identity:
            raise RuntimeError(
                f"the Ray worker's model differs from the driver's ({self.embedder.identity()} vs {identity}); "
                "every worker must build the same weights and preprocessing"
            )
        self.normalize = normalize
        self.engine = TorchEngine(self.embedder, precision, "torch: a Ray actor")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([e == "" for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.embedder.dim), dtype=np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            if self.embedder.device.type == "cuda":
                pixels = pixels.pin_memory()  # lets the copy to the GPU overlap (non_blocking)
            vectors[ok] = encode_batch(self.engine, pixels, self.normalize)  # inference mode + autocast inside
        return {"id": batch["id"], "error": batch["error"], "vector": vectors}


def pixel_shape_of(embedder: Embedder) -> tuple[int, ...]:
    """The shape ``image_transform`` gives (every model preprocesses to one fixed size)."""
    return tuple(embedder.image_transform(Image.new("RGB", (64, 64), (255, 255, 255))).shape)


# ================================================================================ the runner
def ray_runner(factory: Callable[[], Embedder], options: RayOptions | None = None):
    """A runner for :func:`vrec_utils.extract.extract_image_embeddings`: each Ray actor builds its
    model with ``factory()`` (picklable; it must give the driver's weights and preprocessing,
    which the actor checks)."""
    options = options or RayOptions()
    require_ray()  # fail before any work when Ray is missing

    def run(todo: pd.DataFrame, embedder: Embedder, cache: EmbeddingCache, *, batch_size, precision, normalize, chunk_size, progress) -> dict[str, str]:
        ray = ensure_ray(options)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        shards = [
            pd.DataFrame({"id": todo.index[b : b + chunk_size].astype(str), "path": todo["image"].iloc[b : b + chunk_size].astype(str).to_numpy()})
            for b in range(0, len(todo), chunk_size)
        ]
        dataset = ray.data.from_pandas(shards)
        dataset = dataset.map_batches(
            decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=options.decode_cpus,
            fn_kwargs={"transform": embedder.image_transform, "pixel_shape": pixel_shape_of(embedder)},
        )
        dataset = dataset.map_batches(
            EmbedActor, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_gpus=options.gpus_per_worker or None, num_cpus=1 if options.gpus_per_worker else 0.5,
            fn_constructor_kwargs={"factory": factory, "identity": embedder.identity(), "precision": precision, "normalize": normalize, "threads": options.threads},
        )  # fmt: skip
        writer = ChunkWriter(cache, chunk_size)
        bar = tqdm(total=len(todo), desc=f"embed {embedder.name} on Ray", unit="img", disable=not progress, file=sys.stderr)
        with bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                ids = [str(i) for i in batch["id"]]
                errors = batch["error"]
                good = [n for n, e in enumerate(errors) if e == ""]
                for n, error in enumerate(errors):
                    if error:
                        writer.skip(ids[n], str(error))
                writer.add([ids[n] for n in good], np.asarray(batch["vector"])[good])
                bar.update(len(ids))
        writer.flush()
        return writer.skipped

    return run
