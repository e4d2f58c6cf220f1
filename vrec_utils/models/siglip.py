"""SigLIP through transformers: ``siglip-base`` and the tiny random ``tiny-siglip`` for tests.

The image transform is torchvision's equivalent of the SigLIP image processor (squash-resize to
the model's size with PIL bicubic, scale to [0, 1], normalise with mean = std = 0.5): picklable,
with a precise repr. On PIL images it equals transformers' PIL-backend processor exactly and the
default (torchvision-backend) processor to within one grey level (2/255).
"""

from __future__ import annotations

import importlib.util
import os
import string
from collections.abc import Sequence
from pathlib import Path

import torch

from ._common import (
    Lazy,
    build_image_transform,
    hf_snapshot_source,
    is_random,
    local_weights_id,
    pooled,
    random_weights_id,
    require_dir,
    seeded_random_init,
)
from .base import ModelUnavailableError, SingleModelEmbedder
from .hub import TOKENIZER_FILES, hf_hub_offline, require_hf_snapshot
from .registry import WeightSource, register_model

SIGLIP_BASE_REPO = "google/siglip-base-patch16-224"
SIGLIP_BASE_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", *TOKENIZER_FILES)
TINY_IMAGE_SIZE = 32
TINY_CONTEXT = 16


class SiglipEmbedder(SingleModelEmbedder):
    has_text = True
    has_token_path = True

    def __init__(self, name: str, model, tokenizer: Lazy, image_transform, weights_id: str) -> None:
        super().__init__(model, weights_id)
        self.name = name
        self.dim = model.config.vision_config.hidden_size
        text_dim = getattr(model.config.text_config, "projection_size", None) or model.config.text_config.hidden_size
        if text_dim != self.dim:
            raise ValueError(f"{name}: image ({self.dim}-d) and text ({text_dim}-d) embeddings differ in size")
        self.max_text_length = model.config.text_config.max_position_embeddings
        self.text_length = self.max_text_length
        self.image_transform = image_transform
        self._tokenizer = tokenizer

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pooled(self.model.get_image_features(pixel_values=pixels))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # SigLIP was trained on max_length-padded ids without an attention mask: mirror that.
        ids = self._tokenizer.get()(
            list(texts), padding="max_length", max_length=self.max_text_length, truncation=True, return_tensors="pt"
        )["input_ids"]
        return {"input_ids": ids}

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return pooled(self.model.get_text_features(input_ids=tokens["input_ids"]))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens({"input_ids": self.tokenize(texts)["input_ids"].to(self.device)})


