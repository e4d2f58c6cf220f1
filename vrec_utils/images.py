"""Decode any image file to an 8-bit RGB ``PIL.Image`` the same way everywhere.

EXIF orientation is applied, transparency is composited on white, 16-bit and float images are
rescaled to 8 bits, palette and CMYK images are converted, animated images give their first frame.
Images larger than ``max_pixels`` are refused before their pixels are decoded. A path may be a
URI (``file://``, ``s3://``, ``gs://``): its bytes come from :mod:`vrec_utils.image_files`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .image_files import ImageSourceError, is_uri, read_bytes

DEFAULT_MAX_PIXELS = 50_000_000  # ~ 7000 x 7000; catalogue photos are far smaller
WHITE = (255, 255, 255)


class ImageLoadError(Exception):
    """An image could not be turned into RGB pixels; ``str(exc)`` is the reason."""


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a local image path or an image URI (``file://``, ``s3://``, ``gs://``: read by
    :mod:`vrec_utils.image_files`). Raises :class:`ImageLoadError` saying why it cannot, and
    :class:`~vrec_utils.image_files.FilesystemUnavailableError` when a URI's filesystem package
    is not installed (a setup error, not one bad image)."""
    if is_uri(path):
        try:
            data = read_bytes(path)
        except ImageSourceError as exc:
            raise ImageLoadError(str(exc)) from None
        if not data:
            raise ImageLoadError("empty object")
        return _decode(io.BytesIO(data), max_pixels)
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError("file not found")
    if path.stat().st_size == 0:
        raise ImageLoadError("empty file")
    return _decode(path, max_pixels)


def _decode(source: Path | io.BytesIO, max_pixels: int) -> Image.Image:
    # No warnings.catch_warnings() around this: it swaps the process-wide filters and images are
    # decoded on several threads at once (extract.image_batches). Pillow warns above its own limit
    # (~89M pixels) and raises at twice that; the max_pixels check below refuses such images anyway.
    try:
        with Image.open(source) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    f"image is {width}x{height} = {width * height:,} pixels, over the "
                    f"{max_pixels:,}-pixel limit (decompression-bomb guard)"
                )
            if width < 1 or height < 1:
                raise ImageLoadError(f"image has no pixels ({width}x{height})")
            im.seek(0)
            im.load()
            return to_rgb(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"decompression-bomb guard: {exc}") from exc
    except Image.DecompressionBombWarning as exc:
        raise ImageLoadError(f"decompression-bomb guard: {exc}") from exc
    except UnidentifiedImageError:
        raise ImageLoadError("not an image file Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"cannot decode: {exc}") from exc


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to RGB (see the module docstring)."""
    im = ImageOps.exif_transpose(im) or im
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(im)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    arr = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        scaled = arr / 257.0  # 0..65535 -> 0..255
    else:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if im.mode == "I" and lo >= 0 and hi > 255:
            scaled = arr / (65535.0 if hi <= 65535 else hi) * 255.0
        elif hi > lo and (hi > 255 or lo < 0 or im.mode == "F"):
            scaled = (arr - lo) / (hi - lo) * 255.0
        else:
            scaled = arr
    grey = Image.fromarray(np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8), mode="L")
    return grey.convert("RGB")


# ------------------------------------------------------------------ preprocessing split for batches
class ResizeThenCenterCrop:
    """torchvision's ``Resize`` then ``CenterCrop`` on a PIL image: the same pixels, with less work
    when the image is enlarged.

    Pillow resizes in two separable passes, horizontal then vertical, with an 8-bit image between
    them, and each column of the vertical pass reads only the same column of the horizontal pass.
    So the columns the crop drops are cut between the passes instead of after both, and the
    vertical pass (~3/4 of the work when 60x80 catalogue images are enlarged) runs on the crop's
    width only: efficientnet-lite0's 256 -> 224 columns, 0.92 -> 0.82 ms per image on one core.
    Rows cannot be cut the same way: a box passes its bounds to Pillow as 32-bit floats, which
    moves the filter taps. Only RGB or grey images enlarged (or kept) in both directions take this path, where
    the pixels are checked identical (tests/test_images.py); a shrunk photo, or a crop larger
    than the resized image (padded by torchvision), runs the two steps as they are."""

    def __init__(self, resize, crop) -> None:
        self.resize, self.crop = resize, crop
        # what every call needs, derived once (this runs per image)
        self._size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
        self._resample = Image.Resampling[resize.interpolation.name]

    def __call__(self, im: Image.Image) -> Image.Image:
        from torchvision.transforms.functional import _compute_resized_output_size

        width, height = im.size
        new_height, new_width = _compute_resized_output_size((height, width), self._size, self.resize.max_size)
        crop_height, crop_width = self.crop.size
        plain = im.mode not in ("RGB", "L")  # Pillow resizes "P"/"1" as NEAREST, "RGBA" premultiplied
        if plain or new_width < width or new_height < height or crop_width > new_width or crop_height > new_height:
            return self.crop(self.resize(im))
        resample = self._resample
        top, left = int(round((new_height - crop_height) / 2.0)), int(round((new_width - crop_width) / 2.0))
        if new_width != width:
            im = im.resize((new_width, height), resample)  # the horizontal pass alone
        im = im.crop((left, 0, left + crop_width, height))
        if new_height != height:
            im = im.resize((crop_width, new_height), resample)  # the vertical pass alone
        return im.crop((0, top, crop_width, top + crop_height))

    def __repr__(self) -> str:
        return f"ResizeThenCenterCrop({self.resize!r}, {self.crop!r})"


def _fuse_resize_crop(steps: list) -> list:
    """``steps`` with each ``Resize`` directly followed by a ``CenterCrop`` taken as one
    :class:`ResizeThenCenterCrop`, where Pillow's two-pass resampling applies (not NEAREST)."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    fused: list = []
    for step in steps:
        previous = fused[-1] if fused else None
        if (
            type(step) is CenterCrop and type(previous) is Resize
            and previous.interpolation not in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT)
        ):  # fmt: skip
            fused[-1] = ResizeThenCenterCrop(previous, step)
        else:
            fused.append(step)
    return fused


