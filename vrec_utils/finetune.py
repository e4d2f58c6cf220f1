"""Sigmoid-loss fine-tuning of two-tower image-text models on a catalog's (image, title) pairs.

This is the Mercari recipe (fine-tune SigLIP with its sigmoid loss on product image-title pairs)
as a measured part of the workbench:

* :func:`sigmoid_loss`: the SigLIP loss, a binary logistic loss on every (image, text) pair of
  the batch with learnable temperature ``t = exp(t')`` and bias ``b`` (paper init: t' = log 10,
  b = -10);
* :func:`finetune`: the training loop. It trains on the catalog's *train* split only (the
  reported evaluation split is never seen), carves a validation part out of it to choose the
  epoch and the output mix, checkpoints every epoch (a killed run resumes), and saves a model
  folder that the registry loads as ``local:DIR``;
* :func:`ensure_finetuned`: train only when no up-to-date model exists (notebooks, reports).

Two families:

* ``mini-siglip`` (offline): frozen efficientnet-lite0 + MiniLM towers whose features are read
  from the embedding cache, so only the heads train (seconds to minutes on a CPU); see
  :mod:`vrec_utils.models.mini_siglip` for the head design that keeps what the base knew;
* SigLIP (Hugging Face) and open_clip models: towers run in the loop; ``trainable`` picks the
  projection heads, the last blocks, or everything.

Randomness is explicit: epoch ``e`` shuffles with a generator seeded by ``(seed, e)`` and runs
under a forked torch RNG seeded the same way, so a resumed run retraces an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .catalog import (
    FASHION_TITLE_COLUMN,
    Catalog,
    Split,
    hash_unit_interval,
    split_catalog,
)
from .metrics import ideal_from_counts, ndcg_at_k
from .store import DEFAULT_WORKDIR, slugify

PAPER_T_PRIME = math.log(10.0)
PAPER_BIAS = -10.0
TRAINABLE = ("heads", "last", "all")
SCHEDULES = ("cosine", "linear", "constant")
SELECT_BY = ("val_ndcg", "val_loss", "last")
LOSS_INIT = ("paper", "model")
ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_CHECK_ITEMS = 10  # evaluation items a shift check needs on each side
VAL_NDCG_MAX_ITEMS = 5000  # validation nDCG uses at most this many items (a seeded subset): memory is quadratic
CHECKPOINT = "last.pt"


# ======================================================================================= loss


def sigmoid_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    t_prime: torch.Tensor | float,
    b: torch.Tensor | float,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Algorithm 1).

    ``img`` and ``txt`` are ``(n, d)`` with row i of each forming a positive pair; every other
    combination is a negative. With ``z_ij = +1`` for i == j and ``-1`` otherwise::

        logits_ij = exp(t') * <img_i, txt_j> + b
        loss = -1/n * sum_ij log sigmoid(z_ij * logits_ij)

    Rows are L2-normalised first unless ``normalize=False``.
    """
    if img.ndim != 2 or txt.shape != img.shape:
        raise ValueError(f"img and txt must both be (n, d) with the same shape, got {tuple(img.shape)} and {tuple(txt.shape)}")
    if normalize:
        img = F.normalize(img, dim=-1)
        txt = F.normalize(txt, dim=-1)
    t_prime = torch.as_tensor(t_prime, dtype=img.dtype, device=img.device)
    b = torch.as_tensor(b, dtype=img.dtype, device=img.device)
    logits = img @ txt.T * t_prime.exp() + b
    labels = 2.0 * torch.eye(img.shape[0], dtype=img.dtype, device=img.device) - 1.0
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


