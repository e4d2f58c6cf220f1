"""The SigLIP sigmoid loss (Zhai et al. 2023) and its learnable temperature and bias."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

PAPER_T_PRIME = math.log(10.0)
PAPER_BIAS = -10.0


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


def similarity_distillation(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the tuned and the base model's in-batch image-image
    cosine similarities, over the off-diagonal pairs (i != j) of the ``(n, n)`` matrices::

        S_ij = <tuned_i, tuned_j> / (|tuned_i| |tuned_j|),   T_ij likewise for ``base``
        loss = 1 / (n (n - 1)) * sum_{i != j} (S_ij - T_ij)^2

    The base side carries no gradient (it is the frozen model)."""
    if tuned.ndim != 2 or base.ndim != 2 or tuned.shape[0] != base.shape[0]:
        raise ValueError(f"tuned and base must be (n, d) with the same n, got {tuple(tuned.shape)} and {tuple(base.shape)}")
    n = tuned.shape[0]
    if n < 2:
        return tuned.sum() * 0.0
    tuned = F.normalize(tuned, dim=-1)
    base = F.normalize(base.detach(), dim=-1)
    diff = tuned @ tuned.T - base @ base.T
    off = ~torch.eye(n, dtype=torch.bool, device=tuned.device)
    return diff[off].pow(2).mean()


def l2_sp(params: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2-SP (Li et al. 2018): the squared distance of ``params`` from their starting point,
    ``sum_k ||params[k] - initial[k]||^2`` over the keys of ``params`` (``initial`` carries no
    gradient). On mini-SigLIP's image head, which starts as the identity, it pulls the tuned
    model back toward the base model (for the low-rank head's random ``down`` matrix, toward its
    initial values rather than toward zero)."""
    missing = sorted(set(params) - set(initial))
    if missing:
        raise ValueError(f"no starting value for {', '.join(missing)}")
    if not params:
        raise ValueError("l2_sp needs at least one tensor")
    return sum((p - initial[k].detach().to(p)).pow(2).sum() for k, p in params.items())
