"""Two-tower families as the loop sees them (:class:`PairModel`).

* :class:`MiniSiglipPairs` (``mini-siglip``, offline): frozen efficientnet-lite0 + MiniLM towers
  whose features come from the embedding cache, so only the heads train (see
  :mod:`vrec_utils.models.mini_siglip` for the head design that keeps what the base knew);
* :class:`TowerPairs` (SigLIP, open_clip, the tiny test models): the towers run in the loop and
  ``trainable`` picks the projection heads, the last blocks, or everything.
"""

from __future__ import annotations

import dataclasses
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..catalog import FASHION_TITLE_COLUMN, Catalog
from ..extract import (
    ImageDataset,
    collate_skipping_failures,
    default_num_workers,
    extract_image_embeddings,
    extract_text_embeddings,
)
from ..models import create_embedder, get_model_entry
from ..models import mini_siglip as ms
from ..models.local import (
    LOCAL_SCHEME,
    TunedEmbedder,
    load_local_model,
    local_model_dir,
    save_tuned,
)
from .config import FinetuneConfig
from .embed import extract_finetuned_embeddings
from .loss import SigmoidLoss, l2_sp, similarity_distillation
from .pairs import PairSet, title_series
from .feature_maps import training_maps
from .recipes import (
    SelectionSet,
    augmented_features,
    fit_in_domain_gate,
    interpolate_state,
    load_selection_set,
    wise_ft_heads,
)