class SigmoidLoss(nn.Module):
    """:func:`sigmoid_loss` with its learnable ``t_prime`` (log temperature) and ``bias``."""

    def __init__(self, t_prime: float = PAPER_T_PRIME, bias: float = PAPER_BIAS) -> None:
        super().__init__()
        self.t_prime = nn.Parameter(torch.tensor(float(t_prime)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return sigmoid_loss(img, txt, self.t_prime, self.bias)


# ===================================================================================== config


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides what a fine-tuning run learns (saved as ``config.json``).

    ``None`` means "the default of the base model" where noted. Override with
    ``dataclasses.replace(config, epochs=5)``.
    """

    # -- what trains
    trainable: str = "heads"  # heads | last (last ``last_blocks`` blocks + heads) | all
    last_blocks: int = 1
    # -- optimisation (AdamW)
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: str = "cosine"  # cosine | linear | constant, after a linear warm-up
    warmup_steps: int = 20
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    seed: int = 0
    loss_init: str = "paper"  # paper: t' = log 10, b = -10; model: the base's logit scale/bias (SigLIP)
    # -- data
    title_column: str = "title"
    eval_fraction: float = 0.25  # split_catalog(catalog, eval_fraction, split_seed): eval is never trained on
    split_seed: int = 0
    val_fraction: float = 0.1  # of the train split, for choosing the epoch and alpha
    exclude: tuple[str, ...] = ()  # "column=value" entries kept out of training (domain-shift checks)
    max_pairs: int | None = None  # cap on training pairs (a seeded subset); None: all
    # -- selection
    label: str | None = "articleType"  # label for validation nDCG@5; None: select by val_loss
    select_by: str = "val_ndcg"  # val_ndcg | val_loss | last
    patience: int | None = None  # stop after this many epochs without improvement; None: run all
    alpha: float | None = None  # mini-siglip output mix; None: chosen on validation (see choose_alpha)
    alpha_tolerance: float = 0.01  # smallest alpha whose val nDCG@5 is within this of the best
    # -- mini-siglip heads
    image_rank: int | None = None  # None: full-rank residual image head; else low rank
    text_hidden: int | None = None  # None: linear text head; else MLP width

    def __post_init__(self) -> None:
        _choice("trainable", self.trainable, TRAINABLE)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("select_by", self.select_by, SELECT_BY)
        _choice("loss_init", self.loss_init, LOSS_INIT)
        for name in ("epochs", "batch_size", "last_blocks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: the sigmoid loss needs negatives in the batch")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay and warmup_steps must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None, got {self.alpha}")
        if self.max_pairs is not None and self.max_pairs < 2:
            raise ValueError(f"max_pairs must be >= 2 or None, got {self.max_pairs}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        parse_exclude(self.exclude)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig field(s): {', '.join(unknown)}")
        return cls(**{**data, "exclude": tuple(data.get("exclude", ()))})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def parse_exclude(entries: Sequence[str]) -> list[tuple[str, str]]:
    """``["masterCategory=Accessories"]`` -> ``[("masterCategory", "Accessories")]``."""
    pairs = []
    for entry in entries:
        column, sep, value = str(entry).partition("=")
        if not sep or not column.strip():
            raise ValueError(f"exclude entries look like COLUMN=VALUE (e.g. masterCategory=Accessories), got {entry!r}")
        pairs.append((column.strip(), value.strip()))
    return pairs


# ===================================================================================== data


@dataclass(frozen=True)
class PairSet:
    """The (image, title) pairs of a run: which items train, which validate, what was dropped."""

    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    split: Split
    n_no_title: int  # train-split items skipped because their title is empty
    n_excluded: int  # train-split items kept out by ``config.exclude``
    n_capped: int  # training pairs dropped by ``config.max_pairs``

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        payload = {
            "seed": self.split.seed,
            "eval_fraction": self.split.eval_fraction,
            "eval": list(self.split.eval),
            "train": list(self.split.train),
            "finetune_train": list(self.train_ids),
            "finetune_val": list(self.val_ids),
            "n_no_title": self.n_no_title,
            "n_excluded": self.n_excluded,
            "n_capped": self.n_capped,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))
        return path


def title_series(catalog: Catalog, column: str) -> pd.Series:
    """The titles (stripped strings); ``productDisplayName`` is the ``title`` column of a Fashion catalog."""
    if column == FASHION_TITLE_COLUMN and column not in catalog.items.columns:
        column = "title"
    catalog.require_column(column)
    return catalog.items[column].astype(str).str.strip()


def make_pairs(catalog: Catalog, config: FinetuneConfig) -> PairSet:
    """Training and validation pairs from the train split only (see :class:`FinetuneConfig`)."""
    split = split_catalog(catalog, eval_fraction=config.eval_fraction, seed=config.split_seed)
    items = catalog.items.loc[list(split.train)]
    titles = title_series(catalog, config.title_column).loc[items.index]
    keep = titles != ""
    n_no_title = int((~keep).sum())
    excluded = pd.Series(False, index=items.index)
    for column, value in parse_exclude(config.exclude):
        catalog.require_column(column)
        excluded |= items[column].astype(str) == value
    n_excluded = int((excluded & keep).sum())
    ids = items.index[keep & ~excluded]
    is_val = hash_unit_interval(ids, f"val-{config.seed}") < config.val_fraction
    train_ids, val_ids = ids[~is_val], ids[is_val]
    n_capped = 0
    if config.max_pairs is not None and len(train_ids) > config.max_pairs:
        order = np.argsort(hash_unit_interval(train_ids, f"subsample-{config.seed}"), kind="stable")
        chosen = np.sort(order[: config.max_pairs])
        n_capped = len(train_ids) - config.max_pairs
        train_ids = train_ids[chosen]
    if len(train_ids) < 2:
        raise ValueError(
            f"only {len(train_ids)} training pair(s) with a title in catalog {catalog.name!r} after the split "
            f"({n_no_title} without a title, {n_excluded} excluded); fine-tuning needs image-title pairs"
        )
    return PairSet(tuple(train_ids), tuple(val_ids), split, n_no_title, n_excluded, n_capped)


# ============================================================================ pair models


class PairModel(ABC):
    """What the loop needs from a two-tower family. Rows are positions into ``ids``."""

    family: str
    ids: list[str]  # pairs that have both features (train first, then val)
    n_train: int
    n_dropped: int = 0  # pairs whose image (or text) could not be embedded

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]: ...

    @abstractmethod
    def batches(self, positions: np.ndarray, batch_size: int) -> Iterator[Any]:
        """Batches of inputs for ``forward``, in the order of ``positions``."""

    @abstractmethod
    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (image, text) embeddings of a batch."""

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
    """mini-SigLIP: cached frozen-tower features in, heads trained (``trainable`` must be heads)."""

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
        from .extract import extract_image_embeddings, extract_text_embeddings
        from .models import create_embedder
        from .models import mini_siglip as ms

        if config.trainable != "heads":
            raise ValueError(
                f"mini-siglip trains its projection heads on cached features of frozen towers; "
                f"trainable={config.trainable!r} is for SigLIP/open_clip bases (use trainable='heads')"
            )
        self.ms = ms
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
            spec = ms.HeadSpec(ms.IMAGE_DIM, ms.TEXT_DIM, config.image_rank, config.text_hidden)
            heads = ms.MiniSiglipHeads(spec, seed=config.seed)
        if heads.spec.image_dim != self.x.shape[1] or heads.spec.text_dim != self.t.shape[1]:
            raise ValueError(
                f"feature dims ({self.x.shape[1]}, {self.t.shape[1]}) do not match the heads "
                f"({heads.spec.image_dim}, {heads.spec.text_dim})"
            )
        self.heads = heads.to(device)
        self.x, self.t = self.x.to(device), self.t.to(device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def batches(self, positions: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
        index = torch.as_tensor(positions, dtype=torch.long)
        for begin in range(0, len(index), batch_size):
            yield index[begin : begin + batch_size].to(self.device)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads.tuned_image(self.x[batch]), self.heads.text(self.t[batch])

    @torch.no_grad()
    def image_embeddings(self, positions: np.ndarray, alpha: float | None = None) -> np.ndarray:
        x = self.x[torch.as_tensor(positions, dtype=torch.long, device=self.device)]
        return self.heads.image(x, 1.0 if alpha is None else alpha).cpu().numpy()

    def train_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.heads.state_dict().items()}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        self.heads.load_state_dict(state)

    def train_mode(self, on: bool) -> None:
        self.heads.train(on)

    def supports_alpha(self) -> bool:
        return True

    def save(self, directory: Path, *, alpha: float | None, loss: SigmoidLoss, extra: dict[str, Any]) -> None:
        towers = self.ms.tower_ids(self.image_tower, self.text_tower)
        extra = {**extra, "logit": {"t_prime": float(loss.t_prime.detach()), "bias": float(loss.bias.detach())}}
        self.ms.save_mini_siglip(directory, self.heads.cpu(), alpha=1.0 if alpha is None else alpha, towers=towers, extra=extra)
        self.heads.to(self.device)

    def warm_cache(self, model_name: str, model_dir: Path, workdir: Path, catalog: Catalog, device: torch.device) -> int:
        return len(extract_finetuned_embeddings(catalog, model_name, workdir, device=device, progress=False))

    def describe(self) -> dict[str, Any]:
        return {"heads": dataclasses.asdict(self.heads.spec), "feature_seconds": round(self.feature_seconds, 3)}


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
        from .extract import default_num_workers
        from .models import create_embedder
        from .models.local import TunedEmbedder, load_local_model

        if base.startswith("local:"):
            self.embedder = load_local_model(base[len("local:") :]).to(device)
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
        from torch.utils.data import DataLoader

        from .extract import ImageDataset, collate_skipping_failures

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
        from .models.local import save_tuned

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
    from .models import get_model_entry

    entry, spec = get_model_entry(base)
    if base == "mini-siglip" or (entry.name == "local:" and _local_family(spec) == "mini-siglip"):
        start_from = spec if entry.name == "local:" else None
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
    return TowerPairs(base, catalog, pairs, config, workdir, device, progress)


def _local_family(spec: str | None) -> str | None:
    from .models.mini_siglip import read_model_json

    try:
        return read_model_json(spec).get("family") if spec else None
    except FileNotFoundError:
        return None


# ================================================================================= schedule


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def label_ndcg(vectors: np.ndarray, labels: Sequence[str], k: int = 5) -> float:
    """Mean image-to-image nDCG@k among ``vectors`` (query excluded from its candidates),
    relevant = same label; queries with no relevant candidate are left out."""
    labels = np.asarray(labels, dtype=object)
    n = len(labels)
    if n < 2:
        return float("nan")
    _, codes, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
    n_rel = counts[codes] - 1
    sims = np.asarray(vectors, dtype=np.float32) @ np.asarray(vectors, dtype=np.float32).T
    np.fill_diagonal(sims, -np.inf)
    depth = min(k, n - 1)
    top = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]
    order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)
    rel = (codes[top] == codes[:, None]).astype(np.float64)
    values = ndcg_at_k(rel, ideal_from_counts(n_rel, k), k)
    mask = n_rel > 0
    return float(values[mask].mean()) if mask.any() else float("nan")


# ==================================================================================== results


@dataclass(frozen=True)
class FinetuneResult:
    """What a run produced.

    ``history`` has one row per epoch: ``epoch``, ``step`` (optimizer steps so far),
    ``train_loss`` (mean of the epoch's step losses), ``train_probe_loss`` and ``val_loss`` (the
    model at the end of the epoch on a fixed train subset and on the validation pairs, batched
    alike, so the two compare), ``val_ndcg@5`` (image-to-image among the validation items, alpha
    = 1), ``lr``, ``temperature`` (exp t'), ``bias`` and ``seconds``. ``steps`` has one row per
    optimizer step (step, epoch, loss, lr). ``alpha_table``: validation nDCG@5 per output mix.
    """

    model_name: str
    model_dir: Path
    out: Path
    base: str
    config: FinetuneConfig
    history: pd.DataFrame
    steps: pd.DataFrame
    best_epoch: int
    alpha: float | None
    alpha_table: pd.DataFrame
    n_train: int
    n_val: int
    n_no_title: int
    n_excluded: int
    n_dropped: int
    train_seconds: float
    feature_seconds: float
    resumed_from_epoch: int
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        alpha = f", alpha={self.alpha:g}" if self.alpha is not None else ""
        last = self.history.iloc[-1] if len(self.history) else None
        val = ""
        if last is not None and "val_ndcg@5" in self.history and self.history["val_ndcg@5"].notna().any():
            val = f", val nDCG@5 {self.history['val_ndcg@5'].max():.4f}"
        resumed = f", resumed after epoch {self.resumed_from_epoch}" if self.resumed_from_epoch else ""
        return (
            f"{self.base} fine-tuned on {self.n_train} pairs ({self.n_val} val, {self.n_no_title} without title "
            f"skipped, {self.n_excluded} excluded, {self.n_dropped} without features): best epoch "
            f"{self.best_epoch}/{len(self.history)}{val}{alpha}; train {self.train_seconds:.1f} s, features "
            f"{self.feature_seconds:.1f} s{resumed} -> {self.model_name}"
        )


# =================================================================================== the loop


def finetune(
    catalog: Catalog,
    base: str = "mini-siglip",
    out: str | os.PathLike = "runs/finetune",
    *,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    config: FinetuneConfig | None = None,
    device: str | torch.device | None = "auto",
    resume: bool = True,
    overwrite: bool = False,
    warm_cache: bool = True,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``base`` with the sigmoid loss on ``catalog``'s train-split (image, title) pairs.

    Writes into ``out``: ``model/`` (the model: ``local:OUT/model``), ``config.json``,
    ``split.json``, ``history.csv``, ``steps.csv``, ``result.json`` and
    ``checkpoints/last.pt`` (after every epoch). With ``resume`` a run whose checkpoint holds
    the same base, catalog and config continues after its last finished epoch; a checkpoint of
    a different run is an error unless ``overwrite``.
    """
    from .models import resolve_device

    config = config or FinetuneConfig()
    out = Path(out).expanduser().resolve()
    workdir = Path(workdir)
    device = resolve_device(device)
    run_key = {"base": base, "catalog": catalog.fingerprint(), "config": config.to_dict()}
    ckpt_path = out / "checkpoints" / CHECKPOINT
    checkpoint = _load_checkpoint(ckpt_path, run_key, resume, overwrite)

    pairs = make_pairs(catalog, config)
    model = create_pair_model(base, catalog, pairs, config, workdir, device, progress, warm_cache)
    n_train = model.n_train
    n_val = len(model.ids) - n_train
    train_pos = np.arange(n_train)
    val_pos = np.arange(n_train, len(model.ids))
    if n_train < 2:
        raise ValueError(f"only {n_train} training pair(s) have image and text features; nothing to train")
    ndcg_pos = val_pos
    if len(val_pos) > VAL_NDCG_MAX_ITEMS:
        ndcg_pos = np.sort(np.random.default_rng(config.seed).choice(val_pos, VAL_NDCG_MAX_ITEMS, replace=False))
    labels = _val_labels(catalog, [model.ids[p] for p in ndcg_pos], config.label)
    # A fixed train subset as large as the validation set, scored like it after every epoch:
    # the sigmoid loss grows with the batch size, so only equal batches compare train with val.
    subset = np.random.default_rng(config.seed).permutation(n_train)[: max(len(val_pos), 2)]
    train_probe = np.sort(train_pos[subset])

    loss_fn = SigmoidLoss()
    if config.loss_init == "model":
        init = model.initial_logit_params()
        if init is None:
            raise ValueError(f"loss_init='model' needs a base with a logit scale and bias (SigLIP); {base!r} has none")
        loss_fn = SigmoidLoss(*init)
    loss_fn.to(device)
    params = model.trainable_parameters()
    if not params:
        raise ValueError(f"trainable={config.trainable!r} selects no parameters of {base!r}")
    optimizer = torch.optim.AdamW(
        [
            {"params": params, "weight_decay": config.weight_decay},
            {"params": list(loss_fn.parameters()), "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config.warmup_steps, config.schedule)
    )

    history: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": None, "epoch": 0, "state": None, "loss_state": None, "since": 0}
    start_epoch = 0
    train_seconds = 0.0
    if checkpoint is not None:
        model.load_train_state(checkpoint["model"])
        loss_fn.load_state_dict(checkpoint["loss"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history, step_rows = checkpoint["history"], checkpoint["steps"]
        best = checkpoint["best"]
        start_epoch = int(checkpoint["epoch"])
        train_seconds = float(checkpoint["train_seconds"])

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"base": base, **config.to_dict()}, indent=2))
    stopped = checkpoint is not None and checkpoint.get("stopped", False)
    bar = tqdm(
        total=total_steps, initial=start_epoch * steps_per_epoch, desc=f"finetune {base}", unit="step",
        disable=not progress, file=sys.stderr,
    )
    epoch = start_epoch
    for epoch in range(start_epoch + 1, config.epochs + 1):
        if stopped:
            break
        started = time.perf_counter()
        epoch_losses = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_epoch_seed(config.seed, epoch))
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))).numpy()
            model.train_mode(True)
            for batch in model.batches(train_pos[order], config.batch_size):
                img, txt = model.forward(batch)
                if img.shape[0] < 2:
                    continue  # a lone last pair has no negative
                loss = sigmoid_loss(img, txt, loss_fn.t_prime, loss_fn.bias, normalize=False)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params + list(loss_fn.parameters()), config.grad_clip)
                optimizer.step()
                scheduler.step()
                value = float(loss.detach())
                epoch_losses.append(value)
                step_rows.append({"step": len(step_rows) + 1, "epoch": epoch, "loss": value, "lr": scheduler.get_last_lr()[0]})
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{value:.4f}")
            model.train_mode(False)
        train_seconds += time.perf_counter() - started
        row = {
            "epoch": epoch,
            "step": len(step_rows),
            "train_loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
            "train_probe_loss": _val_loss(model, train_probe, loss_fn, config.batch_size),
            "val_loss": _val_loss(model, val_pos, loss_fn, config.batch_size),
            "val_ndcg@5": label_ndcg(model.image_embeddings(ndcg_pos), labels) if labels is not None else float("nan"),
            "lr": scheduler.get_last_lr()[0],
            "temperature": float(loss_fn.t_prime.detach().exp()),
            "bias": float(loss_fn.bias.detach()),
            "seconds": round(time.perf_counter() - started, 3),
        }
        history.append(row)
        improved = _update_best(best, row, config, labels is not None, model, loss_fn)
        stopped = config.patience is not None and not improved and best["since"] >= config.patience
        _save_checkpoint(
            ckpt_path, run_key, epoch, model, loss_fn, optimizer, scheduler, history, step_rows, best, train_seconds, stopped,
        )
    bar.close()

    if best["state"] is not None:
        model.load_train_state(best["state"])
        loss_fn.load_state_dict(best["loss_state"])
    alpha, alpha_table = choose_alpha(model, ndcg_pos, labels, config)
    model_dir = out / "model"
    hist = pd.DataFrame(history)
    steps = pd.DataFrame(step_rows, columns=["step", "epoch", "loss", "lr"])
    info = {
        "base": base,
        "catalog": str(catalog.root),
        "catalog_fingerprint": catalog.fingerprint(),
        "config_digest": config.digest(),
        "best_epoch": int(best["epoch"]),
        "epochs_run": len(history),
        "n_train": n_train,
        "n_val": n_val,
        "n_no_title": pairs.n_no_title,
        "n_excluded": pairs.n_excluded,
        "n_capped": pairs.n_capped,
        "n_dropped": model.n_dropped,
        "train_seconds": round(train_seconds, 3),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        **model.describe(),
    }
    model.save(model_dir, alpha=alpha, loss=loss_fn, extra={"base": base, "config": config.to_dict(), "run": info})
    (model_dir / "config.json").write_text(json.dumps({"base": base, **config.to_dict()}, indent=2))
    pairs.save(model_dir / "split.json")
    pairs.save(out / "split.json")
    hist.to_csv(out / "history.csv", index=False)
    steps.to_csv(out / "steps.csv", index=False)
    alpha_table.to_csv(out / "alpha.csv", index=False)
    model_name = f"local:{model_dir}"
    warmed = model.warm_cache(model_name, model_dir, workdir, catalog, device) if warm_cache else 0
    info["warmed_cache_items"] = warmed
    (out / "result.json").write_text(json.dumps({**info, "model": model_name, "alpha": alpha}, indent=2))
    return FinetuneResult(
        model_name=model_name,
        model_dir=model_dir,
        out=out,
        base=base,
        config=config,
        history=hist,
        steps=steps,
        best_epoch=int(best["epoch"]),
        alpha=alpha,
        alpha_table=alpha_table,
        n_train=n_train,
        n_val=n_val,
        n_no_title=pairs.n_no_title,
        n_excluded=pairs.n_excluded,
        n_dropped=model.n_dropped,
        train_seconds=train_seconds,
        feature_seconds=float(getattr(model, "feature_seconds", 0.0)),
        resumed_from_epoch=start_epoch,
        info=info,
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"finetune-{seed}-{epoch}".encode()).digest()[:6], "big")


def _val_labels(catalog: Catalog, val_ids: Sequence[str], label: str | None) -> np.ndarray | None:
    if label is None or len(val_ids) < 2:
        return None
    if label not in catalog.items.columns:
        warnings.warn(
            f"label {label!r} is not a column of catalog {catalog.name!r}: the epoch is chosen by validation loss "
            "and alpha falls back to 0.5 (set label to a category column to choose them by validation nDCG@5)",
            stacklevel=3,
        )
        return None
    return catalog.items.loc[list(val_ids), label].astype(str).to_numpy()


@torch.no_grad()
def _val_loss(model: PairModel, val_pos: np.ndarray, loss_fn: SigmoidLoss, batch_size: int) -> float:
    total, count = 0.0, 0
    for batch in model.batches(val_pos, batch_size):
        img, txt = model.forward(batch)
        if img.shape[0] < 2:
            continue
        total += float(sigmoid_loss(img, txt, loss_fn.t_prime, loss_fn.bias, normalize=False)) * img.shape[0]
        count += img.shape[0]
    return total / count if count else float("nan")


def _update_best(
    best: dict[str, Any], row: dict[str, Any], config: FinetuneConfig, has_labels: bool, model: PairModel, loss_fn: SigmoidLoss
) -> bool:
    by = config.select_by
    if by == "val_ndcg" and (not has_labels or math.isnan(row["val_ndcg@5"])):
        by = "val_loss"
    if by == "val_loss" and math.isnan(row["val_loss"]):
        by = "last"
    score = {"val_ndcg": row["val_ndcg@5"], "val_loss": -row["val_loss"], "last": float(row["epoch"])}[by]
    improved = best["score"] is None or score > best["score"]
    if improved:
        loss_state = {k: v.detach().clone() for k, v in loss_fn.state_dict().items()}
        best.update(score=score, epoch=row["epoch"], state=model.train_state(), loss_state=loss_state, since=0, by=by)
    else:
        best["since"] += 1
    return improved


def choose_alpha(model: PairModel, val_pos: np.ndarray, labels: np.ndarray | None, config: FinetuneConfig) -> tuple[float | None, pd.DataFrame]:
    """The output mix of a model that has one (mini-siglip): ``config.alpha`` when set, else the
    smallest alpha in :data:`ALPHA_GRID` whose validation nDCG@5 is within
    ``config.alpha_tolerance`` of the best (prefer the base when tuning buys little: the guard
    against forgetting). Without labels: 0.5. Returns (alpha, table of alpha vs val nDCG@5)."""
    if not model.supports_alpha():
        return None, pd.DataFrame(columns=["alpha", "val_ndcg@5"])
    rows = []
    if labels is not None:
        rows = [{"alpha": a, "val_ndcg@5": label_ndcg(model.image_embeddings(val_pos, a), labels)} for a in ALPHA_GRID]
    table = pd.DataFrame(rows, columns=["alpha", "val_ndcg@5"])
    if config.alpha is not None:
        return float(config.alpha), table
    if table.empty or table["val_ndcg@5"].isna().all():
        return 0.5, table
    best = table["val_ndcg@5"].max()
    return float(table.loc[table["val_ndcg@5"] >= best - config.alpha_tolerance, "alpha"].min()), table


def _save_checkpoint(path, run_key, epoch, model, loss_fn, optimizer, scheduler, history, steps, best, train_seconds, stopped) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "run": run_key,
        "epoch": epoch,
        "model": model.train_state(),
        "loss": loss_fn.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
        "steps": steps,
        "best": best,
        "train_seconds": train_seconds,
        "stopped": stopped,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, run_key: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any] | None:
    if not path.exists():
        return None
    from .models._common import torch_load_trusted

    if overwrite and not resume:  # starting over: the old checkpoint is never read
        path.unlink()
        return None
    checkpoint = torch_load_trusted(
        path, f"delete {str(path)!r} or rerun with --no-resume to start the run over (or use another --out)"
    )
    if checkpoint.get("run") == run_key and resume:
        return checkpoint
    if checkpoint.get("run") != run_key and not overwrite:
        raise ValueError(
            f"{path.parent.parent} holds a fine-tuning run of a different base, catalog or config; "
            "use another --out folder, or --overwrite to start over there"
        )
    path.unlink()
    return None


# ============================================================================ ensure / cache


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
    ``vrec extract --model local:DIR`` would store. Other models are extracted normally.
    Returns the :class:`~vrec_utils.store.Embeddings`.
    """
    from .extract import autocast_context, extract_image_embeddings
    from .models import create_embedder
    from .models.mini_siglip import MiniSiglipEmbedder
    from .store import EmbeddingCache

    embedder = create_embedder(model, device=device)
    if not isinstance(embedder, MiniSiglipEmbedder):
        return extract_image_embeddings(catalog, embedder, workdir, batch_size=batch_size, progress=progress).embeddings
    base = extract_image_embeddings(catalog, embedder.image_tower, workdir, batch_size=batch_size, progress=progress)
    with EmbeddingCache.open(workdir, catalog, embedder.identity(), precision=base.precision, normalized=True) as cache:
        done = cache.done_ids()
        todo = [i for i in map(str, base.embeddings.ids) if i in catalog.items.index and i not in done]
        for begin in range(0, len(todo), 4096):
            chunk = todo[begin : begin + 4096]
            x = torch.from_numpy(np.asarray(base.embeddings.vectors_for(chunk), dtype=np.float32)).to(embedder.device)
            with torch.inference_mode(), autocast_context(base.precision, embedder.device):
                out = embedder.heads.image(x, embedder.alpha).float()
            cache.append(chunk, F.normalize(out, dim=-1).cpu().numpy())
        cache.write_skipped(dict(zip(base.skipped["id"], base.skipped["reason"])))
        cache.consolidate(extra={"features_from": str(base.cache_dir)})
        return cache.load()





def default_run_dir(workdir: str | os.PathLike, catalog: Catalog, base: str, config: FinetuneConfig) -> Path:
    return Path(workdir) / "finetune" / f"{slugify(catalog.name)}-{catalog.fingerprint()[:8]}-{slugify(base)}-{config.digest()[:10]}"


def ensure_finetuned(
    catalog: Catalog,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    base: str = "mini-siglip",
    *,
    config: FinetuneConfig | None = None,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
) -> str:
    """The ``local:`` name of a model fine-tuned on ``catalog`` with ``config``; trains only when
    no finished run of the same base, catalog and config exists (fast when cached)."""
    config = config or FinetuneConfig()
    out = Path(out) if out is not None else default_run_dir(workdir, catalog, base, config)
    out = out.expanduser().resolve()
    model_json = out / "model" / "vrec_model.json"
    if model_json.is_file():
        run = json.loads(model_json.read_text()).get("run", {})
        if (
            run.get("base") == base
            and run.get("catalog_fingerprint") == catalog.fingerprint()
            and run.get("config_digest") == config.digest()
        ):
            return f"local:{out / 'model'}"
    return finetune(catalog, base, out, workdir=workdir, config=config, device=device, progress=progress).model_name


def load_result(out: str | os.PathLike) -> dict[str, Any]:
    """``result.json``, ``history.csv``, ``steps.csv`` and ``alpha.csv`` of a finished run."""
    out = Path(out)
    if (out / "vrec_model.json").is_file() and not (out / "result.json").is_file():
        out = out.parent
    if not (out / "result.json").is_file():
        raise FileNotFoundError(f"no finished fine-tuning run in {out} (result.json missing)")
    frames = {name: pd.read_csv(out / f"{name}.csv") for name in ("history", "steps", "alpha") if (out / f"{name}.csv").is_file()}
    return {"result": json.loads((out / "result.json").read_text()), **frames}


def run_markdown(result: dict[str, Any]):
    """A finished run's ``result.json`` as a sentence (IPython Markdown)."""
    from IPython.display import Markdown

    alpha = result.get("alpha")
    mix = f"; output mix α = {alpha:g} (chosen on validation)" if alpha is not None else ""
    features = result.get("feature_seconds")
    feat = f"; frozen-tower features {features:.0f} s (cached, reused afterwards)" if features else ""
    return Markdown(
        f"Trained **{result['base']}** on **{result['n_train']:,} image-title pairs** of the train split "
        f"({result['n_val']:,} more for validation; {result['n_no_title']} without a title skipped, "
        f"{result['n_excluded']} excluded, {result['n_dropped']} without features). Best epoch "
        f"{result['best_epoch']} of {result['epochs_run']}{mix}. Training took **{result['train_seconds']:.0f} s** "
        f"on {result['device']} ({result['torch_threads']} threads){feat}. Model: `{result['model']}`."
    )


# ============================================================================== measurement

#: Text queries for the demo, with the articleType a sensible answer carries.
DEFAULT_TEXT_QUERIES = {
    "black watch": "Watches",
    "red dress": "Dresses",
    "running shoes": "Sports Shoes",
    "women handbag": "Handbags",
    "blue jeans": "Jeans",
    "sunglasses": "Sunglasses",
    "white formal shirt": "Shirts",
    "perfume": "Perfume and Body Mist",
}
#: Categories held out of training for the category-shift check on fashion-small.
DEFAULT_HOLDOUT = ("masterCategory=Accessories", "masterCategory=Personal Care")


def photo_shift_image(image):
    """A "differently shot" version of a catalogue photo: tighter framing (centre 80 % zoomed
    back), a grey-beige backdrop instead of white, softer focus, duller colours."""
    from PIL import Image, ImageEnhance, ImageFilter

    w, h = image.size
    box = (round(w * 0.1), round(h * 0.1), round(w * 0.9), round(h * 0.9))
    shot = image.crop(box).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(shot, dtype=np.uint8).copy()
    backdrop = (pixels >= 235).all(axis=-1)
    pixels[backdrop] = (196, 188, 172)
    shot = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.7))
    shot = ImageEnhance.Color(shot).enhance(0.6)
    return ImageEnhance.Brightness(shot).enhance(0.92)


