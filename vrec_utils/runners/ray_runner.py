"""The Ray runner: decode in Ray CPU tasks, embed in actors that hold the model once.

``vrec extract --runner ray`` builds a Ray Dataset of the items still to embed (one block per
cache chunk) and runs one of two pipelines over it (:meth:`RayOptions.fused`):

* **split** (actors with GPUs): images are decoded and preprocessed in Ray CPU tasks with the
  model's own ``image_transform`` and embedded in a pool of actors (``concurrency=workers``,
  ``num_gpus=gpus_per_worker``): the GPU never waits on JPEG decoding;
* **fused** (no GPU asked for, the default on CPU nodes): each actor takes a whole block of paths,
  decodes the next batch in a thread while its model embeds the current one, and yields the
  vectors. On CPUs decoding and embedding share the same cores anyway, and the split pipeline
  paid for sending float32 pixel batches (19 MB per 32 images at 224x224) through the object
  store, spilling them to disk when the store was small, and for a second pool of processes.

Either way the vectors stream back to the driver, which files them through the same
:class:`ChunkWriter` and cache as the local runner (one writer: no second code path writes the
store). So:

* a driver killed mid-run leaves whole chunks behind; a rerun embeds only what they lack;
* a worker killed mid-run is restarted by Ray and its task retried (Ray Data's actor defaults,
  ``max_restarts=-1``, ``max_task_retries=-1``); a row arriving twice is filed once;
* an unreadable image travels as a row with an error and is reported once, in ``skipped.csv``.

Ray is an optional extra (``pip install 'vrec[ray]'``): it is imported only when this runner runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..engines import TorchEngine
from ..extract import ChunkWriter, ImageDataset, encode_batch
from ..images import pixel_batch, split_transform
from ..models.base import Embedder
from ..store import EmbeddingCache

RAY_VERSION = "2.60.0"
RAY_INSTALL = f"pip install 'vrec[ray]'   (or: pip install 'ray[data]=={RAY_VERSION}')"
# a fused actor's task: this many batches (its first batch's decoding is not overlapped; a block
# per cache chunk of 512 left the second actor idle on runs of under two chunks)
FUSED_BLOCK_BATCHES = 8
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
    task reserves (decoding 60x80 JPEGs is cheap next to the model). ``fuse``: decode in the
    embedding actors instead of separate tasks; ``None`` (auto) fuses when no GPU is asked for.
    """

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None
    decode_cpus: float = 0.25
    object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES
    fuse: bool | None = None

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

    @property
    def fused(self) -> bool:
        return not self.gpus_per_worker if self.fuse is None else self.fuse

    def describe(self) -> str:
        """Which pipeline runs and why (the run summary prints it)."""
        where = f"{self.workers} actor(s) with {self.gpus_per_worker:g} GPU(s) each" if self.gpus_per_worker else f"{self.workers} CPU actor(s), {self.threads} torch thread(s) each"
        if self.fused:
            why = "no GPU asked for: decoding in the actor skips the object store" if self.fuse is None else "fuse=True asked for"
            return f"fused decode+embed in {where} ({why})"
        why = "GPU actors: decoding stays off the GPU's critical path" if self.fuse is None else "fuse=False asked for"
        return f"decode in Ray CPU tasks, embed in {where} ({why})"


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
    """CPU task: paths -> the batch the engine takes (:func:`~vrec_utils.images.pixel_batch`: the
    PIL stage's uint8 where the transform splits, a quarter of the float pixels through the object
    store); an unreadable image becomes a row with an error (and zero pixels), decoded by the same
    :class:`ImageDataset` as the local runner."""
    split = split_transform(transform)
    dataset = ImageDataset([str(p) for p in batch["path"]], split[0] if split else transform)
    pixels = np.zeros((len(dataset), *pixel_shape), dtype=np.uint8 if split else np.float32)
    errors = []
    for n in range(len(dataset)):
        _, image, error = dataset[n]
        if image is not None:
            if tuple(image.shape) != pixel_shape:
                image, error = None, f"preprocessed to shape {tuple(image.shape)}, the model takes {pixel_shape}"
            else:
                pixels[n] = np.asarray(image)
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


