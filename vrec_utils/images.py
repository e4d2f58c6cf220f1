"""Decode any image file to an 8-bit RGB ``PIL.Image`` the same way everywhere.

EXIF orientation is applied, transparency is composited on white, 16-bit and float images are
rescaled to 8 bits, palette and CMYK images are converted, animated images give their first frame.
Images larger than ``max_pixels`` are refused before their pixels are decoded.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000  # ~ 7000 x 7000; catalogue photos are far smaller
WHITE = (255, 255, 255)


class ImageLoadError(Exception):
    """An image could not be turned into RGB pixels; ``str(exc)`` is the reason."""


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError("file not found")
    if path.stat().st_size == 0:
        raise ImageLoadError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
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