def photo_shift_catalog(catalog: Catalog, ids: Sequence[str], directory: str | os.PathLike) -> Catalog:
    """A generic-layout catalog of ``ids`` whose images are :func:`photo_shift_image` copies
    (same ids, titles and labels) in ``directory``; reused when already written."""
    from .catalog import load_catalog
    from .images import load_rgb

    directory = Path(directory)
    csv = directory / "catalog.csv"
    ids = [str(i) for i in ids]
    if csv.is_file() and pd.read_csv(csv, dtype=str, keep_default_na=False)["id"].tolist() == ids:
        return load_catalog(csv)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for item_id in ids:
        photo_shift_image(load_rgb(catalog.image_path(item_id))).save(directory / "images" / f"{item_id}.jpg", quality=90)
    rows = catalog.items.loc[ids].drop(columns=["image"]).reset_index()
    rows.insert(1, "image", [f"images/{i}.jpg" for i in ids])
    rows.to_csv(csv, index=False)
    return load_catalog(csv)


def text_queries(
    catalog: Catalog,
    workdir: str | os.PathLike,
    model: str,
    queries: Sequence[str],
    *,
    ids: Sequence[str] | None = None,
    k: int = 5,
    label: str | None = "articleType",
    device: str | torch.device | None = "auto",
) -> pd.DataFrame:
    """Text-to-image search among ``ids`` (default: every cached item): one row per
    (query, rank) with query_text, rank, item_id, score, title and ``label``."""
    from .search import search_by_text
    from .store import load_embeddings

    embeddings = load_embeddings(workdir, catalog, model)
    if ids is not None:
        embeddings = embeddings.restrict(ids)
    frame = search_by_text(catalog, workdir, model, list(queries), k, device=device, index=_index_of(embeddings))
    return _result_columns(frame, "query_text", label)