class PairModel(ABC):
    """What the loop needs from a two-tower family. Rows are positions into ``ids``."""

    family: str
    ids: list[str]  # pairs that have both features (train first, then val)
    n_train: int
    n_dropped: int = 0  # pairs whose image (or text) could not be embedded

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def parameter_groups(self, config: FinetuneConfig) -> list[dict[str, Any]]:
        """AdamW parameter groups (``lr_scale`` multiplies the run's lr); default: one group."""
        return [{"params": self.trainable_parameters(), "weight_decay": config.weight_decay, "lr_scale": 1.0}]

    @abstractmethod
    def batches(self, positions: np.ndarray, batch_size: int) -> Iterator[Any]:
        """Batches of inputs for ``forward``, in the order of ``positions``."""

    @abstractmethod
    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (image, text) embeddings of a batch."""

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A training step's (image, text) embeddings and its weighted regulariser, added to the
        loss as it is (None: no recipe term)."""
        return (*self.forward(batch), None)

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch (recipes with phases switch parameters here)."""

    def fit_gate(self, train_pos: np.ndarray, val_pos: np.ndarray) -> dict[str, Any] | None:
        """After training: fit the in-domain gate of a recipe that has one; what it recorded, or None."""
        return None

    #: the shifted selection set that chooses the coefficient (recipes with ``select_on="shift"``)
    selection: SelectionSet | None = None

    @abstractmethod
    def image_embeddings(self, positions: np.ndarray, alpha: float | None = None) -> np.ndarray:
        """Normalised image embeddings (no grad) for validation nDCG."""

    @abstractmethod
    def train_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (what a checkpoint holds)."""

    @abstractmethod
    def load_train_state(self, state: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def save(self, directory: Path, *, alpha: float | None, loss: SigmoidLoss, extra: dict[str, Any]) -> None: ...

    def train_mode(self, on: bool) -> None:
        """Switch trainable modules to train/eval mode (frozen ones stay in eval)."""

    def initial_logit_params(self) -> tuple[float, float] | None:
        """The base model's (t', b) for ``loss_init="model"``; None when it has none."""
        return None

    def supports_alpha(self) -> bool:
        return False

    def warm_cache(self, model_name: str, model_dir: Path, workdir: Path, catalog: Catalog, device: torch.device) -> int:
        """Fill the embedding cache of the saved model from cached features; returns how many."""
        return 0

    def describe(self) -> dict[str, Any]:
        return {}


class MiniSiglipPairs(PairModel):
    """mini-SigLIP: cached frozen-tower features in, heads trained. ``trainable="last"`` also
    trains a copy of the image tower's last block (:class:`~vrec_utils.models.mini_siglip.TunedBlock`)
    on cached float16 maps (:mod:`~vrec_utils.train.feature_maps`) of every image and view."""

    family = "mini-siglip"

    def __init__(
        self,
        catalog: Catalog,
        pairs: PairSet,
        config: FinetuneConfig,
        workdir: Path,
        device: torch.device,
        progress: bool,
        *,
        start_from: str | None = None,
        features_for: Catalog | None = None,
    ) -> None:
        if config.trainable not in ("heads", "last") or (config.trainable == "last" and config.last_blocks != 1):
            raise ValueError(
                f"mini-siglip trains its projection heads (trainable='heads'), or with them its image tower's last block "
                f"(trainable='last', last_blocks=1), on cached features; trainable={config.trainable!r} with "
                f"last_blocks={config.last_blocks} is for SigLIP/open_clip bases"
            )
        if config.trainable == "last" and config.mix != "output":
            raise ValueError("trainable='last' (a tuned image block) needs mix='output': WiSE-FT interpolates the image head only")
        self.device = device
        self.image_tower = create_embedder(ms.IMAGE_TOWER, device=device)
        self.text_tower = create_embedder(ms.TEXT_TOWER, device=device)
        wanted = list(pairs.train_ids) + list(pairs.val_ids)
        # Image features for every item of ``features_for`` (default: the pairs), shared with
        # plain efficientnet-lite0 evaluation through the same cache.
        image_catalog = features_for if features_for is not None else catalog.subset(wanted)
        started = time.perf_counter()
        img = extract_image_embeddings(image_catalog, self.image_tower, workdir, progress=progress)
        titled = catalog.subset(wanted)
        if config.title_column not in ("title", FASHION_TITLE_COLUMN):
            titled = Catalog(titled.items.assign(title=titled.items[config.title_column]), titled.root, titled.source, titled.label_columns, titled.report)
        txt = extract_text_embeddings(titled, self.text_tower, workdir, column="title", progress=progress)
        self.feature_seconds = time.perf_counter() - started
        have_img, have_txt = set(map(str, img.embeddings.ids)), set(map(str, txt.embeddings.ids))
        train = [i for i in pairs.train_ids if i in have_img and i in have_txt]
        val = [i for i in pairs.val_ids if i in have_img and i in have_txt]
        self.ids = train + val
        self.n_train = len(train)
        self.n_dropped = len(wanted) - len(self.ids)
        self.x = torch.from_numpy(np.ascontiguousarray(img.embeddings.vectors_for(self.ids), dtype=np.float32))
        self.t = torch.from_numpy(np.ascontiguousarray(txt.embeddings.vectors_for(self.ids), dtype=np.float32))
        if start_from is not None:
            heads, _ = ms.load_heads(ms.resolve_model_dir(start_from), ms.read_model_json(start_from))
        else:
            channels = self.image_tower.model.conv_head.in_channels if config.trainable == "last" else None
            spec = ms.HeadSpec(ms.IMAGE_DIM, ms.TEXT_DIM, config.image_rank, config.text_hidden, config.image_head, block_channels=channels)
            heads = ms.MiniSiglipHeads(spec, seed=config.seed)
            if heads.block is not None:
                heads.block.load_state_dict(ms.TunedBlock.from_tower(self.image_tower.model).state_dict())
        if heads.spec.image_dim != self.x.shape[1] or heads.spec.text_dim != self.t.shape[1]:
            raise ValueError(
                f"feature dims ({self.x.shape[1]}, {self.t.shape[1]}) do not match the heads "
                f"({heads.spec.image_dim}, {heads.spec.text_dim})"
            )
        self.heads = heads.to(device)
        self.x, self.t = self.x.to(device), self.t.to(device)
        self.config = config
        self.initial_state = {k: v.detach().clone() for k, v in self.heads.state_dict().items()}  # WiSE-FT's "base"
        self.views, self.n_views = self._augmented_views(catalog, workdir, progress)
        self.selection = load_selection_set(config, workdir, self.image_tower, progress)
        self.maps = self.view_maps = None
        if heads.block is not None:
            self.maps, self.view_maps, select_maps = training_maps(catalog, self.ids[: self.n_train], self.ids, config, workdir, self.image_tower, self.selection, progress)
            self.selection = self.selection and dataclasses.replace(self.selection, maps=select_maps)
        if self.selection is not None:
            self.selection = dataclasses.replace(self.selection, features=self.selection.features.to(device))

    def _augmented_views(self, catalog: Catalog, workdir: Path, progress: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows, max views, dim) features of the augmented views of training rows and how many each has."""
        feats = augmented_features(catalog, self.ids[: self.n_train], self.config, workdir, self.image_tower, progress)
        if not feats:
            return None, None
        views = torch.zeros(self.n_train, self.config.augment_views, self.x.shape[1])
        counts = torch.zeros(self.n_train, dtype=torch.long)
        for row, item_id in enumerate(self.ids[: self.n_train]):
            if item_id in feats:
                counts[row] = len(feats[item_id])
                views[row, : counts[row]] = torch.from_numpy(feats[item_id])
        return views.to(self.device), counts.to(self.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def parameter_groups(self, config: FinetuneConfig) -> list[dict[str, Any]]:
        """The tuned block (pretrained weights, not a zero-initialised update) trains at
        ``block_lr_scale`` times the lr and without weight decay, which would pull it toward zero."""
        if self.heads.block is None:
            return super().parameter_groups(config)
        block = set(map(id, self.heads.block.parameters()))
        rest = [p for p in self.heads.parameters() if id(p) not in block]
        return [
            {"params": rest, "weight_decay": config.weight_decay, "lr_scale": 1.0},
            {"params": list(self.heads.block.parameters()), "weight_decay": 0.0, "lr_scale": config.block_lr_scale},
        ]

    def _maps(self, batch: torch.Tensor) -> torch.Tensor | None:
        return None if self.maps is None else self.maps[batch.cpu()].to(self.device)

    def batches(self, positions: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
        index = torch.as_tensor(positions, dtype=torch.long)
        for begin in range(0, len(index), batch_size):
            yield index[begin : begin + batch_size].to(self.device)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads.tuned_image(self.heads.tuned_features(self.x[batch], self._maps(batch))), self.heads.text(self.t[batch])

    def forward_train(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """With augmented views, each training image is one of its views, drawn uniformly (the
        original included) from the torch RNG the loop seeds per epoch. The regulariser is
        ``distill`` times the similarity distillation against the base features (the base model)
        plus ``l2sp`` times the image head's squared distance from its initial (identity) weights."""
        x, maps = self.x[batch], self._maps(batch)
        if self.views is not None:
            n_views = self.n_views[batch]
            pick = (torch.rand(len(batch), device=self.device) * (n_views + 1).float()).long()  # 0: the original
            use = pick > 0
            if use.any():
                x = x.clone()
                x[use] = self.views[batch[use], pick[use] - 1]
                if maps is not None:
                    maps[use.cpu()] = self.view_maps[batch[use].cpu(), pick[use].cpu() - 1].to(self.device)
        img = self.heads.tuned_image(self.heads.tuned_features(x, maps))
        terms = []
        if self.config.distill > 0:
            terms.append(self.config.distill * similarity_distillation(img, x))
        if self.config.l2sp > 0:
            head = {f"image_head.{k}": v for k, v in self.heads.image_head.named_parameters()}
            terms.append(self.config.l2sp * l2_sp(head, self.initial_state))
        return img, self.heads.text(self.t[batch]), sum(terms) if terms else None

    def start_epoch(self, epoch: int) -> None:
        """LP-FT: during the first ``probe_epochs`` only the text head trains."""
        probing = epoch <= self.config.probe_epochs
        for param in self.heads.image_head.parameters():
            param.requires_grad_(not probing)

    def fit_gate(self, train_pos: np.ndarray, val_pos: np.ndarray) -> dict[str, Any] | None:
        """``in_domain_gate``: fit on the training rows' features, threshold on the validation rows'."""
        quantile = self.config.in_domain_gate
        if quantile is None:
            return None
        train = self.x[torch.as_tensor(train_pos, dtype=torch.long, device=self.device)]
        val = self.x[torch.as_tensor(val_pos, dtype=torch.long, device=self.device)]
        mean, precision, threshold = fit_in_domain_gate(train, val, quantile)
        self.heads.set_gate(mean, precision, threshold)
        with torch.no_grad():
            info = {
                "quantile": quantile, "threshold": threshold, "fitted_on": "training part of the train split",
                "threshold_on": "validation part of the train split", "val_inside": float(self.heads.gate(val).mean()),
            }  # fmt: skip
            if self.selection is not None:
                info["selection_inside"] = float(self.heads.gate(self.selection.features).mean())
        return info

    def embed_features(self, x: torch.Tensor, coefficient: float, maps: torch.Tensor | None = None) -> torch.Tensor:
        """Served image embeddings of features ``x`` (and, with a tuned block, their maps) at mix
        ``coefficient`` (``config.mix``): the output mix alpha, or WiSE-FT, the image head
        interpolated from its initial weights."""
        if self.config.mix == "output":
            return self.heads.image(x, coefficient, None if maps is None else maps.to(self.device))
        prefix = "image_head."
        state = interpolate_state(self.initial_state, self.heads.state_dict(), coefficient, prefix)
        head_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        return F.normalize(torch.func.functional_call(self.heads.image_head, head_state, (x,)), dim=-1)

    def mixed_heads(self, coefficient: float) -> ms.MiniSiglipHeads:
        """A copy of the heads with the image head interpolated (WiSE-FT) at ``coefficient``."""
        return wise_ft_heads(self.initial_state, self.heads, coefficient)

    @torch.no_grad()
    def image_embeddings(self, positions: np.ndarray, alpha: float | None = None) -> np.ndarray:
        index = torch.as_tensor(positions, dtype=torch.long, device=self.device)
        return self.embed_features(self.x[index], 1.0 if alpha is None else alpha, self._maps(index)).cpu().numpy()

    def train_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.heads.state_dict().items()}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        self.heads.load_state_dict(state)

    def train_mode(self, on: bool) -> None:
        self.heads.train(on)

    def supports_alpha(self) -> bool:
        return True

    def save(self, directory: Path, *, alpha: float | None, loss: SigmoidLoss, extra: dict[str, Any]) -> None:
        towers = ms.tower_ids(self.image_tower, self.text_tower)
        extra = {**extra, "logit": {"t_prime": float(loss.t_prime.detach()), "bias": float(loss.bias.detach())}}
        coefficient = 1.0 if alpha is None else alpha
        if self.config.mix == "weights":  # WiSE-FT: the interpolated weights are the model, served unmixed
            ms.save_mini_siglip(directory, self.mixed_heads(coefficient).cpu(), alpha=1.0, towers=towers, extra=extra)
            return
        ms.save_mini_siglip(directory, self.heads.cpu(), alpha=coefficient, towers=towers, extra=extra)
        self.heads.to(self.device)

    def warm_cache(self, model_name: str, model_dir: Path, workdir: Path, catalog: Catalog, device: torch.device) -> int:
        return len(extract_finetuned_embeddings(catalog, model_name, workdir, device=device, progress=False))

    def describe(self) -> dict[str, Any]:
        augmented = int((self.n_views > 0).sum()) if self.n_views is not None else 0
        block = {"tuned_block": "efficientnet-lite0 conv_head + BN (float16 maps)"} if self.heads.block is not None else {}
        return {"heads": dataclasses.asdict(self.heads.spec), "feature_seconds": round(self.feature_seconds, 3), "augmented_items": augmented, **block}


