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


def _photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: every filter tap and rounding step shows in the pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("interpolation", ["BILINEAR", "BICUBIC", "LANCZOS", "BOX", "HAMMING"])
@pytest.mark.parametrize("size, crop", [(256, 224), (232, 224), ((300, 250), 224), (200, 224)])
def test_resize_then_center_crop_gives_torchvisions_pixels(sample_catalog, interpolation, size, crop):
    """The PIL stage cuts the crop's columns between Pillow's two resampling passes
    (ResizeThenCenterCrop): bit-identical to Resize + CenterCrop on enlarged catalogue images, on
    shrunk photos and odd shapes (which take the plain path), and where the crop pads."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    from vrec_utils.images import PilStage, ResizeThenCenterCrop

    steps = [Resize(size, interpolation=InterpolationMode[interpolation]), CenterCrop(crop)]
    stage = PilStage(steps)
    assert [type(step) for step in stage.steps] == [ResizeThenCenterCrop]
    images = [load_rgb(p) for p in sample_catalog.items["image"].iloc[:12]]
    images += [_photo_like(w, h, seed) for seed, (w, h) in enumerate([(80, 60), (97, 61), (400, 867), (1000, 700), (256, 300), (60, 256), (31, 17), (500, 90)])]
    translucent = images[0].convert("RGBA")
    translucent.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, translucent.width).astype(np.uint8), (translucent.height, 1))))
    images += [translucent, images[0].convert("P"), images[0].convert("L")]
    for image in images:
        expected = np.asarray(Compose(steps)(image))
        got = np.asarray(stage.steps[0](image))  # the fused step alone: PilStage itself takes RGB only
        assert got.shape == expected.shape and np.array_equal(got, expected), (image.size, size, crop)


def test_the_pil_stage_keeps_steps_it_cannot_fuse():
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    from vrec_utils.images import PilStage, ResizeThenCenterCrop

    nearest = PilStage([Resize(256, interpolation=InterpolationMode.NEAREST), CenterCrop(224)])
    assert [type(step) for step in nearest.steps] == [Resize, CenterCrop]
    crop_first = PilStage([CenterCrop(224), Resize(256)])
    assert [type(step) for step in crop_first.steps] == [CenterCrop, Resize]
    both = PilStage([Resize(256), CenterCrop(240), Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(200)])
    assert [type(step) for step in both.steps] == [ResizeThenCenterCrop, ResizeThenCenterCrop]
    image = _photo_like(60, 80, 7)
    assert np.array_equal(both(image), np.asarray(CenterCrop(200)(Resize(224, interpolation=InterpolationMode.BICUBIC)(CenterCrop(240)(Resize(256)(image))))))