def _index_of(embeddings):
    """An exact in-memory FAISS index of ``embeddings`` (not saved: these pools are subsets)."""
    from .index import create_index

    index = create_index("faiss", model=embeddings.model, dim=embeddings.dim)
    index.add(embeddings.ids, embeddings.vectors)
    return index


def _result_columns(frame: pd.DataFrame, query_column: str, label: str | None) -> pd.DataFrame:
    columns = [query_column, "rank", "item_id", "score", "title"] + ([label] if label is not None else [])
    return frame[[c for c in columns if c in frame.columns]].reset_index(drop=True)


def similar_among(
    catalog: Catalog,
    workdir: str | os.PathLike,
    model: str,
    query_ids: Sequence[str],
    ids: Sequence[str],
    *,
    k: int = 5,
    label: str | None = "articleType",
) -> pd.DataFrame:
    """"Similar items" restricted to ``ids`` (e.g. the evaluation split, so that no trained-on
    item shows up): one row per (query_id, rank) with item_id, score, title and ``label``."""
    from .search import recommend
    from .store import load_embeddings

    pool = _index_of(load_embeddings(workdir, catalog, model).restrict(ids))
    return _result_columns(recommend(catalog, workdir, model, list(query_ids), k, index=pool), "query_id", label)


def label_text_precision(
    catalog: Catalog,
    workdir: str | os.PathLike,
    model: str,
    ids: Sequence[str],
    *,
    label: str = "articleType",
    k: int = 5,
    min_items: int = 10,
    device: str | torch.device | None = "auto",
) -> pd.DataFrame:
    """Each label value with at least ``min_items`` items among ``ids``, used as a text query
    (lower-cased, e.g. "casual shoes"): precision@k of items carrying that label."""
    counts = catalog.items.loc[list(ids), label].value_counts()
    values = [v for v, n in counts.items() if n >= min_items and str(v).strip()]
    if not values:
        return pd.DataFrame(columns=[label, f"precision@{k}", "n_items"])
    hits = text_queries(catalog, workdir, model, [v.lower() for v in values], ids=ids, k=k, label=label, device=device)
    hits["expected"] = hits["query_text"].map({v.lower(): v for v in values})
    table = (
        hits.assign(hit=hits[label] == hits["expected"])
        .groupby("expected", sort=False)["hit"].mean().rename(f"precision@{k}").reset_index()
        .rename(columns={"expected": label})
    )
    table["n_items"] = table[label].map(counts).astype(int)
    return table