_HEAD_PATTERN = re.compile(
    r"(^|\.)(head|heads|attn_pool|proj|projection|text_projection|visual_projection|image_projection|logit_scale|logit_bias)(\.|$)"
)
_NORM_PATTERN = re.compile(r"(^|\.)(post_layernorm|final_layer_norm|ln_final|ln_post|fc_norm|norm)(\.|$)")
_BLOCK_PATTERN = re.compile(r"^(.*?\.(?:layers|layer|resblocks|blocks))\.(\d+)\.")


def select_parameters(named: Sequence[tuple[str, nn.Parameter]], trainable: str, last_blocks: int = 1) -> list[str]:
    """Names of the parameters to train: ``heads`` (projection/pooling heads, logit scale/bias),
    ``last`` (heads + final norms + the last ``last_blocks`` blocks of every tower) or ``all``."""
    names = [n for n, _ in named]
    if trainable == "all":
        return names
    chosen = {n for n in names if _HEAD_PATTERN.search(n)}
    if trainable == "last":
        chosen |= {n for n in names if _NORM_PATTERN.search(n) and not _BLOCK_PATTERN.match(n)}
        blocks: dict[str, set[int]] = {}
        for n in names:
            match = _BLOCK_PATTERN.match(n)
            if match:
                blocks.setdefault(match.group(1), set()).add(int(match.group(2)))
        # Nested block lists (a block inside a block) are not towers: keep the outermost.
        towers = {p: idx for p, idx in blocks.items() if not any(p != q and p.startswith(q + ".") for q in blocks)}
        for prefix, indices in towers.items():
            last = sorted(indices)[-last_blocks:]
            chosen |= {n for n in names if any(n.startswith(f"{prefix}.{i}.") for i in last)}
    return [n for n in names if n in chosen]


