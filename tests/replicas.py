"""Offline replicas of the files real users download, for the real-weights path.

Each builder writes the same file names and formats as the real hub repo, saved by the library's
own functions, with tiny seeded random weights: what differs from the real thing is only the
numbers in the weights. ``hub_cache_layout`` lays a folder out as a Hugging Face hub cache entry
(``models--org--repo/refs/main`` + ``snapshots/<commit>/``), as a download leaves it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

SIGLIP_BASE_REPO = "google/siglip-base-patch16-224"
REPLICA_COMMIT = "7e5a1c0ffee0000000000000000000000000cafe"
#: the files of google/siglip-base-patch16-224 (besides README.md and .gitattributes)
SIGLIP_BASE_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer_config.json",
)
SIGLIP_SPECIAL_TOKENS = {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}


def train_sentencepiece(texts: Iterable[str], prefix: Path, vocab_size: int = 400) -> Path:
    """A unigram SentencePiece model trained on ``texts``, with SigLIP's special ids
    (</s> = 1 serves as eos and pad, <unk> = 2)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2, num_threads=1,
    )  # fmt: skip
    return prefix.with_suffix(".model")


def build_siglip_base_replica(directory: Path, titles: Iterable[str], seed: int = 0) -> Path:
    """``google/siglip-base-patch16-224``'s file layout: a SentencePiece tokenizer (spiece.model, no
    tokenizer.json, as in the real repo), a SiglipModel at toy size, the image processor config."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    from vrec_utils.models._common import seeded_random_init

    directory.mkdir(parents=True, exist_ok=True)
    work = directory / "_spm"
    work.mkdir(exist_ok=True)
    spiece = train_sentencepiece(titles, work / "spiece")
    tokenizer = SiglipTokenizer(vocab_file=str(spiece), model_max_length=16)
    tokenizer.save_pretrained(directory)
    shutil.rmtree(work)
    (directory / "special_tokens_map.json").write_text(json.dumps(SIGLIP_SPECIAL_TOKENS))
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 16, "pad_token_id": 1, "eos_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
    )
    with seeded_random_init(seed):
        SiglipModel(config).save_pretrained(directory)  # config.json + model.safetensors
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    missing = [name for name in SIGLIP_BASE_FILES if not (directory / name).is_file()]
    assert not missing, f"replica lacks {missing}"
    return directory


def build_resnet50_replica(torch_home: Path, seed: int = 0) -> Path:
    """torchvision's ``resnet50-11ad3fa6.pth`` (IMAGENET1K_V2) as torch.hub caches it
    (``$TORCH_HOME/hub/checkpoints/``): a plain state dict of the real architecture."""
    import torch
    from torchvision.models import ResNet50_Weights, resnet50

    from vrec_utils.models._common import seeded_random_init

    path = torch_home / "hub" / "checkpoints" / Path(ResNet50_Weights.IMAGENET1K_V2.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    with seeded_random_init(seed):
        torch.save(resnet50(weights=None).state_dict(), path)
    return path


def tiny_siglip_openclip_cfg(tokenizer_repo: str, vocab_size: int) -> dict:
    """open_clip's ViT-B-16-SigLIP model config at toy size: the same keys (SigLIP text tower with
    a Hugging Face SentencePiece tokenizer named by ``hf_tokenizer_name``), tiny widths."""
    return {
        "embed_dim": 32,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {
            "context_length": 16, "vocab_size": vocab_size, "hf_tokenizer_name": tokenizer_repo,
            "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 64, "heads": 2, "layers": 2,
            "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
        },
    }  # fmt: skip


SIGLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}


def build_openclip_replica(directory: Path, repo_id: str, titles: Iterable[str], seed: int = 0) -> tuple[Path, dict]:
    """An open_clip hub repo as timm/ViT-B-16-SigLIP and Marqo/marqo-fashionSigLIP lay it out:
    open_clip_config.json (model_cfg + preprocess_cfg), open_clip_pytorch_model.bin (the state
    dict) and the SentencePiece tokenizer files its text config names (this repo). Returns the
    folder and the model config."""
    import open_clip
    import torch
    from transformers import SiglipTokenizer

    from vrec_utils.models._common import seeded_random_init

    directory.mkdir(parents=True, exist_ok=True)
    work = directory / "_spm"
    work.mkdir(exist_ok=True)
    tokenizer = SiglipTokenizer(vocab_file=str(train_sentencepiece(titles, work / "spiece")), model_max_length=16)
    tokenizer.save_pretrained(directory)
    shutil.rmtree(work)
    (directory / "special_tokens_map.json").write_text(json.dumps(SIGLIP_SPECIAL_TOKENS))
    config = tiny_siglip_openclip_cfg(repo_id, len(tokenizer))
    with seeded_random_init(seed):
        model = open_clip.CustomTextCLIP(**{k: v for k, v in config.items() if k != "custom_text"})
    torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": SIGLIP_PREPROCESS}))
    return directory, config


#: files the hub client and transformers ask a repo for besides those it has; a download records
#: each one the server answered 404 for under .no_exist/<commit>/, which is how they are then
#: known to be absent offline
PROBED_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
    "spiece.model", "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "tokenizer.model",
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "generation_config.json",
    "open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
    "video_preprocessor_config.json", "audio_tokenizer_config.json", "custom_generate/generate.py",
)  # fmt: skip


def hub_cache_layout(hub_cache: Path, repo_id: str, source: Path, commit: str = REPLICA_COMMIT) -> Path:
    """Copy ``source``'s files into ``hub_cache`` as the hub client stores a download of ``repo_id``
    (blobs are plain copies here; the client reads snapshots/<commit>/ and refs/main), with the
    404 markers a download leaves for the probed files the repo does not have."""
    folder = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for path in source.iterdir():
        if path.is_file():
            shutil.copy2(path, snapshot / path.name)
    for name in PROBED_FILES:
        if not (snapshot / name).exists():
            marker = folder / ".no_exist" / commit / name
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    return snapshot
