"""Who runs the model during ``vrec extract``: the local pipeline
(:func:`vrec_utils.extract.run_image_batches`, the default when no runner is given) or a Ray
cluster (:func:`ray_runner`).

Both go through :func:`vrec_utils.extract.extract_image_embeddings`, which owns the cache (one
writer: the same content-addressed chunks, manifest and skipped-items file); a runner only
decides where images are decoded and embedded.
"""

from __future__ import annotations

from .ray_runner import (
    RAY_INSTALL,
    RayOptions,
    RayRunner,
    RayUnavailableError,
    ray_runner,
    require_ray,
)

RUNNERS = ("local", "ray")

__all__ = ["RAY_INSTALL", "RUNNERS", "RayOptions", "RayRunner", "RayUnavailableError", "ray_runner", "require_ray"]
