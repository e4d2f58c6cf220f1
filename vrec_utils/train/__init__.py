"""Sigmoid-loss fine-tuning of two-tower image-text models on a catalog's (image, title) pairs.

This is the Mercari recipe (fine-tune SigLIP with its sigmoid loss on product image-title pairs)
as a measured part of the workbench. Training sits below evaluation: nothing here imports
``evaluate``, ``search`` or ``index`` (the before/after study is :mod:`vrec_utils.studies.finetune_study`).

Modules, each importing only modules listed before it:

* :mod:`.loss`: :func:`sigmoid_loss` (SigLIP's pairwise logistic loss, learnable ``t' `` and ``b``;
  paper init t' = log 10, b = -10) and :class:`SigmoidLoss`;
* :mod:`.config`: :class:`FinetuneConfig`, everything that decides what a run learns;
* :mod:`.pairs`: :func:`make_pairs`, the train/validation pairs from the train split only;
* :mod:`.embed`: :func:`extract_finetuned_embeddings`, a tuned model's embeddings through the cache;
* :mod:`.recipes`: robustness recipes (WiSE-FT interpolation, photo-like augmentations, the
  shifted selection set split by sender) and :data:`RECIPES`, the study's named recipes;
* :mod:`.pair_models`: the families as the loop sees them (mini-siglip on cached frozen-tower
  features; SigLIP/open_clip towers run in the loop, ``trainable`` picks heads/last blocks/all);
* :mod:`.validation`: validation nDCG@5 and loss, the best epoch, the output mix ``alpha``;
* :mod:`.loop`: :func:`finetune` -> :class:`FinetuneResult` (checkpoints every epoch, resumes);
* :mod:`.runs`: :func:`ensure_finetuned` (train only when no up-to-date run exists), run folders.
"""

from .config import (
    LOSS_INIT,
    MIXES,
    SCHEDULES,
    SELECT_BY,
    SELECT_ON,
    SERVING_MODES,
    TRAINABLE,
    FinetuneConfig,
    parse_exclude,
)
from .embed import extract_finetuned_embeddings
from .loop import CHECKPOINT, FinetuneResult, finetune, lr_factor
from .loss import (
    PAPER_BIAS,
    PAPER_T_PRIME,
    SigmoidLoss,
    l2_sp,
    sigmoid_loss,
    similarity_distillation,
)
from .pair_models import PairModel, create_pair_model, select_parameters
from .pairs import PairSet, make_pairs, title_series
from .recipes import (
    RECIPES,
    SelectionSet,
    interpolate_state,
    photo_augment,
    recipe_config,
    shift_halves,
)
from .runs import default_run_dir, ensure_finetuned, find_finetuned, load_result
from .validation import ALPHA_GRID, choose_alpha, label_ndcg

__all__ = [
    "ALPHA_GRID",
    "CHECKPOINT",
    "LOSS_INIT",
    "MIXES",
    "PAPER_BIAS",
    "PAPER_T_PRIME",
    "RECIPES",
    "SCHEDULES",
    "SELECT_BY",
    "SELECT_ON",
    "SERVING_MODES",
    "TRAINABLE",
    "FinetuneConfig",
    "FinetuneResult",
    "PairModel",
    "PairSet",
    "SelectionSet",
    "SigmoidLoss",
    "choose_alpha",
    "create_pair_model",
    "default_run_dir",
    "ensure_finetuned",
    "extract_finetuned_embeddings",
    "find_finetuned",
    "finetune",
    "interpolate_state",
    "l2_sp",
    "label_ndcg",
    "load_result",
    "lr_factor",
    "make_pairs",
    "parse_exclude",
    "photo_augment",
    "recipe_config",
    "select_parameters",
    "shift_halves",
    "sigmoid_loss",
    "similarity_distillation",
    "title_series",
]  # fmt: skip
