"""Cached feature maps before efficientnet-lite0's last image block, for tuning that block.

Tuning ``conv_head`` + its BN (the 1x1 conv 320 -> 1280, :class:`~vrec_utils.models.mini_siglip.TunedBlock`)
needs the maps that enter it, not the pooled features. :func:`extract_feature_maps` runs the frozen
tower once over a catalog (the same preprocessing as its embeddings) and stores the (320, 7, 7) maps
as float16 in a memory-mapped file, so training reads them instead of running the CNN. Images are
decoded as ``vrec extract`` does (:func:`~vrec_utils.extract.image_batches`: on the CPU a thread pool
in this process) and normalised per batch (:func:`~vrec_utils.images.split_transform`: bit-identical
pixels to the per-image transform, so the same maps).

* Resumable: maps are written chunk by chunk; ``progress.json`` (written atomically after each
  flushed chunk) says how many rows are final, and a rerun continues from there.
* Never another image's map: each row records its image file's content digest (the embedding
  store's, :func:`~vrec_utils.store.catalog_keys`, memoised by size and mtime), and
  :meth:`FeatureMaps.rows_for` refuses ids whose file changed since (or that could not be read).
* float16 is part of the model: the tuned block rounds its input maps to float16 when it serves
  raw images too (``TunedBlock.forward``), so the cache gives what serving gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..catalog import Catalog, load_catalog
from ..extract import ImageDataset, image_batches
from ..images import split_transform
from ..models.base import Embedder
from ..store import catalog_keys, slugify
from .config import FinetuneConfig
from .recipes import SelectionSet, augmented_ids, augmented_views_catalog

MAPS_VERSION = "maps-v2"  # bump when the layout or what is stored changes
CHUNK = 256


def feature_maps_dir(workdir: str | os.PathLike, catalog: Catalog, tower: Embedder) -> Path:
    """The cache folder of ``catalog``'s maps under ``tower`` (weights and preprocessing in its name)."""
    key = hashlib.sha256(f"{MAPS_VERSION}\n{tower.weights_id()}\n{tower.preprocess_id()}".encode()).hexdigest()[:8]
    return Path(workdir) / "feature-maps" / f"{slugify(catalog.name)}-{catalog.fingerprint()[:8]}-{key}"


@dataclass
class FeatureMaps:
    """A finished map cache: ``ids`` in file order, ``maps`` a read-only float16 memmap (n, c, h, w)."""

    directory: Path
    ids: list[str]
    digests: list[str]
    maps: np.ndarray
    failed: dict[str, str]

    @classmethod
    def open(cls, directory: str | os.PathLike) -> FeatureMaps:
        directory = Path(directory)
        manifest = json.loads((directory / "manifest.json").read_text())
        progress = json.loads((directory / "progress.json").read_text()) if (directory / "progress.json").is_file() else {"done": 0}
        if progress["done"] < len(manifest["ids"]):
            raise ValueError(
                f"{directory}: feature maps of {progress['done']} of {len(manifest['ids'])} items only; "
                "rerun extract_feature_maps to finish the extraction"
            )
        shape = (len(manifest["ids"]), *manifest["shape"])
        maps = np.memmap(directory / "maps.f16", dtype=np.float16, mode="r", shape=shape)
        return cls(directory, manifest["ids"], manifest["digests"], maps, progress.get("failed", {}))

    @property
    def workdir(self) -> Path:
        """The workdir the cache lives in (``<workdir>/feature-maps/<name>``): its file-digest memo."""
        return self.directory.parent.parent

    def rows_for(self, ids: list[str], catalog: Catalog | None = None) -> np.ndarray:
        """Rows of ``ids``; an error for ids not cached, not readable, or (with ``catalog``) whose
        image file no longer has the digest the map was computed from."""
        index = {i: r for r, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in index or i in self.failed]
        if missing:
            raise KeyError(f"{len(missing)} id(s) have no feature map in {self.directory} (e.g. {missing[:3]})")
        rows = np.asarray([index[i] for i in ids], dtype=np.int64)
        if catalog is not None:
            digests = catalog_keys(self.workdir, catalog)
            changed = [i for i, r in zip(ids, rows) if digests.get(i, "") != self.digests[r]]
            if changed:
                raise ValueError(f"{len(changed)} image file(s) changed since their maps were cached (e.g. {changed[:3]}); delete {self.directory}")
        return rows

    def tensor(self, ids: list[str], catalog: Catalog | None = None) -> torch.Tensor:
        """float16 maps of ``ids`` (a copy in memory)."""
        return torch.from_numpy(np.ascontiguousarray(self.maps[self.rows_for(ids, catalog)]))


