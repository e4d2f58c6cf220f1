"""The one interface every embedding model implements.

An :class:`Embedder` turns preprocessed pixel tensors (and, for vision-language models, texts)
into vectors. Preprocessing travels with the weights: ``image_transform`` is the exact transform
the weights expect (a picklable callable, so DataLoader workers can run it), and
``identity()`` describes weights + preprocessing so the embedding cache knows when it is stale.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


class ModelUnavailableError(RuntimeError):
    """The weights cannot be had here; the message says how to get them."""


class UntrustedFileError(ValueError):
    """A weights or checkpoint file vrec refuses to load: it holds pickled objects other than
    tensors (which could run code), or is not the safetensors file it claims to be."""

    def __init__(self, path: str | os.PathLike, remedy: str) -> None:
        self.path = Path(path)
        self.remedy = remedy
        super().__init__(
            f"{str(path)!r} is not a trusted vrec checkpoint (vrec loads tensors only, never pickled "
            f"objects, which could run code); {remedy}"
        )


class TextNotSupportedError(ValueError):
    """Raised by image-only models asked to embed text."""


class Embedder(ABC):
    """Image (and optionally text) embedding model.

    Subclasses set ``name``, ``dim``, ``image_transform`` and implement ``encode_image`` (and
    ``encode_text`` when ``has_text``). They keep their torch modules in ``self.modules()``
    order so ``to()`` can move them.
    """

    name: str
    dim: int
    has_text: bool = False
    has_image: bool = True
    image_transform: Callable[[Image.Image], torch.Tensor]
    #: channels_last helps convolution-heavy models on CPU and GPU; transformers do not care.
    prefers_channels_last: bool = False
    #: the image vectors are heads over another model's features (:attr:`feature_model`), mixed
    #: with them by an output-mix weight alpha (mini-SigLIP): extraction reuses that model's
    #: cached features and runs only :meth:`image_from_features`, and alpha can be swept
    has_output_mix: bool = False
    #: with an output mix: the heads also read the feature model's maps before its last block
    #: (a tuned block), so cached pooled features alone cannot give the vectors
    needs_maps: bool = False
    #: the text tower splits into :meth:`tokenize` (Python, strings -> integer tensors) and
    #: :meth:`encode_tokens` (tensors only), so an engine other than torch can run the second part
    has_token_path: bool = False
    #: with a token path: the length every text's tokens are padded to (the model's context, as it
    #: was trained), or None when a batch is padded to its longest text (attention-masked models)
    text_length: int | None = None

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    # -- identity (cache keys, manifests) --------------------------------------------------
    @abstractmethod
    def weights_id(self) -> str:
        """Identifies the weights by content: a file digest (``sha256:...``), a PyPI package's, or
        ``random-init:seed``."""

    #: where the weights came from, for people reading a result ("hf:<repo>@<commit>", a local
    #: path, "torchvision:..."); not part of the identity, so the same weights reached another way
    #: are the same model
    weights_source: str | None = None

    def describe_weights(self) -> str:
        """The weights as they should be named beside any number made with them."""
        weights = self.weights_id()
        if weights.startswith("random-init"):
            return f"{weights} (random weights: test only, not a real model)"
        if self.weights_source and self.weights_source != weights:
            return f"{self.weights_source} ({weights})"
        return weights

    def preprocess_id(self) -> str:
        """Describes the image transform. Default: its repr, which torchvision makes precise."""
        return repr(self.image_transform)

    def identity(self) -> dict[str, Any]:
        return {"model": self.name, "weights": self.weights_id(), "preprocess": self.preprocess_id(), "dim": self.dim}

    # -- capabilities ----------------------------------------------------------------------
    @property
    def feature_model(self) -> "Embedder | None":
        """The model whose (cached) image features this one's vectors are computed from, or None."""
        return None

    def image_from_features(self, features: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        """Image vectors from :attr:`feature_model`'s normalised features (``alpha``: the output mix,
        default the model's own). Only for models with ``has_output_mix``."""
        raise NotImplementedError(f"model {self.name!r} has no output mix over another model's features")

    # -- torch plumbing ----------------------------------------------------------------------
    @abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """The torch modules that hold the weights."""

    def to(self, device: str | torch.device) -> "Embedder":
        self.device = torch.device(device)
        for module in self.modules():
            module.to(self.device)
            module.eval()
        return self

    # -- encoders ---------------------------------------------------------------------------
    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) tensor on ``self.device`` from ``image_transform`` -> (B, dim) float tensor."""

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """List of strings -> (B, dim) float tensor in the same space as the images."""
        raise TextNotSupportedError(
            f"model {self.name!r} is image-only and cannot embed text; use a vision-language model "
            "such as siglip-base, an openclip:... model or mini-siglip"
        )

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> the text tower's inputs by name, (B, L) integer tensors on the CPU (models
        with ``has_token_path``)."""
        raise NotImplementedError(f"model {self.name!r} does not split its text tower into tokens and tensors")

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`tokenize`'s output (on ``self.device``) -> (B, dim) float tensor; ``encode_text``
        of the same texts."""
        raise NotImplementedError(f"model {self.name!r} does not split its text tower into tokens and tensors")

    # -- conveniences for notebooks and single queries ------------------------------------
    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], normalize: bool = True) -> np.ndarray:
        """Embed already-decoded RGB images (use :func:`vrec_utils.images.load_rgb` to decode)."""
        pixels = torch.stack([self.image_transform(im) for im in images]).to(self.device)
        if self.prefers_channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return _to_numpy(self.encode_image(pixels), normalize)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], normalize: bool = True, batch_size: int = 64) -> np.ndarray:
        if not self.has_text:
            self.encode_text(texts)  # raises TextNotSupportedError with the explanation
        chunks = [self.encode_text(list(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return _to_numpy(torch.cat(chunks) if chunks else torch.empty(0, self.dim), normalize)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.identity())[:200]})"


class SingleModelEmbedder(Embedder):
    """An embedder whose weights all live in one module, ``self.model``, identified by a string
    fixed when the weights are loaded (most families)."""

    def __init__(self, model: torch.nn.Module, weights_id: str, weights_source: str | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self._weights_id = weights_id
        self.weights_source = weights_source

    def weights_id(self) -> str:
        return self._weights_id

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]


def _to_numpy(features: torch.Tensor, normalize: bool) -> np.ndarray:
    features = features.float()
    if normalize:
        features = torch.nn.functional.normalize(features, dim=-1)
    return features.cpu().numpy()