class TowerPairs(PairModel):
    """Any registered vision-language embedder (SigLIP, open_clip, the tiny test models): the
    towers run in the loop through the :class:`~vrec_utils.models.base.Embedder` interface
    (``encode_image`` / ``encode_text`` with gradients); ``trainable`` picks the parameters.

    Modules stay in eval mode (no dropout, frozen normalisation statistics), which keeps runs
    deterministic and suits fine-tuning from pretrained weights.
    """

    family = "tuned"

    def __init__(
        self, base: str, catalog: Catalog, pairs: PairSet, config: FinetuneConfig, workdir: Path, device: torch.device, progress: bool
    ) -> None:
        if local_model_dir(base) is not None:
            self.embedder = load_local_model(local_model_dir(base)).to(device)
            self.base = self.embedder.base if isinstance(self.embedder, TunedEmbedder) else base
        else:
            self.embedder = create_embedder(base, device=device)
            self.base = base
        self.device = device
        self.feature_seconds = 0.0
        self.num_workers = default_num_workers()
        titles = title_series(catalog, config.title_column)
        wanted = list(pairs.train_ids) + list(pairs.val_ids)
        self.ids = wanted
        self.n_train = len(pairs.train_ids)
        self.paths = catalog.items.loc[wanted, "image"].tolist()
        self.titles = titles.loc[wanted].tolist()
        named = [(f"m{i}.{n}", p) for i, m in enumerate(self.embedder.modules()) for n, p in m.named_parameters()]
        chosen = set(select_parameters(named, config.trainable, config.last_blocks))
        for name, param in named:
            param.requires_grad_(name in chosen)
        self.named = [(n, p) for n, p in named if n in chosen]
        if not self.named:
            raise ValueError(
                f"trainable={config.trainable!r} matches no parameter of {base!r}; try trainable='last' or 'all'"
            )
        self._skipped: dict[int, str] = {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    @property
    def n_dropped(self) -> int:  # type: ignore[override]
        return len(self._skipped)

    def batches(self, positions: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor, list[str]]]:
        """(positions kept, pixels, titles); unreadable images are left out and counted."""
        positions = np.asarray(positions)
        dataset = ImageDataset([self.paths[p] for p in positions], self.embedder.image_transform)
        workers = self.num_workers if len(positions) >= 512 else 0  # worker start-up outweighs small sets
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping_failures,
            prefetch_factor=2 if workers else None,
        )
        for local, pixels, failed in loader:
            for pos, reason in failed:
                self._skipped[int(positions[pos])] = reason
            if pixels is None:
                continue
            kept = positions[np.asarray(local, dtype=np.int64)]
            yield kept, pixels.to(self.device), [self.titles[int(p)] for p in kept]

    def forward(self, batch: tuple[np.ndarray, torch.Tensor, list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        _, pixels, texts = batch
        if self.embedder.prefers_channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        img = F.normalize(self.embedder.encode_image(pixels).float(), dim=-1)
        txt = F.normalize(self.embedder.encode_text(texts).float(), dim=-1)
        if torch.is_grad_enabled() and not (img.requires_grad or txt.requires_grad):
            raise RuntimeError(
                f"{self.base!r}: encode_image/encode_text return no gradients (they run under no_grad or "
                "inference_mode), so this model family cannot be fine-tuned through the Embedder interface"
            )
        return img, txt

    @torch.no_grad()
    def image_embeddings(self, positions: np.ndarray, alpha: float | None = None) -> np.ndarray:
        """Normalised image embeddings; rows of unreadable images stay zero."""
        positions = np.asarray(positions)
        row = {int(p): i for i, p in enumerate(positions)}
        out = np.zeros((len(positions), self.embedder.dim), dtype=np.float32)
        for kept, pixels, _ in self.batches(positions, 64):
            if self.embedder.prefers_channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            vectors = F.normalize(self.embedder.encode_image(pixels).float(), dim=-1).cpu().numpy()
            out[[row[int(p)] for p in kept]] = vectors
        return out

    def train_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.named:
                param.copy_(state[name])

    def initial_logit_params(self) -> tuple[float, float] | None:
        scale = [p for n, p in self._all_named() if n.endswith("logit_scale")]
        bias = [p for n, p in self._all_named() if n.endswith("logit_bias")]
        if not scale or not bias:
            return None
        return float(scale[0].detach().reshape(-1)[0]), float(bias[0].detach().reshape(-1)[0])

    def _all_named(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for m in self.embedder.modules() for n, p in m.named_parameters()]

    def save(self, directory: Path, *, alpha: float | None, loss: SigmoidLoss, extra: dict[str, Any]) -> None:
        with torch.no_grad():  # the learnt temperature and bias go where the base keeps its own
            for name, param in self._all_named():
                if name.endswith("logit_scale") and param.numel() == 1:
                    param.fill_(float(loss.t_prime.detach()))
                elif name.endswith("logit_bias") and param.numel() == 1:
                    param.fill_(float(loss.bias.detach()))
        logit = {"t_prime": float(loss.t_prime.detach()), "bias": float(loss.bias.detach())}
        save_tuned(directory, self.embedder, base=self.base, extra={**extra, "logit": logit, "trainable_tensors": len(self.named)})

    def describe(self) -> dict[str, Any]:
        return {
            "trainable_tensors": len(self.named),
            "trainable_parameters": int(sum(p.numel() for _, p in self.named)),
            "unreadable_images": len(self._skipped),
        }


def create_pair_model(
    base: str,
    catalog: Catalog,
    pairs: PairSet,
    config: FinetuneConfig,
    workdir: Path,
    device: torch.device,
    progress: bool,
    warm_cache: bool,
) -> PairModel:
    """The :class:`PairModel` for ``base``; refuses image-only models with the reason."""
    entry, spec = get_model_entry(base)
    if base == "mini-siglip" or (entry.name == LOCAL_SCHEME and _local_family(spec) == "mini-siglip"):
        start_from = spec if entry.name == LOCAL_SCHEME else None
        return MiniSiglipPairs(
            catalog, pairs, config, workdir, device, progress,
            start_from=start_from, features_for=catalog if warm_cache else None,
        )
    if not entry.has_text:
        raise ValueError(
            f"base model {base!r} has no text tower, so it cannot be trained on image-title pairs with the "
            "sigmoid loss; use a vision-language base: mini-siglip (offline), siglip-base, an openclip:... model, "
            "or tiny-siglip / tiny-openclip for tests"
        )
    recipe = {"mix": config.mix != "output", "distill": config.distill > 0, "l2sp": config.l2sp > 0,
              "image_head": config.image_head != "residual", "in_domain_gate": config.in_domain_gate is not None,
              "probe_epochs": config.probe_epochs > 0,
              "augment_views": config.augment_views > 0, "select_on": config.select_on != "val"}  # fmt: skip
    if any(recipe.values()):
        raise ValueError(
            f"recipe setting(s) {', '.join(k for k, v in recipe.items() if v)} apply to mini-siglip (heads on cached "
            f"features) only; base {base!r} trains its towers directly"
        )
    return TowerPairs(base, catalog, pairs, config, workdir, device, progress)


def _local_family(spec: str | None) -> str | None:
    try:
        return ms.read_model_json(spec).get("family") if spec else None
    except FileNotFoundError:
        return None
