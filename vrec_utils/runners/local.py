"""The local runner: the DataLoader pipeline of :mod:`vrec_utils.extract`, as a runner object."""

from __future__ import annotations

from ..engines import TorchEngine
from ..extract import BatchRunner, run_image_batches


def local_runner(num_workers: int | None = None) -> BatchRunner:
    """DataLoader workers decode while this process runs the model with the torch engine
    (``None``: cores - 1, at most 4)."""

    def run(todo, embedder, cache, *, batch_size, precision, normalize, chunk_size, progress):
        engine = TorchEngine(embedder, precision, "torch: the local runner")
        return run_image_batches(todo, embedder, engine, cache, batch_size, num_workers, normalize, chunk_size, progress)

    return run