class DecodeEmbedActor(EmbedActor):
    """The fused pipeline: takes a block of paths, decodes batch n+1 in a thread (PIL and torch
    release the GIL) while the model embeds batch n, and yields each batch's vectors."""

    def __init__(self, factory: Callable[[], Embedder], identity: dict, precision: str, normalize: bool, threads: int, batch_size: int) -> None:
        super().__init__(factory, identity, precision, normalize, threads)
        self.batch_size = batch_size
        self.decode = {"transform": self.embedder.image_transform, "pixel_shape": pixel_shape_of(self.embedder)}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vrec-decode")

    def __call__(self, block: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        size = self.batch_size
        batches = [{"id": block["id"][b : b + size], "path": block["path"][b : b + size]} for b in range(0, len(block["id"]), size)]
        pending = self.pool.submit(decode_batch, batches[0], **self.decode) if batches else None
        for n in range(len(batches)):
            decoded = pending.result()
            if n + 1 < len(batches):
                pending = self.pool.submit(decode_batch, batches[n + 1], **self.decode)
            yield super().__call__(decoded)


def pixel_shape_of(embedder: Embedder) -> tuple[int, ...]:
    """The shape of one image in the batch the engine takes (every model preprocesses to one fixed size)."""
    return tuple(pixel_batch([Image.new("RGB", (64, 64), (255, 255, 255))], embedder.image_transform).shape[1:])


# ================================================================================ the runner
class RayRunner:
    """A runner for :func:`vrec_utils.extract.extract_image_embeddings`: each Ray actor builds its
    model with ``factory()`` (picklable; it must give the driver's weights and preprocessing,
    which the actor checks). ``name`` and ``reason`` go into the run summary."""

    name = "ray"

    def __init__(self, factory: Callable[[], Embedder], options: RayOptions | None = None) -> None:
        self.factory = factory
        self.options = options or RayOptions()
        require_ray()  # fail before any work when Ray is missing

    @property
    def reason(self) -> str:
        return self.options.describe()

    def dataset(self, ray, todo: pd.DataFrame, embedder: Embedder, *, batch_size: int, precision: str, normalize: bool, chunk_size: int):
        """The Ray Dataset of (id, error, vector) rows: one block of paths per cache chunk (fused:
        per FUSED_BLOCK_BATCHES batches, so that every actor gets work on small runs too)."""
        options = self.options
        rows = min(chunk_size, FUSED_BLOCK_BATCHES * batch_size) if options.fused else chunk_size
        shards = [
            pd.DataFrame({"id": todo.index[b : b + rows].astype(str), "path": todo["image"].iloc[b : b + rows].astype(str).to_numpy()})
            for b in range(0, len(todo), rows)
        ]
        dataset = ray.data.from_pandas(shards)
        actor = {"factory": self.factory, "identity": embedder.identity(), "precision": precision, "normalize": normalize, "threads": options.threads}
        pool = ray.data.ActorPoolStrategy(size=options.workers)
        if options.fused:  # whole blocks of paths into the actors; batches are cut there
            return dataset.map_batches(
                DecodeEmbedActor, batch_size=None, batch_format="numpy", compute=pool, num_gpus=options.gpus_per_worker or None,
                num_cpus=1 if options.gpus_per_worker else 0.5, fn_constructor_kwargs={**actor, "batch_size": batch_size},
            )  # fmt: skip
        dataset = dataset.map_batches(
            decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=options.decode_cpus,
            fn_kwargs={"transform": embedder.image_transform, "pixel_shape": pixel_shape_of(embedder)},
        )
        return dataset.map_batches(
            EmbedActor, batch_size=batch_size, batch_format="numpy", compute=pool,
            num_gpus=options.gpus_per_worker or None, num_cpus=1 if options.gpus_per_worker else 0.5, fn_constructor_kwargs=actor,
        )  # fmt: skip

    def __call__(self, todo: pd.DataFrame, embedder: Embedder, cache: EmbeddingCache, *, batch_size, precision, normalize, chunk_size, progress) -> dict[str, str]:
        ray = ensure_ray(self.options)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        dataset = self.dataset(ray, todo, embedder, batch_size=batch_size, precision=precision, normalize=normalize, chunk_size=chunk_size)
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


def ray_runner(factory: Callable[[], Embedder], options: RayOptions | None = None) -> RayRunner:
    """:class:`RayRunner` (fails at once, with the install command, when Ray is missing)."""
    return RayRunner(factory, options)