@dataclass(frozen=True)
class FinetunePlan:
    """What notebook 07 fine-tunes for a profile, and against which model it measures."""

    profile: str
    base: str
    base_model: str
    config: FinetuneConfig
    note: str = ""

    def markdown(self):
        from IPython.display import Markdown

        c = self.config
        text = (
            f"Fine-tuning **{self.base}** (profile `{self.profile}`) with the sigmoid loss; before = `{self.base_model}`. "
            f"Trainable: {c.trainable}; {c.epochs} epochs, batch {c.batch_size}, AdamW lr {c.lr:g} ({c.schedule}, "
            f"{c.warmup_steps} warm-up steps), weight decay {c.weight_decay:g}, grad clip {c.grad_clip}, seed {c.seed}. "
            f"Evaluation split: {c.eval_fraction:.0%} of the items (split seed {c.split_seed}), never trained on; "
            f"validation: {c.val_fraction:.0%} of the train split."
        )
        return Markdown(text + (f"\n\n> {self.note}" if self.note else ""))


def finetune_plan(
    profile: str = "offline",
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = "auto",
) -> FinetunePlan:
    """The base, the "before" model and the config for a profile (``None`` overrides keep the
    defaults, so the offline profile reuses the model :func:`ensure_finetuned` trained):

    * ``offline``: mini-siglip vs efficientnet-lite0 (the defaults of :class:`FinetuneConfig`);
    * ``smoke``: tiny-siglip vs itself, 2 epochs (exercises the SigLIP path; numbers mean nothing);
    * ``article``: siglip-base vs itself (last block + heads, lr 1e-5, the model's own logit
      scale/bias) when a CUDA GPU is present, else the offline plan with a note.
    """
    from .models import resolve_device

    overrides = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None}
    note = ""
    if profile == "smoke":
        config = dataclasses.replace(FinetuneConfig(epochs=2, batch_size=64, trainable="last", warmup_steps=2), **overrides)
        return FinetunePlan(profile, "tiny-siglip", "tiny-siglip", config, "Tiny random models: the numbers mean nothing.")
    if profile == "article":
        if resolve_device(device).type == "cuda":
            config = dataclasses.replace(
                FinetuneConfig(trainable="last", epochs=3, batch_size=128, lr=1e-5, warmup_steps=50, loss_init="model"), **overrides
            )
            return FinetunePlan(profile, "siglip-base", "siglip-base", config)
        note = (
            "Fine-tuning SigLIP-base (the paper's setting) needs a GPU; without one this notebook fine-tunes "
            "the offline mini-SigLIP instead (`vrec finetune --base siglip-base` runs the SigLIP path)."
        )
    elif profile != "offline":
        raise KeyError(f"unknown profile {profile!r}; profiles: offline, article, smoke")
    return FinetunePlan(profile, "mini-siglip", "efficientnet-lite0", dataclasses.replace(FinetuneConfig(), **overrides), note)


