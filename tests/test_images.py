from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hostile import make_hostile_catalog
from vrec_utils.catalog import load_catalog
from vrec_utils.images import ImageLoadError, load_rgb


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, sample_catalog):
    root = tmp_path_factory.mktemp("hostile") / "cat"
    return load_catalog(make_hostile_catalog(root, [Path(p) for p in sample_catalog.items["image"].iloc[:2]]))


@pytest.mark.parametrize("item_id", ["real1", "real2", "cmyk", "rgba", "png16", "gif", "webp", "exif_rotated", "one_px", "very_wide", "grey", "palette_alpha"])
def test_readable_files_become_rgb(hostile, item_id):
    im = load_rgb(hostile.image_path(item_id))
    assert im.mode == "RGB" and im.width >= 1 and im.height >= 1


@pytest.mark.parametrize(
    "item_id, reason",
    [
        ("truncated", "cannot decode|truncated"),
        ("empty", "empty file"),
        ("not_image", "not an image"),
        ("huge_dims", "decompression-bomb"),
        ("missing", "not found"),
    ],
)
def test_unreadable_files_give_a_reason(hostile, item_id, reason):
    with pytest.raises(ImageLoadError, match=reason):
        load_rgb(hostile.image_path(item_id))


def test_alpha_is_composited_on_white(hostile):
    px = np.asarray(load_rgb(hostile.image_path("rgba")))
    assert tuple(px[0, 0]) == (255, 255, 255)  # fully transparent red -> white
    assert tuple(px[20, 20]) == (0, 0, 255)
    pal = np.asarray(load_rgb(hostile.image_path("palette_alpha")))
    assert tuple(pal[0, 0]) == (255, 255, 255)  # the transparent palette entry


def test_exif_orientation_and_16_bit(hostile):
    rotated = load_rgb(hostile.image_path("exif_rotated"))
    assert rotated.size == (40, 80)  # stored 80x40, EXIF says rotate 90
    ramp = np.asarray(load_rgb(hostile.image_path("png16")))[..., 0]
    assert ramp.min() == 0 and ramp.max() == 255 and ramp[0, 1] >= ramp[0, 0]


def test_custom_pixel_limit(tmp_path):
    Image.new("RGB", (200, 200)).save(tmp_path / "a.png")
    with pytest.raises(ImageLoadError, match="40,000 pixels"):
        load_rgb(tmp_path / "a.png", max_pixels=10_000)


def test_an_image_over_pillows_warning_limit_is_refused_without_touching_warning_filters(tmp_path):
    """Images are decoded on several threads at once, so load_rgb must not swap the process-wide
    warning filters (catch_warnings is not thread-safe); between Pillow's warning limit (~89M
    pixels) and its error limit, vrec's own pixel limit refuses the image."""
    import warnings

    from hostile import _huge_png

    _huge_png(tmp_path / "bomb.png", width=10_000, height=10_000)  # 100M pixels: Pillow only warns
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError, match="over the 50,000,000-pixel limit"):
            load_rgb(tmp_path / "bomb.png")
    assert [w.category for w in seen] == [Image.DecompressionBombWarning]  # Pillow's warning, not turned into an error
    with pytest.raises(ImageLoadError, match="decompression-bomb guard"):  # twice Pillow's limit: Pillow raises
        load_rgb(_huge_png(tmp_path / "huge.png") or tmp_path / "huge.png")
