"""A tuned model's catalog embeddings through the cache (what ``warm_cache`` and the studies use)."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.nn import functional as F

from ..catalog import Catalog
from ..engines import autocast_context
from ..extract import extract_image_embeddings
from ..models import create_embedder
from ..store import DEFAULT_WORKDIR, EmbeddingCache
from .feature_maps import extract_feature_maps


#: rows per step through the heads: pooled features are 5 KB a row, float16 maps 31 KB
FEATURES_CHUNK, MAPS_CHUNK = 4096, 1024


def extract_finetuned_embeddings(
    catalog: Catalog,
    model: str,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    device: str | torch.device | None = "auto",
    batch_size: int = 64,
    progress: bool = True,
):
    """Image embeddings of ``model`` (e.g. a ``local:`` fine-tune) for ``catalog``, through the cache.

    For a mini-SigLIP model only the heads run: the frozen CNN's features come from the
    efficientnet-lite0 cache (the CNN runs only for items not cached yet), and the results are
    written under the model's own identity with the same precision, exactly what
    ``vrec extract --model local:DIR`` would store. A model that tunes the CNN's last block also
    reads the catalog's cached float16 feature maps (:func:`extract_feature_maps`, extracted on
    first use). Other models are extracted normally.
    Returns the :class:`~vrec_utils.store.Embeddings`.
    """
    embedder = create_embedder(model, device=device)
    if not embedder.has_output_mix:
        return extract_image_embeddings(catalog, embedder, workdir, batch_size=batch_size, progress=progress).embeddings
    base = extract_image_embeddings(catalog, embedder.feature_model, workdir, batch_size=batch_size, progress=progress)
    maps = extract_feature_maps(catalog, embedder.feature_model, workdir, progress=progress) if embedder.needs_maps else None
    with EmbeddingCache.open(workdir, catalog, embedder.identity(), precision=base.precision, normalized=True) as cache:
        done = cache.done_ids()
        todo = [i for i in map(str, base.embeddings.ids) if i in catalog.items.index and i not in done]
        step = MAPS_CHUNK if maps is not None else FEATURES_CHUNK
        for begin in range(0, len(todo), step):
            chunk = todo[begin : begin + step]
            x = torch.from_numpy(np.asarray(base.embeddings.vectors_for(chunk), dtype=np.float32)).to(embedder.device)
            chunk_maps = None if maps is None else maps.tensor(chunk, catalog).to(embedder.device)
            with torch.inference_mode(), autocast_context(base.precision, embedder.device):
                out = embedder.image_from_features(x, maps=chunk_maps).float()
            cache.append(chunk, F.normalize(out, dim=-1).cpu().numpy())
        cache.write_skipped(dict(zip(base.skipped["id"], base.skipped["reason"])))
        cache.consolidate(extra={"features_from": str(base.cache_dir)})
        return cache.load()