@dataclass(frozen=True)
class FinetuneMeasurement:
    """Before/after numbers of a fine-tune (see :func:`measure_finetune`)."""

    base_model: str
    tuned_model: str
    shift_model: str | None
    checks: pd.DataFrame  # one row per check: base vs tuned nDCG@5, paired diff + 95% CI, p-value
    alpha_sweep: pd.DataFrame  # eval split, for the report only (alpha is chosen on validation)
    text_results: pd.DataFrame
    text_precision: pd.DataFrame
    runs: dict[str, dict[str, Any]]  # result.json of each fine-tuning run
    eval_ids: tuple[str, ...] = ()
    workdir: Path = DEFAULT_WORKDIR
    label: str = "articleType"
    notes: tuple[str, ...] = ()  # checks that were skipped, and why

    def checks_table(self) -> pd.DataFrame:
        """One row per check: base and tuned nDCG@5, the paired difference with its 95% CI, p-value."""
        table = self.checks[
            ["check", "mean_a", "mean_b", "diff", "diff_ci_low", "diff_ci_high", "p_value", "rel_improvement_pct", "n_queries"]
        ].rename(columns={"mean_a": f"{self.base_model} ndcg@5", "mean_b": "tuned ndcg@5", "rel_improvement_pct": "rel_%"})
        return table.round(4).reset_index(drop=True)

    def summary(self) -> str:
        lines = []
        for row in self.checks.itertuples(index=False):
            lines.append(
                f"{row.check}: {row.model_a} {row.mean_a:.4f} -> {row.model_b_label} {row.mean_b:.4f} "
                f"(diff {row.diff:+.4f}, 95% CI [{row.diff_ci_low:+.4f}, {row.diff_ci_high:+.4f}], p={row.p_value:.4f}, "
                f"{row.rel_improvement_pct:+.1f}%, {row.n_queries} queries)"
            )
        return "\n".join(lines + list(self.notes))

    def markdown(self):
        """The checks as sentences that say whether each 95% interval excludes zero (IPython Markdown)."""
        from IPython.display import Markdown

        out = []
        for row in self.checks.itertuples(index=False):
            if row.diff_ci_low > 0:
                verdict = "**a significant gain** (the 95% interval excludes zero)"
            elif row.diff_ci_high < 0:
                verdict = "**a significant loss** (the 95% interval excludes zero)"
            else:
                verdict = "no significant change (the 95% interval includes zero)"
            out.append(
                f"- *{row.check}* ({row.n_queries} queries): {self.base_model} {row.mean_a:.3f} → {row.model_b_label} "
                f"{row.mean_b:.3f}, difference {row.diff:+.3f} (95% CI {row.diff_ci_low:+.3f} to {row.diff_ci_high:+.3f}, "
                f"p = {row.p_value:.3g}, {row.rel_improvement_pct:+.1f}% relative): {verdict}."
            )
        out += [f"- _{note}_" for note in self.notes]
        return Markdown("\n".join(out))

    def example_queries(self, catalog: Catalog, n: int = 3, seed: int = 0) -> list[str]:
        """``n`` evaluation items of different frequent labels (seeded), for side-by-side grids."""
        items = catalog.items.loc[list(self.eval_ids)]
        common = items[self.label].value_counts()
        labels = [v for v in common.index if str(v).strip()][: max(n * 3, n)]
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(labels), size=min(n, len(labels)), replace=False)
        picks = []
        for i in sorted(chosen):
            pool = items.index[items[self.label] == labels[i]].to_numpy()
            picks.append(str(rng.choice(pool)))
        return picks

    def similar_rows(self, catalog: Catalog, query_id: str, k: int = 5) -> dict[str, pd.DataFrame]:
        """Top-k similar evaluation items of ``query_id`` before and after fine-tuning."""
        return {
            f"{self.base_model} (before)": similar_among(catalog, self.workdir, self.base_model, [query_id], self.eval_ids, k=k, label=self.label),
            "fine-tuned (after)": similar_among(catalog, self.workdir, self.tuned_model, [query_id], self.eval_ids, k=k, label=self.label),
        }

    def text_rows(self) -> dict[str, dict[str, pd.DataFrame]]:
        """``{query: {"fine-tuned": frame}}`` for :func:`vrec_utils.plots.text_search_grid`."""
        return {q: {"fine-tuned": frame} for q, frame in self.text_results.groupby("query_text", sort=False)}

    def expected_labels(self) -> dict[str, str]:
        return dict(zip(self.text_results["query_text"], self.text_results["expected"]))