def transform_from_processor(processor):
    """The torchvision transform equivalent to a SigLIP image processor's configuration."""
    standard = processor.do_resize and processor.do_rescale and processor.do_normalize
    if not standard or getattr(processor, "do_center_crop", False):
        raise ValueError(f"unsupported SigLIP image-processor settings: {processor.to_dict()}")
    if abs(processor.rescale_factor - 1 / 255) > 1e-9:
        raise ValueError(f"unsupported rescale_factor {processor.rescale_factor}")
    size = (processor.size["height"], processor.size["width"])
    return build_image_transform(
        resize=size, crop=None, mean=processor.image_mean, std=processor.image_std, interpolation=int(processor.resample)
    )


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved in ``directory``. SigLIP's hub repo ships only a SentencePiece model
    (spiece.model, no tokenizer.json), which transformers reads with sentencepiece and protobuf:
    both are vrec dependencies, checked here so that a broken install says what to do."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "spiece.model", "vocab.txt", "vocab.json")):
        raise ModelUnavailableError(
            f"no tokenizer in {directory} (SigLIP's is spiece.model with tokenizer_config.json): copy the "
            "model's whole folder (`huggingface-cli download <repo> --local-dir DIR`); images work without it"
        )
    if (directory / "spiece.model").is_file() and not (directory / "tokenizer.json").is_file():
        missing = [pkg for pkg, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf")) if not _has_module(module)]
        if missing:
            raise ModelUnavailableError(
                f"the tokenizer in {directory} is a SentencePiece model, which needs: pip install {' '.join(missing)} "
                "(for text queries only; images work without it)"
            )
    with hf_hub_offline():
        return AutoTokenizer.from_pretrained(str(directory))


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package (google for google.protobuf)
        return False


def load_siglip_dir(name: str, directory: str | os.PathLike, weights_id: str) -> SiglipEmbedder:
    """A SiglipModel + tokenizer + image processor saved with ``save_pretrained`` in ``directory``."""
    from safetensors import SafetensorError
    from transformers import SiglipImageProcessor, SiglipModel

    try:
        with hf_hub_offline():  # everything is local: never let a stray hub lookup wait on the network
            model = SiglipModel.from_pretrained(str(directory)).float()
            processor = SiglipImageProcessor.from_pretrained(str(directory))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # SafetensorError: a truncated file
        files = ", ".join(sorted(p.name for p in Path(directory).iterdir())) or "nothing"
        raise ModelUnavailableError(
            f"{name}: cannot load the SigLIP model saved in {directory} (it holds {files}): {str(exc).splitlines()[0][:200]}; "
            "the copy is incomplete or damaged: download it again (`huggingface-cli download <repo> --local-dir DIR`)"
        ) from exc
    tokenizer = Lazy(lambda: load_tokenizer(directory))
    return SiglipEmbedder(name, model, tokenizer, transform_from_processor(processor), weights_id)


@register_model(
    "siglip-base",
    description=f"SigLIP ViT-B/16 224 ({SIGLIP_BASE_REPO}, transformers); 768-d image and text embeddings",
    has_text=True,
    weights_from=(WeightSource("hf", SIGLIP_BASE_REPO),),
)
def siglip_base_factory(weights: str | os.PathLike | None = None) -> SiglipEmbedder:
    """``weights``: None (hub cache or download), a directory with a local copy of the repo, or
    ``"random"`` (the architecture, random-initialised; its tokenizer still comes from the hub, on
    first text query)."""
    if is_random(weights):
        from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

        with seeded_random_init():  # SiglipConfig's defaults are siglip-base-patch16-224's architecture
            model = SiglipModel(SiglipConfig(text_config={"pad_token_id": 1, "bos_token_id": None, "eos_token_id": 1}))
        tokenizer = Lazy(
            lambda: load_tokenizer(
                require_hf_snapshot(SIGLIP_BASE_REPO, allow_patterns=(*TOKENIZER_FILES, "config.json"), model="siglip-base")
            )
        )
        transform = transform_from_processor(SiglipImageProcessor())
        return SiglipEmbedder("siglip-base", model, tokenizer, transform, random_weights_id())
    path = require_hf_snapshot(SIGLIP_BASE_REPO, weights, allow_patterns=SIGLIP_BASE_FILES, model="siglip-base")
    embedder = load_siglip_dir("siglip-base", path, local_weights_id(path))
    embedder.weights_source = hf_snapshot_source(SIGLIP_BASE_REPO, path) if weights is None else str(Path(path).resolve())
    return embedder


# -- tiny variant for tests ------------------------------------------------------------------------------
def build_tiny_tokenizer():
    """A lower-cased character tokenizer (ids: 0 pad, 1 eos, 2 unk) that needs no files."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "</s>", "<unk>", *string.ascii_lowercase, *string.digits, *string.punctuation]
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=TINY_CONTEXT
    )


def build_tiny_siglip(seed: int = 0):
    """(SiglipModel, tokenizer, image processor): the real architecture at toy size, seeded random init.

    ``save_pretrained`` all three into one directory to get a ``weights=DIR`` for SigLIP models.
    """
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tokenizer = build_tiny_tokenizer()
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": TINY_CONTEXT,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
        },
        vision_config={**tower, "image_size": TINY_IMAGE_SIZE, "patch_size": 8},
    )
    with seeded_random_init(seed):
        model = SiglipModel(config)
    processor = SiglipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return model, tokenizer, processor


@register_model(
    "tiny-siglip",
    description="tiny random-initialised SiglipModel (32x32 images, character tokenizer) for tests",
    has_text=True,
    for_tests=True,
)
def tiny_siglip_factory(weights: str | os.PathLike | None = None) -> SiglipEmbedder:
    """``weights``: None/``"random"`` (seeded random init) or a directory saved by ``save_pretrained``."""
    if weights is None or is_random(weights):
        model, tokenizer, processor = build_tiny_siglip()
        transform = transform_from_processor(processor)
        return SiglipEmbedder("tiny-siglip", model, Lazy(lambda: tokenizer), transform, random_weights_id())
    path = require_dir(weights, "a SigLIP model, tokenizer and image processor saved with save_pretrained")
    embedder = load_siglip_dir("tiny-siglip", path, local_weights_id(path))
    embedder.weights_source = str(Path(path).resolve())
    return embedder
