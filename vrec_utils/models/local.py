"""``local:DIR``: models saved by ``vrec finetune`` (a folder with ``vrec_model.json``).

Two families of saved models:

* ``mini-siglip``: heads on top of the offline towers (see :mod:`.mini_siglip`);
* ``tuned``: a fine-tuned copy of any registered vision-language model (SigLIP, open_clip, the
  tiny test models). The folder holds the complete weights of the base's torch modules in
  ``model.safetensors`` (no pickle), so loading needs no hub: the base architecture is built
  with ``weights="random"`` and the saved tensors replace every weight.

``DIR`` may be the model folder itself or a run folder with a ``model/`` child. The embedder's
``weights_id()`` is the digest of the saved tensors, so the embedding cache never serves vectors
of an older fine-tune.

A mini-siglip model with an in-domain gate routes image queries (:func:`query_router`): a query
whose base features the gate passes searches the tuned vectors, any other query searches the base
model's vectors of the same catalog, so an out-of-domain photo gets exactly efficientnet-lite0's
neighbours and is never compared with tuned vectors of studio shots (issue 13, round 5). The saved
model records this serving mode (``serving``: "routed", or "served" for a gated model that serves its
gated vectors to every query, :func:`serving_mode`); a model saved before the mode was recorded routes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import load_safetensors_file
from .base import Embedder
from .mini_siglip import (
    IMAGE_TOWER,
    IMAGE_TOWER_WEIGHTS,
    TEXT_TOWER_WEIGHTS,
    LOCAL_MODEL_REMEDY,
    MODEL_JSON,
    InDomainGate,
    file_digest,
    load_heads,
    load_mini_siglip,
    read_model_json,
    resolve_model_dir,
)
from .registry import create_embedder, register_model

TUNED_FAMILY = "tuned"
TUNED_WEIGHTS = "model.safetensors"


class TunedEmbedder(Embedder):
    """A base embedder whose weights were replaced by a fine-tune; identity = the saved digest."""

    def __init__(self, inner: Embedder, *, digest: str, base: str) -> None:
        super().__init__()
        self.inner = inner
        self.base = base
        self.digest = digest
        self.name = f"tuned:{base}"
        self.dim = inner.dim
        self.has_text = inner.has_text
        self.has_image = inner.has_image
        self.image_transform = inner.image_transform
        self.prefers_channels_last = inner.prefers_channels_last
        self.has_token_path = inner.has_token_path
        self.text_length = inner.text_length

    def weights_id(self) -> str:
        return f"finetuned[{self.base};sha256:{self.digest[:16]}]"

    def preprocess_id(self) -> str:
        return self.inner.preprocess_id()

    def modules(self) -> list[torch.nn.Module]:
        return self.inner.modules()

    def to(self, device: str | torch.device) -> TunedEmbedder:
        self.inner.to(device)
        self.device = self.inner.device
        return self

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_image(pixels)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.inner.encode_text(texts)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.inner.tokenize(texts)

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner.encode_tokens(tokens)


def module_state(embedder: Embedder) -> dict[str, torch.Tensor]:
    """Every tensor of the embedder's modules, keyed ``m<i>.<name>`` (copied: tied weights are
    saved under each name, which safetensors requires)."""
    return {
        f"m{i}.{name}": tensor.detach().cpu().clone().contiguous()
        for i, module in enumerate(embedder.modules())
        for name, tensor in module.state_dict().items()
    }


def save_tuned(directory: str | os.PathLike, embedder: Embedder, *, base: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``vrec_model.json`` for a fine-tuned copy of ``base``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (TUNED_WEIGHTS + ".tmp")
    save_file(module_state(embedder), str(tmp))
    os.replace(tmp, directory / TUNED_WEIGHTS)
    inner = embedder.inner if isinstance(embedder, TunedEmbedder) else embedder
    meta = {
        "format": "vrec-local-model",
        "version": 1,
        "family": TUNED_FAMILY,
        "base": base,
        "base_weights": inner.weights_id(),
        "weights": {"file": TUNED_WEIGHTS, "sha256": file_digest(directory / TUNED_WEIGHTS)},
        "dim": embedder.dim,
        "has_text": embedder.has_text,
        **(extra or {}),
    }
    meta["base"] = base
    tmp_json = directory / (MODEL_JSON + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp_json, directory / MODEL_JSON)
    return directory


def load_tuned(directory: str | os.PathLike) -> TunedEmbedder:
    directory = resolve_model_dir(directory)
    meta = read_model_json(directory)
    path = directory / meta["weights"]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the model folder {directory} is incomplete")
    digest = file_digest(path)
    if meta["weights"].get("sha256") not in (None, digest):
        raise ValueError(f"{path} does not match the sha256 recorded in {directory / MODEL_JSON}; the folder was modified")
    try:  # the architecture only: every weight is replaced below, so nothing is downloaded
        inner = create_embedder(meta["base"], weights="random", device="cpu")
    except ValueError:  # a base with no random-init form (e.g. openclip:hf-hub:...): its own weights
        inner = create_embedder(meta["base"], device="cpu")
    state = load_safetensors_file(path, LOCAL_MODEL_REMEDY)
    for i, module in enumerate(inner.modules()):
        prefix = f"m{i}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit base {meta['base']!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return TunedEmbedder(inner, digest=digest, base=meta["base"])


def load_local_model(directory: str | os.PathLike, alpha: float | None = None) -> Embedder:
    """The embedder saved in ``directory`` (see the module docstring)."""
    directory = resolve_model_dir(directory)
    family = read_model_json(directory).get("family")
    if family == "mini-siglip":
        return load_mini_siglip(directory, alpha=alpha)
    if alpha is not None:
        raise ValueError(f"alpha applies to mini-siglip models; {directory} holds a {family!r} model")
    if family == TUNED_FAMILY:
        return load_tuned(directory)
    raise ValueError(f"{directory / MODEL_JSON} names an unknown model family {family!r}")


LOCAL_SCHEME = "local:"


@dataclass(frozen=True)
class QueryRouter:
    """How a gated mini-siglip serves image queries: :meth:`inside` rows (by the gate, on the
    query's unit-norm ``base_model`` features) search the model's own vectors, the others search
    ``base_model``'s vectors of the same catalog (the embedding store's, by content digest)."""

    base_model: str
    gate: InDomainGate

    def inside(self, base_vectors: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.gate(torch.from_numpy(np.asarray(base_vectors, dtype=np.float32))).bool().numpy()


#: ``vrec_model.json``'s key for how a gated model serves image queries ("routed" or "served"); recorded by
#: ``vrec finetune`` since issue 13 round 6
SERVING_KEY = "serving"
_NOTED: set[Path] = set()  # model folders whose missing serving mode was already noted


def _saved_mini_siglip(model: str) -> tuple[Path, dict, bool] | None:
    """``(model folder, vrec_model.json, has an in-domain gate)`` of a ``local:`` model, else None."""
    directory = local_model_dir(model)
    if directory is None:
        return None
    directory = resolve_model_dir(directory)
    meta = read_model_json(directory)
    return directory, meta, meta.get("family") == "mini-siglip" and bool(meta.get("heads", {}).get("gate", False))


def _router(directory: Path, meta: dict) -> QueryRouter:
    heads, _ = load_heads(directory, meta)
    return QueryRouter(IMAGE_TOWER, heads.gate.cpu().eval())


def gate_router(model: str) -> QueryRouter | None:
    """The :class:`QueryRouter` of a ``local:`` mini-siglip model's in-domain gate, whatever its
    serving mode (studies compare both modes), else None (reads only ``vrec_model.json`` and the heads)."""
    saved = _saved_mini_siglip(model)
    return _router(*saved[:2]) if saved is not None and saved[2] else None


def inside_gate(model: str, base_vectors: np.ndarray) -> np.ndarray:
    """Which rows of ``base_vectors`` (unit-norm base-model features) ``model``'s in-domain gate
    passes, whatever its serving mode; every row for a model without a gate."""
    router = gate_router(model)
    return np.ones(len(base_vectors), dtype=bool) if router is None else router.inside(base_vectors)


def serving_mode(model: str) -> str:
    """How ``model`` serves image queries: "routed" (a gated model that records it, or records no mode:
    see below) or "served" (every other model). A gated model saved before the mode was recorded is
    routed, with a one-line note on stderr: vrec has routed gated models since issue 13 round 5 (the
    mode that holds in a mixed catalogue: benchmarks/results/finetune_recipes_round5.md), so routing
    keeps what such a model has done since, and the note says that the numbers it was saved with
    were measured served."""
    saved = _saved_mini_siglip(model)
    return "served" if saved is None else _serving_mode(*saved)


def _serving_mode(directory: Path, meta: dict, gated: bool) -> str:
    recorded = meta.get(SERVING_KEY)
    if recorded is not None and recorded not in ("routed", "served"):
        raise ValueError(f"{directory / MODEL_JSON}: serving must be 'routed' or 'served', got {recorded!r}")
    if not gated:
        return "served"
    if recorded is None:
        if directory not in _NOTED:
            _NOTED.add(directory)
            print(f"note: {directory} records no serving mode (saved before vrec recorded it): image queries are routed by its "
                  "in-domain gate, as since issue 13 round 5; the numbers saved with it were measured served", file=sys.stderr)
        return "routed"
    return recorded


def query_router(model: str) -> QueryRouter | None:
    """The :class:`QueryRouter` search uses for ``model``: its gate's when it serves "routed"
    (:func:`serving_mode`), None when every query searches its served vectors. Reads the saved
    model once."""
    saved = _saved_mini_siglip(model)
    if saved is None or _serving_mode(*saved) != "routed":
        return None
    return _router(*saved[:2])


def local_model_name(directory: str | os.PathLike) -> str:
    """The registry name of the model saved in ``directory``: ``local:<directory>``."""
    return f"{LOCAL_SCHEME}{directory}"


def local_model_dir(name: str) -> Path | None:
    """The folder of a ``local:`` model name, None for any other name."""
    return Path(name[len(LOCAL_SCHEME) :]) if name.startswith(LOCAL_SCHEME) and len(name) > len(LOCAL_SCHEME) else None


@register_model(
    LOCAL_SCHEME,
    prefix=True,
    description="a model saved by `vrec finetune`: local:DIR (DIR/vrec_model.json, or DIR/model/)",
    has_text=True,
    offline=True,
    weights_from=(IMAGE_TOWER_WEIGHTS, TEXT_TOWER_WEIGHTS),  # what a mini-siglip run needs; a SigLIP run carries its weights
)
def create_local(spec: str, weights: str | None = None, alpha: float | None = None) -> Embedder:
    if weights is not None:
        raise ValueError("local:DIR models carry their own weights; drop --weights")
    return load_local_model(spec, alpha=alpha)