def extract_feature_maps(
    catalog: Catalog, tower: Embedder, workdir: str | os.PathLike, *, batch_size: int = 64, num_workers: int | None = None, progress: bool = True
) -> FeatureMaps:
    """Maps of every item of ``catalog`` before ``tower``'s last block (``tower.encode_maps``),
    float16, resumable (see the module docstring). Returns the finished :class:`FeatureMaps`.
    ``num_workers``: as :func:`~vrec_utils.extract.image_batches` (None: decoding threads on the CPU)."""
    directory = feature_maps_dir(workdir, catalog, tower)
    directory.mkdir(parents=True, exist_ok=True)
    ids = list(map(str, catalog.items.index))
    paths = [str(catalog.image_path(i)) for i in ids]
    manifest_path, progress_path = directory / "manifest.json", directory / "progress.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["ids"] != ids:
            raise ValueError(f"{directory} holds maps of other ids; delete it")
    else:
        with torch.inference_mode():
            probe = tower.encode_maps(tower.image_transform(_blank()).unsqueeze(0).to(tower.device))
        manifest = {
            "version": MAPS_VERSION, "tower": tower.name, "weights": tower.weights_id(), "preprocess": tower.preprocess_id(),
            "catalog": str(catalog.source), "ids": ids, "digests": catalog_keys(workdir, catalog).reindex(ids).fillna("").tolist(), "shape": list(probe.shape[1:]),
            "dtype": "float16",
        }  # fmt: skip
        _write_json(manifest_path, manifest)
    state = json.loads(progress_path.read_text()) if progress_path.is_file() else {"done": 0, "failed": {}, "seconds": 0.0}
    shape = (len(ids), *manifest["shape"])
    mode = "r+" if (directory / "maps.f16").is_file() else "w+"
    maps = np.memmap(directory / "maps.f16", dtype=np.float16, mode=mode, shape=shape)
    bar = tqdm(total=len(ids), initial=state["done"], desc=f"maps {catalog.name}", unit="img", disable=not progress, file=sys.stderr)
    split = split_transform(tower.image_transform)  # (PIL stage to uint8, per-batch normalisation), or None
    while state["done"] < len(ids):
        begin, started = state["done"], time.perf_counter()
        end = min(len(ids), begin + CHUNK * 4)
        dataset = ImageDataset(paths[begin:end], split[0] if split else tower.image_transform)
        for positions, pixels, failed in image_batches(dataset, batch_size, num_workers, tower.device):
            for pos, reason in failed:
                state["failed"][ids[begin + pos]] = reason
            if pixels is not None:
                if split is not None:
                    pixels = split[1](pixels, channels_last=tower.prefers_channels_last)
                elif tower.prefers_channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    out = tower.encode_maps(pixels.to(tower.device)).float().cpu().numpy()
                maps[[begin + p for p in positions]] = out.astype(np.float16)
            bar.update(len(positions) + len(failed))
        maps.flush()
        state["done"], state["seconds"] = end, state["seconds"] + time.perf_counter() - started
        _write_json(progress_path, state)
    bar.close()
    del maps
    return FeatureMaps.open(directory)


def _blank():
    from PIL import Image

    return Image.new("RGB", (60, 80), (255, 255, 255))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def training_maps(
    catalog: Catalog,
    train_ids: list[str],
    ids: list[str],
    config: FinetuneConfig,
    workdir: str | os.PathLike,
    tower: Embedder,
    selection: SelectionSet | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What a run that tunes the last image block reads, float16: the maps of ``ids`` (n, c, h, w);
    of the augmented views of ``train_ids`` (n_train, views, c, h, w; zeros where a row has fewer
    views, in the order of :func:`~vrec_utils.train.recipes.augmented_features`), or None; and of
    the selection half's rows, or None. Each cache is extracted (or finished) on first use."""
    maps = extract_feature_maps(catalog, tower, workdir, progress=progress).tensor(list(ids), catalog)
    view_maps = None
    if config.augment_views > 0 and train_ids:
        chosen, views = augmented_views_catalog(catalog, list(train_ids), config, workdir)
        cached = extract_feature_maps(views, tower, workdir, progress=progress)
        have = set(cached.ids) - set(cached.failed)
        row = {item: r for r, item in enumerate(train_ids)}
        view_maps = torch.zeros(len(train_ids), config.augment_views, *maps.shape[1:], dtype=torch.float16)
        rows, slots, names = [], [], []
        for item in chosen:
            for slot, name in enumerate(n for n in augmented_ids([item], config.augment_views) if n in have):
                rows.append(row[item]), slots.append(slot), names.append(name)
        if names:
            view_maps[rows, slots] = cached.tensor(names, views)
    select_maps = None
    if selection is not None:
        shifted = load_catalog(selection.path)
        select_maps = extract_feature_maps(shifted, tower, workdir, progress=progress).tensor(list(selection.ids), shifted)
    return maps, view_maps, select_maps
