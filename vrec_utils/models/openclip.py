"""Any open_clip model: ``openclip:<arch>:<pretrained tag>`` or ``openclip:hf-hub:<org/repo>``.

open_clip fetches configs, weights and tokenizers through huggingface_hub itself, so loading runs
cache-first with the hub forced offline and only goes online once the hub answers a quick probe
(:func:`hub.hf_cache_first`). ``tiny-openclip`` is a toy CLIP for tests (no files needed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ._common import Lazy, find_weights_file, hf_snapshot_source, is_random, local_weights_id, random_weights_id, seeded_random_init
from .base import SingleModelEmbedder, ModelUnavailableError
from .hub import hf_cache_dir, hf_cache_first
from .registry import WeightSource, register_model

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
# pretrained-tag config key -> create_model_and_transforms option
_TAG_OPTIONS = {
    "mean": "image_mean",
    "std": "image_std",
    "interpolation": "image_interpolation",
    "resize_mode": "image_resize_mode",
}


class OpenClipEmbedder(SingleModelEmbedder):
    has_text = True
    has_token_path = True

    def __init__(self, name: str, model: torch.nn.Module, image_transform, tokenizer: Lazy, weights_id: str) -> None:
        super().__init__(model, weights_id)
        self.name = name
        self.image_transform = image_transform
        self._tokenizer = tokenizer
        self.dim = getattr(model.visual, "output_dim", None) or self._probe_dim()
        self.text_length = getattr(model, "context_length", None)  # open_clip's tokenizers pad to it

    def _probe_dim(self) -> int:
        height, width = self.model.visual.image_size
        with torch.no_grad():
            return int(self.model.encode_image(torch.zeros(1, 3, height, width)).shape[-1])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self._tokenizer.get()(list(texts))}  # padded to the context length

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["input_ids"])

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens({"input_ids": self.tokenize(texts)["input_ids"].to(self.device)})


class _OpenClipErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}open_clip{os.sep}" in record.pathname)


@contextlib.contextmanager
def _without_open_clip_error_logs() -> Iterator[None]:
    """open_clip logs download failures on the root logger and then raises them; the cache-first
    attempt expects such failures, and the exception carries the same text, so drop the log line."""
    root = logging.getLogger()
    log_filter = _OpenClipErrorFilter()
    root.addFilter(log_filter)
    try:
        yield
    finally:
        root.removeFilter(log_filter)


def _hub_snapshot(repo_id: str) -> Path:
    """``repo_id``'s snapshot folder in the hub cache (``refs/main`` names its commit; the commit
    is "unknown" when the repo is not cached)."""
    folder = Path(hf_cache_dir()) / f"models--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / "main"
    return folder / "snapshots" / (ref.read_text().strip() if ref.is_file() else "unknown")


def _text_cfg(model_name: str) -> dict[str, Any]:
    """The text config of a built-in arch or a ``local-dir:`` model, without touching the network."""
    import open_clip

    if model_name.startswith(LOCAL_DIR):
        config = json.loads((Path(model_name[len(LOCAL_DIR) :]) / CONFIG_FILE).read_text())
        return config.get("model_cfg", config).get("text_cfg", {})
    return (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})


def _parse_arch_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``<arch>[:<tag>]`` -> (arch, tag, the tag's pretrained config), validated."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    arch, _, tag = spec.partition(":")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    tag_cfg = get_pretrained_cfg(arch, tag) if tag else {}
    if tag and not tag_cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {arch}; known tags: {known}")
    if not tag:
        tag_cfg = _shared_preprocessing(arch)
    return arch, tag, tag_cfg


def _shared_preprocessing(arch: str) -> dict[str, Any]:
    """The preprocessing every pretrained tag of ``arch`` agrees on (e.g. SigLIP's mean/std 0.5 and
    plain resize for ViT-B-16-SigLIP), for weights given as a file without a tag; {} when the tags
    disagree or there are none (open_clip's defaults then apply)."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    seen = {
        json.dumps({key: cfg.get(key) for key in (*_TAG_OPTIONS, "quick_gelu")}, sort_keys=True, default=list)
        for cfg in (get_pretrained_cfg(arch, t) for t in open_clip.list_pretrained_tags_by_model(arch))
    }
    if len(seen) != 1:
        return {}
    shared = json.loads(seen.pop())
    return {key: tuple(value) if isinstance(value, list) else value for key, value in shared.items() if value is not None}


