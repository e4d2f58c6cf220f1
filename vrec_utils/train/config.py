"""What a fine-tuning run learns: :class:`FinetuneConfig` (saved as ``config.json``) and its choices."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TRAINABLE = ("heads", "last", "all")
SCHEDULES = ("cosine", "linear", "constant")
SELECT_BY = ("val_ndcg", "val_loss", "last")
LOSS_INIT = ("paper", "model")
MIXES = ("output", "weights")  # output: alpha mix of embeddings; weights: WiSE-FT interpolation of the image head
SELECT_ON = ("val", "shift")  # where the mix coefficient is chosen: in-domain validation, or a shifted selection set
IMAGE_HEADS = ("residual", "diagonal")  # mini-siglip image head: x + W x + c (or low rank), or x * (1 + s) + c
#: How a gated mini-siglip serves image queries (recorded in the saved model as ``serving``): routed: a
#: query outside its in-domain gate searches the base model's vectors; served: every query searches the
#: model's served vectors (one index). A model without a gate is always recorded as served.
SERVING_MODES = ("routed", "served")
#: Fields added after runs were recorded: left out of :meth:`FinetuneConfig.to_dict` at their
#: default, so the digest (the run folder and checkpoint identity) of earlier runs is unchanged.
LATER_FIELDS = {"image_head": "residual", "l2sp": 0.0, "in_domain_gate": None, "block_lr_scale": 0.1, "serving": "routed"}
#: Fields used only after training, to choose and record the mix coefficient.
SELECTION_FIELDS = ("recipe", "mix", "select_on", "shift_catalog", "shift_label", "shift_group", "shift_seed", "shift_tolerance", "alpha", "alpha_tolerance", "in_domain_gate", "serving")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides what a fine-tuning run learns (saved as ``config.json``).

    ``None`` means "the default of the base model" where noted. Override with
    ``dataclasses.replace(config, epochs=5)``.
    """

    # -- what trains
    trainable: str = "heads"  # heads | last (last ``last_blocks`` blocks + heads; mini-siglip: its image tower's last block) | all
    last_blocks: int = 1
    block_lr_scale: float = 0.1  # mini-siglip with trainable="last": the tuned block's lr factor (and no weight decay)
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
    image_head: str = "residual"  # residual (full or low rank) | diagonal: a per-dimension scale and shift
    text_hidden: int | None = None  # None: linear text head; else MLP width
    # -- robustness recipe (mini-siglip; see vrec_utils.train.recipes)
    recipe: str = "alpha-mix"  # the recipe's name, recorded in the saved model
    mix: str = "output"  # output: alpha output mix; weights: WiSE-FT (image head update scaled by the coefficient)
    distill: float = 0.0  # weight of the in-batch image-image similarity distillation term (0: off)
    l2sp: float = 0.0  # L2-SP weight: l2sp * ||theta - theta0||^2 over the image head's tensors (0: off)
    probe_epochs: int = 0  # first epochs train the text head only (image head stays the identity): LP-FT
    augment_views: int = 0  # precomputed photo-like augmented views per training image (0: off)
    augment_max_items: int | None = 3000  # training items that get augmented views (a seeded subset)
    select_on: str = "val"  # val: coefficient chosen on in-domain validation; shift: also on a shifted selection set
    shift_catalog: str | None = None  # the shifted catalog whose selection half chooses the coefficient
    shift_label: str = "label"
    shift_group: str = "sender_id"  # the shifted catalog is split by this column into selection / reported halves
    shift_seed: int = 0
    shift_tolerance: float = 0.0  # coefficients may lose at most this much nDCG@5 on the selection half vs the base
    in_domain_gate: float | None = None  # mix only images within this quantile of validation Mahalanobis distances; None: off
    serving: str = "routed"  # a gated model's serving mode (SERVING_MODES), recorded in the saved model

    def serving_mode(self) -> str:
        """The mode the saved model records: ``serving`` for a gated model, "served" without a gate."""
        return self.serving if self.in_domain_gate is not None else "served"

    def __post_init__(self) -> None:
        _choice("trainable", self.trainable, TRAINABLE)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("select_by", self.select_by, SELECT_BY)
        _choice("loss_init", self.loss_init, LOSS_INIT)
        _choice("mix", self.mix, MIXES)
        _choice("select_on", self.select_on, SELECT_ON)
        _choice("image_head", self.image_head, IMAGE_HEADS)
        _choice("serving", self.serving, SERVING_MODES)
        if self.image_head == "diagonal" and self.image_rank is not None:
            raise ValueError("image_rank applies to the residual image head; image_head='diagonal' has no rank")
        if self.select_on == "shift" and not self.shift_catalog:
            raise ValueError("select_on='shift' needs shift_catalog (a shifted catalog with labels and a group column)")
        if self.in_domain_gate is not None and not 0.0 < self.in_domain_gate <= 1.0:
            raise ValueError(f"in_domain_gate is a quantile in (0, 1], got {self.in_domain_gate}")
        if self.in_domain_gate is not None and self.mix != "output":
            raise ValueError("in_domain_gate gates the output mix; it needs mix='output'")
        if self.mix == "weights" and self.alpha is not None:
            raise ValueError("alpha is the output mix; with mix='weights' the interpolation coefficient is chosen on selection")
        if not self.block_lr_scale > 0:
            raise ValueError(f"block_lr_scale must be > 0, got {self.block_lr_scale}")
        for name in ("distill", "l2sp", "shift_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("probe_epochs", "augment_views"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.probe_epochs >= self.epochs:
            raise ValueError(f"probe_epochs ({self.probe_epochs}) must be below epochs ({self.epochs})")
        if self.augment_max_items is not None and self.augment_max_items < 1:
            raise ValueError(f"augment_max_items must be >= 1 or None, got {self.augment_max_items}")
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
        data = {**dataclasses.asdict(self), "exclude": list(self.exclude)}
        return {k: v for k, v in data.items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig field(s): {', '.join(unknown)}")
        return cls(**{**data, "exclude": tuple(data.get("exclude", ()))})

    def training_dict(self) -> dict[str, Any]:
        """The fields that decide the trained weights (not :data:`SELECTION_FIELDS`): runs that
        differ only in how the coefficient is chosen share their training (``warm_start``)."""
        return {k: v for k, v in self.to_dict().items() if k not in SELECTION_FIELDS}

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
