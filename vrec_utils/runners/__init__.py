"""Who runs the model during ``vrec extract``: the local DataLoader pipeline or a Ray cluster.

Both go through :func:`vrec_utils.extract.extract_image_embeddings`, which owns the cache (one
writer: the same content-addressed chunks, manifest and skipped-items file); a runner only
decides where images are decoded and embedded.
"""

from __future__ import annotations

from .local import local_runner
from .ray_runner import RAY_INSTALL, RayOptions, RayUnavailableError, ray_runner, require_ray

RUNNERS = ("local", "ray")

__all__ = ["RAY_INSTALL", "RUNNERS", "RayOptions", "RayUnavailableError", "local_runner", "ray_runner", "require_ray"]