def _open_clip_target(spec: str, weights: str | os.PathLike | None) -> tuple[str, str, str | None, dict[str, Any], str | None]:
    """What open_clip builds for ``openclip:<spec>`` with ``weights``: (model name, hub repo,
    pretrained tag or checkpoint, options, weights id; None until the hub's checkpoint is found)."""
    name = f"openclip:{spec}"
    options: dict[str, Any] = {}
    pretrained: str | None = None
    weights_id: str | None = None
    if spec.startswith(HF_HUB):
        if is_random(weights):
            raise ValueError("weights='random' needs a built-in architecture: openclip:<arch>:<pretrained>")
        model_name, hub_repo = spec, spec[len(HF_HUB) :]
    else:
        arch, tag, tag_cfg = _parse_arch_spec(spec)
        model_name, hub_repo = arch, os.path.split(tag_cfg.get("hf_hub", ""))[0]  # "org/repo/[file]"
        # The tag's preprocessing and activation apply to random or local weights too.
        for key, option in _TAG_OPTIONS.items():
            if key in tag_cfg:
                options[option] = tag_cfg[key]
        options["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        if weights is None and not tag:
            raise ValueError(f"{name} names no pretrained tag: use openclip:{arch}:<tag> or pass weights")
        pretrained = tag if weights is None else None
    if is_random(weights):
        weights_id = random_weights_id()
        options["pretrained_text"] = False  # Hugging Face text towers: architecture only
    elif weights is not None and (Path(weights) / CONFIG_FILE).is_file():
        model_name, options = f"{LOCAL_DIR}{weights}", {}
        weights_id = local_weights_id(weights)
    elif weights is not None:
        if model_name.startswith(HF_HUB):
            raise ValueError(
                f"for {name} pass --weights DIR holding {CONFIG_FILE} and the checkpoint "
                f"(`huggingface-cli download {hub_repo} --local-dir DIR`)"
            )
        pretrained = str(find_weights_file(weights))
        weights_id = local_weights_id(pretrained)
    return model_name, hub_repo, pretrained, options, weights_id


@register_model(
    "openclip:",
    prefix=True,
    description="any open_clip model: openclip:<arch>:<pretrained> (e.g. ViT-B-16-SigLIP:webli) or openclip:hf-hub:<org/repo>",
    has_text=True,
    weights_from=(WeightSource("open_clip"),),  # per model name
)
def openclip_factory(spec: str, weights: str | os.PathLike | None = None) -> OpenClipEmbedder:
    """``weights``: None (the tag's / repo's weights), ``"random"`` (built-in arch only), a checkpoint
    file, or a directory (an open_clip ``local-dir`` with ``open_clip_config.json``, or one checkpoint)."""
    import open_clip

    name = f"openclip:{spec}"
    model_name, hub_repo, pretrained, options, weights_id = _open_clip_target(spec, weights)
    text_repo = hub_repo if model_name.startswith(HF_HUB) else _text_cfg(model_name).get("hf_tokenizer_name", "")
    cache_dir = hf_cache_dir()

    def load() -> tuple[torch.nn.Module, Any]:
        # seeded: random weights are reproducible, without touching the global RNG.
        # require_pretrained: open_clip otherwise only logs a warning and returns a random model
        # when a config is found without its checkpoint; its full load is strict, so with this
        # every parameter comes from the file.
        require = not is_random(weights)
        try:
            with seeded_random_init(), _without_open_clip_error_logs():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=pretrained, cache_dir=cache_dir, require_pretrained=require, **options
                )
        except RuntimeError as exc:
            if "Required pretrained weights" not in str(exc):  # open_clip's words for require_pretrained
                raise
            if weights is not None:
                raise ModelUnavailableError(
                    f"{name}: no open_clip checkpoint (open_clip_pytorch_model.bin or open_clip_model.safetensors) "
                    f"in {weights}; vrec does not run a model whose weights did not load"
                ) from exc
            # a cache miss (the config is cached, its weights are not): fetched online if reachable
            raise FileNotFoundError(f"{name}: the hub cache holds {hub_repo}'s config but not its weights file") from exc
        return model, preprocess

    def load_tokenizer() -> Callable:
        return hf_cache_first(
            lambda: open_clip.get_tokenizer(model_name, cache_dir=cache_dir), model=name, repo_id=text_repo or spec
        )

    model, preprocess = hf_cache_first(load, model=name, repo_id=hub_repo or text_repo or spec)
    tokenizer = Lazy(load_tokenizer)  # loaded on the first text: image-only work needs no tokenizer files
    if weights is None:
        snapshot = _hub_snapshot(hub_repo)
        source = hf_snapshot_source(hub_repo, snapshot)
        try:  # the digest of the checkpoint open_clip loaded: the same id as that file given with --weights
            weights_id = local_weights_id(snapshot)
        except (FileNotFoundError, NotADirectoryError):
            weights_id = source
    else:
        source = str(Path(weights).resolve())
    embedder = OpenClipEmbedder(name, model, preprocess, tokenizer, weights_id)
    embedder.weights_source = None if is_random(weights) else source
    return embedder


# -- tiny variant for tests ------------------------------------------------------------------------------
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@register_model(
    "tiny-openclip",
    description="tiny random-initialised open_clip CLIP (32x32 images, CLIP BPE tokenizer) for tests",
    has_text=True,
    for_tests=True,
)
def tiny_openclip_factory(weights: str | os.PathLike | None = None) -> OpenClipEmbedder:
    """``weights``: None/``"random"`` only: the tokenizer's BPE vocabulary ships inside open_clip."""
    import open_clip

    if not (weights is None or is_random(weights)):
        raise ModelUnavailableError("tiny-openclip is random-initialised only; it takes no weights")
    with seeded_random_init():
        model = open_clip.CLIP(**TINY_CLIP_CFG)
    preprocess = open_clip.image_transform(TINY_CLIP_CFG["vision_cfg"]["image_size"], is_train=False)
    context = TINY_CLIP_CFG["text_cfg"]["context_length"]
    tokenizer = Lazy(lambda: open_clip.SimpleTokenizer(context_length=context))
    return OpenClipEmbedder("tiny-openclip", model, preprocess, tokenizer, random_weights_id())
