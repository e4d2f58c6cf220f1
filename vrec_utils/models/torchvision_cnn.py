"""torchvision CNNs: ResNet-50 global-average-pooled features."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.models import ResNet50_Weights, resnet50

from ._common import (
    find_weights_file,
    is_random,
    load_state_dict_file,
    local_weights_id,
    random_weights_id,
    seeded_random_init,
)
from .base import SingleModelEmbedder
from .hub import require_torch_hub_file
from .registry import WeightSource, register_model


class TorchvisionCNNEmbedder(SingleModelEmbedder):
    """A torchvision classifier with its head replaced by ``Identity``: pooled backbone features."""

    prefers_channels_last = True

    def __init__(self, name: str, model: torch.nn.Module, dim: int, image_transform, weights_id: str) -> None:
        super().__init__(model, weights_id)
        self.name = name
        self.dim = dim
        self.image_transform = image_transform

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


@register_model(
    "resnet50",
    description="torchvision ResNet-50, ImageNet-1k V2 weights; 2048-d global-average-pooled features",
    has_text=False,
    weights_from=(WeightSource("torchvision", ResNet50_Weights.IMAGENET1K_V2.url),),
)
def resnet50_factory(weights: str | os.PathLike | None = None) -> TorchvisionCNNEmbedder:
    """``weights``: None (torchvision IMAGENET1K_V2), a .pth/.safetensors file or a directory holding
    one, or ``"random"``."""
    preset = ResNet50_Weights.IMAGENET1K_V2
    if is_random(weights):
        with seeded_random_init():
            model = resnet50(weights=None)
        weights_id = random_weights_id()
    else:
        if weights is None:
            path = require_torch_hub_file(preset.url, model="resnet50")
            source = f"torchvision:{preset}"
        else:
            path = find_weights_file(weights, preferred=[os.path.basename(preset.url)])
            source = str(Path(path).resolve())
        weights_id = local_weights_id(path)  # the same file from torch's cache or from --weights: one id
        state = load_state_dict_file(path)
        with torch.device("meta"):  # no point initialising what the state dict replaces
            model = resnet50(weights=None)
        if "fc.weight" not in state:  # a headless (feature-extractor) state dict
            model.fc = torch.nn.Identity()
        model.load_state_dict(state, strict=True, assign=True)
    model.fc = torch.nn.Identity()
    embedder = TorchvisionCNNEmbedder("resnet50", model, 2048, preset.transforms(), weights_id)
    embedder.weights_source = None if is_random(weights) else source
    return embedder