def _compare(catalog, workdir, base_model, tuned, split, label, n_bootstrap, check, tuned_label) -> dict[str, Any]:
    from .evaluate import evaluate_models

    result = evaluate_models(
        catalog, workdir, [base_model, tuned], label=label, split=split, ks=(5,), metrics=["ndcg@5"], n_bootstrap=n_bootstrap,
    )
    row = result.compare(base_model, tuned, ["ndcg@5"]).iloc[0].to_dict()
    return {"check": check, "model_b_label": tuned_label, **row}


def measure_finetune(
    catalog: Catalog,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    config: FinetuneConfig | None = None,
    base: str = "mini-siglip",
    base_model: str = "efficientnet-lite0",
    holdout: Sequence[str] | dict[str, str | Sequence[str]] | None = DEFAULT_HOLDOUT,
    photo_shift: bool = True,
    queries: dict[str, str] | None = None,
    label: str = "articleType",
    n_bootstrap: int = 2000,
    device: str | torch.device | None = "auto",
    progress: bool = True,
) -> FinetuneMeasurement:
    """Train (or reuse) the fine-tunes and measure them against ``base_model`` on nDCG@5:

    * **in-domain**: the catalog's evaluation split (never trained on), all categories;
    * **category shift** (``holdout``: ``"column=value"`` entries or ``{column: [values]}``): a
      second model trained without the ``holdout`` categories, evaluated on the held-out categories' evaluation items, and, side by side, on
      the other (seen) categories' evaluation items;
    * **photometric shift** (``photo_shift``): the evaluation items re-shot
      (:func:`photo_shift_image`), queries and candidates alike.

    Every comparison is paired (same queries) with a bootstrap 95% CI of the difference.
    Also returns an alpha sweep on the evaluation split (reporting only) and text queries.
    """
    config = config or FinetuneConfig()
    workdir = Path(workdir)
    queries = DEFAULT_TEXT_QUERIES if queries is None else queries
    if isinstance(holdout, dict):
        holdout = [f"{c}={v}" for c, values in holdout.items() for v in ([values] if isinstance(values, str) else values)]
    split = split_catalog(catalog, config.eval_fraction, config.split_seed)
    if len(split.eval) < MIN_CHECK_ITEMS:
        raise ValueError(
            f"catalog {catalog.name!r} has {len(split.eval)} evaluation items ({config.eval_fraction:.0%} of {len(catalog)}); "
            f"measuring a fine-tune needs at least {MIN_CHECK_ITEMS}"
        )
    runs: dict[str, dict[str, Any]] = {}
    tuned = ensure_finetuned(catalog, workdir, base, config=config, device=device, progress=progress)
    runs["in-domain"] = load_result(tuned[len("local:") :])["result"]
    extract_finetuned_embeddings(catalog, tuned, workdir, device=device, progress=progress)
    extract_finetuned_embeddings(catalog, base_model, workdir, device=device, progress=progress)  # cached: a quick check
    checks = [_compare(catalog, workdir, base_model, tuned, split, label, n_bootstrap, "in-domain (eval split)", "tuned")]

    shift_model = None
    notes: list[str] = []
    if holdout:
        held = pd.Series(False, index=catalog.items.index)
        for column, value in parse_exclude(holdout):
            catalog.require_column(column)
            held |= catalog.items[column].astype(str) == value
        eval_ids = pd.Index(split.eval)
        unseen = tuple(eval_ids[held.loc[eval_ids].to_numpy()])
        seen = tuple(eval_ids[~held.loc[eval_ids].to_numpy()])
        names = "+".join(v for _, v in parse_exclude(holdout))
        if min(len(unseen), len(seen)) < MIN_CHECK_ITEMS:
            notes.append(
                f"Category-shift check skipped: holdout {list(holdout)} leaves {len(unseen)} held-out and {len(seen)} seen "
                f"evaluation items, and each side needs at least {MIN_CHECK_ITEMS} (a larger catalog or other categories)."
            )
        else:
            shift_config = dataclasses.replace(config, exclude=tuple(holdout))
            shift_model = ensure_finetuned(catalog, workdir, base, config=shift_config, device=device, progress=progress)
            runs["category-shift"] = load_result(shift_model[len("local:") :])["result"]
            extract_finetuned_embeddings(catalog, shift_model, workdir, device=device, progress=progress)
            checks.append(_compare(catalog, workdir, base_model, shift_model, Split((), unseen, split.seed, split.eval_fraction),
                                   label, n_bootstrap, f"category shift: held-out {names}", "tuned w/o held-out"))
            checks.append(_compare(catalog, workdir, base_model, shift_model, Split((), seen, split.seed, split.eval_fraction),
                                   label, n_bootstrap, "category shift: seen categories", "tuned w/o held-out"))
    if photo_shift:
        shifted = photo_shift_catalog(catalog, split.eval, workdir / "shifted" / f"{slugify(catalog.name)}-{catalog.fingerprint()[:8]}-photo")
        extract_finetuned_embeddings(shifted, tuned, workdir, device=device, progress=progress)
        extract_finetuned_embeddings(shifted, base_model, workdir, device=device, progress=progress)
        checks.append(_compare(shifted, workdir, base_model, tuned, None, label, n_bootstrap, "photometric shift (eval re-shot)", "tuned"))

    sweep, _ = _alpha_sweep(catalog, workdir, tuned, base_model, split, label, device, n_bootstrap)
    sweeps = [] if sweep is None else [sweep.assign(check="in-domain (eval split)")]
    if shift_model is not None:
        unseen_split = Split((), unseen, split.seed, split.eval_fraction)
        sweep, result = _alpha_sweep(catalog, workdir, shift_model, base_model, unseen_split, label, device, n_bootstrap)
        if sweep is not None:
            sweeps.append(sweep.assign(check=f"category shift: held-out {names}"))
            row = result.compare("alpha=0", "alpha=1", ["ndcg@5"]).iloc[0].to_dict()
            row.update(model_a=base_model, model_b=shift_model)
            checks.insert(2, {"check": f"category shift: held-out {names}, no guard (alpha=1)", "model_b_label": "tuned w/o held-out, alpha=1", **row})
    columns = ["check", "alpha", "mean", "ci_low", "ci_high", "n_queries"]
    alpha_sweep = pd.concat(sweeps, ignore_index=True)[columns] if sweeps else pd.DataFrame(columns=columns)
    text_results = text_queries(catalog, workdir, tuned, list(queries), ids=split.eval, k=5, label=label, device=device)
    text_results["expected"] = text_results["query_text"].map(queries)
    text_precision = label_text_precision(catalog, workdir, tuned, split.eval, label=label, device=device)
    return FinetuneMeasurement(
        base_model=base_model, tuned_model=tuned, shift_model=shift_model, checks=pd.DataFrame(checks),
        alpha_sweep=alpha_sweep, text_results=text_results, text_precision=text_precision, runs=runs,
        eval_ids=tuple(split.eval), workdir=workdir, label=label, notes=tuple(notes),
    )