class PilStage:
    """The PIL part of a split transform (resize, crop, ...): image -> uint8 array (H, W, 3).
    Picklable, so DataLoader workers run it; its output is a quarter of the float tensor's size."""

    def __init__(self, steps: list) -> None:
        self.steps = _fuse_resize_crop(steps)

    def __call__(self, im: Image.Image) -> np.ndarray:
        for step in self.steps:
            im = step(im)
        array = np.asarray(im, dtype=np.uint8)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"preprocessing gave an array of shape {array.shape}, not (H, W, 3)")
        return array

    def __repr__(self) -> str:
        return f"PilStage({self.steps!r})"


class BatchNormalize:
    """The tensor part of a split transform, run once per batch: uint8 (B, H, W, 3) -> float
    (B, 3, H, W), ``x / 255`` then ``(x - mean) / std``: the same operations, in the same order,
    as ``ToTensor`` + ``Normalize`` on each image, so the pixels are identical.

    On the CPU the result is read from a table of those operations' 256 results per channel
    (bit-identical, and 2-3x faster than computing them for every pixel: ~0.5 ms per 224x224
    image instead of ~1.0 on the 2-core machine, in the process that feeds the model);
    ``channels_last``: the memory layout the model wants (the CNNs' channels_last, or NCHW)."""

    def __init__(self, mean, std) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        every_value = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 1, 256, len(self.mean.flatten()))
        self.table = self.compute(every_value.contiguous()).reshape(-1, 256).numpy()  # (channel, value)

    def compute(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.permute(0, 3, 1, 2).float().div_(255)
        if pixels.device != self.mean.device:  # e.g. a uint8 batch moved to the GPU first (a quarter of the bytes)
            self.mean, self.std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return pixels.sub_(self.mean).div_(self.std)

    def __call__(self, batch: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
        if batch.dtype != torch.uint8 or batch.device.type != "cpu" or batch.dim() != 4 or batch.shape[3] != len(self.table):
            return self.compute(batch)
        values = batch.numpy()
        if channels_last:
            pixels = np.empty(values.shape, dtype=np.float32)
            for channel, table in enumerate(self.table):
                pixels[..., channel] = table[values[..., channel]]
            return torch.from_numpy(pixels).permute(0, 3, 1, 2)
        pixels = np.empty((values.shape[0], values.shape[3], *values.shape[1:3]), dtype=np.float32)
        for channel, table in enumerate(self.table):
            np.take(table, values[..., channel], out=pixels[:, channel])
        return torch.from_numpy(pixels)


def split_transform(transform) -> tuple[PilStage, BatchNormalize] | None:
    """Split a per-image transform into a PIL stage (workers) and a per-batch tensor stage, when it
    is the common shape ``[PIL steps..., ToTensor(), Normalize(mean, std)]`` (a torchvision
    ``Compose``) or torchvision's ``ImageClassification`` preset; None for anything else, which
    then runs whole, per image, as before."""
    from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor
    from torchvision.transforms._presets import ImageClassification

    if isinstance(transform, ImageClassification):
        if not isinstance(transform.crop_size, list) or not isinstance(transform.resize_size, list):
            return None
        pil = [
            Resize(transform.resize_size, interpolation=transform.interpolation, antialias=transform.antialias),
            CenterCrop(transform.crop_size),
        ]
        return PilStage(pil), BatchNormalize(transform.mean, transform.std)
    if not isinstance(transform, Compose) or len(transform.transforms) < 2:
        return None
    *pil, to_tensor, normalize = transform.transforms
    # ToTensor subclasses (open_clip's MaybeToTensor) convert PIL images the same way; every step
    # before it receives a PIL image in the original too, so it stays in the PIL stage unchanged
    if not isinstance(to_tensor, ToTensor) or type(normalize) is not Normalize or normalize.inplace:
        return None
    if any(isinstance(step, (ToTensor, Normalize)) for step in pil):
        return None
    return PilStage(pil), BatchNormalize(normalize.mean, normalize.std)


def pixel_batch(images: Sequence[Image.Image], transform) -> torch.Tensor:
    """The batch an engine takes for ``images``: where ``transform`` splits, the PIL stage's uint8
    (B, H, W, 3), which the engine normalises itself (torch in Python with the same operations,
    OpenVINO inside its compiled model); otherwise the whole transform's float (B, 3, H, W)."""
    split = split_transform(transform)
    if split is None:
        return torch.stack([transform(im) for im in images])
    return torch.from_numpy(np.stack([split[0](im) for im in images]))


def model_pixels(pixels: torch.Tensor, transform) -> torch.Tensor:
    """The float (B, 3, H, W) model input for a batch of either form :func:`pixel_batch` gives."""
    if pixels.dtype != torch.uint8:
        return pixels
    split = split_transform(transform)
    if split is None:
        raise ValueError("a uint8 pixel batch was given for a model whose transform has no batch stage")
    return split[1](pixels)
