"""Build a catalog of awkward and broken image files (used by the catalog/image/extraction tests)."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# id -> what the file is; ``None`` in EXPECTED_FAILURES marks files that must be skipped.
READABLE = ("real1", "real2", "cmyk", "rgba", "png16", "gif", "webp", "exif_rotated", "one_px", "very_wide", "grey", "palette_alpha", "na_usage")
UNREADABLE = ("truncated", "empty", "not_image", "huge_dims", "missing")


def _huge_png(path: Path, width: int = 100_000, height: int = 100_000) -> None:
    """A tiny file whose header claims width x height pixels (a decompression bomb)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr_start = 8 + 4 + 4  # signature, chunk length, chunk type
    data[ihdr_start : ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr_start + 13]))
    data[ihdr_start + 13 : ihdr_start + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def make_hostile_catalog(root: Path, real_images: list[Path]) -> Path:
    """Write ``root/catalog.csv`` + files; returns the CSV path."""
    img = root / "img"
    img.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shutil.copy(real_images[0], img / "real1.jpg")
    shutil.copy(real_images[1], img / "real2.jpg")
    Image.open(real_images[0]).convert("CMYK").save(img / "cmyk.jpg")
    rgba = Image.new("RGBA", (40, 60), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 30, 50))
    rgba.save(img / "rgba.png")
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(img / "png16.png")
    frames = [Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    frames[0].save(img / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.open(real_images[1]).save(img / "photo.webp", format="WEBP")
    exif_img = Image.new("RGB", (80, 40), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    exif_img.save(img / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(img / "one.png")
    Image.new("RGB", (2000, 3), (200, 100, 0)).save(img / "wide.png")
    Image.open(real_images[0]).convert("L").save(img / "grey.jpg")
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    pal.info["transparency"] = 0
    pal.save(img / "pal.png", transparency=0)
    (img / "truncated.jpg").write_bytes(Path(real_images[0]).read_bytes()[:300])
    (img / "empty.jpg").write_bytes(b"")
    (img / "notes.jpg").write_text("this is not an image\n")
    _huge_png(img / "huge.png")
    (root.parent / "outside.jpg").write_bytes(Path(real_images[0]).read_bytes())
    rows = [
        ("real1", "img/real1.jpg", "Tshirts", "Blue tee"),
        ("real2", "img/real2.jpg", "Watches", "Steel watch"),
        ("cmyk", "img/cmyk.jpg", "Tshirts", "CMYK tee"),
        ("rgba", "img/rgba.png", "Bags", "Transparent bag"),
        ("png16", "img/png16.png", "Bags", "16-bit bag"),
        ("gif", "img/anim.gif", "Bags", ""),
        ("webp", "img/photo.webp", "Watches", "WebP watch"),
        ("exif_rotated", "img/rotated.jpg", "Shoes", "Rotated shoe"),
        ("one_px", "img/one.png", "Shoes", "One pixel"),
        ("very_wide", "img/wide.png", "Belts", "Long belt"),
        ("grey", "img/grey.jpg", "Tshirts", "Grey tee"),
        ("palette_alpha", "img/pal.png", "Bags", "Palette"),
        ("truncated", "img/truncated.jpg", "Shoes", "Broken"),
        ("empty", "img/empty.jpg", "Shoes", "Empty"),
        ("not_image", "img/notes.jpg", "Shoes", "Text file"),
        ("huge_dims", "img/huge.png", "Shoes", "Bomb"),
        ("missing", "img/nowhere.jpg", "Shoes", "Missing"),
        ("escape", "../outside.jpg", "Shoes", "Outside"),
        ("na_usage", "img/real1.jpg", "NA", "Label NA"),
    ]
    frame = pd.DataFrame(rows, columns=["id", "image", "articleType", "title"])
    csv = root / "catalog.csv"
    frame.to_csv(csv, index=False)
    return csv