def _alpha_sweep(catalog, workdir, tuned, base_model, split, label, device, n_bootstrap=1000):
    """nDCG@5 on ``split.eval`` for each alpha of :data:`ALPHA_GRID` (reporting only) and the
    evaluation result (rows ``alpha=<a>``; ``alpha=0`` is the base model). (None, None) for
    models without an output mix."""
    from .evaluate import evaluate_embeddings
    from .models import create_embedder
    from .models.mini_siglip import MiniSiglipEmbedder
    from .store import Embeddings, load_embeddings

    embedder = create_embedder(tuned, device="cpu")
    if not isinstance(embedder, MiniSiglipEmbedder):
        return None, None
    base = load_embeddings(workdir, catalog, base_model).restrict(split.eval)
    x = torch.from_numpy(np.asarray(base.vectors, dtype=np.float32))
    with torch.inference_mode():
        variants = {
            f"alpha={a:g}": Embeddings(base.ids, embedder.heads.image(x, a).numpy(), {**base.manifest, "model": f"alpha={a:g}"})
            for a in ALPHA_GRID
        }
    result = evaluate_embeddings(catalog, variants, label=label, split=split, ks=(5,), metrics=["ndcg@5"], n_bootstrap=n_bootstrap)
    table = result.summary()
    table["alpha"] = [float(m.split("=")[1]) for m in table["model"]]
    return table[["alpha", "mean", "ci_low", "ci_high", "n_queries"]].reset_index(drop=True), result
