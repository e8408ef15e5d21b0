"""Tests for `mm_llama.data.image_transform`: canvas rule, HF parity, shapes, EXIF, colour modes, errors.

Parity oracle: transformers' `MllamaImageProcessor` (5.x: the torchvision-backed class), built locally
with CLIP mean/std (its class default is 0.5/0.5; real Llama 3.2 Vision configs set CLIP's). Both resize
the uint8 image with torchvision bilinear + antialias and apply the fused `(x - 255·mean) / (255·std)`
in float32, so the pixels agree bit for bit (tolerance 0).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mm_llama.data.image_transform import (
    CLIP_MEAN,
    CLIP_STD,
    ImageBatch,
    ImageTransform,
    TiledImage,
    collate_images,
    resize_size,
    select_canvas,
    to_rgb,
)

hf_mllama = pytest.importorskip("transformers.models.mllama.image_processing_mllama")

PAD = [(-m / s) for m, s in zip(CLIP_MEAN, CLIP_STD)]  # a black (0) pixel after normalisation


def _noise(rng: np.random.Generator, width: int, height: int, channels: int = 3) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _hf_processor(tile: int, max_tiles: int):
    return hf_mllama.MllamaImageProcessor(
        size={"height": tile, "width": tile},
        max_image_tiles=max_tiles,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


# ---------------------------------------------------------------------------------------- canvas rule

# (width, height, tile, max_tiles) -> (canvas_h, canvas_w), resize (new_h, new_w); worked by hand.
HAND = [
    # every canvas upscales a 1×1 image; (1,1)…(1,4) etc. differ in scale; (1,1) has the smallest
    # upscale (560) shared with (1,2),(2,1),… → ties → smallest area (1,1). Resize clamps to one tile.
    ((1, 1, 560, 4), (560, 560), (560, 560)),
    ((560, 560, 560, 4), (560, 560), (560, 560)),  # (1,1) has scale exactly 1
    # 561 wide: (1,1) scale 560/561 < 1; (1,2),(1,3),(1,4) all have scale min(·, 560/560) = 1 → the
    # smallest of those, (1,2). No resize: the image fits the clamped target.
    ((561, 560, 560, 4), (560, 1120), (560, 561)),
    ((1120, 560, 560, 4), (560, 1120), (560, 1120)),
    ((560, 1120, 560, 4), (1120, 560), (1120, 560)),
    # 4000×300: no canvas reaches scale 1 (the widest, (1,4) = 2240 px, gives 2240/4000 = 0.56, more than
    # (2,2)'s 1120/4000 = 0.28) → largest downscale (1,4). Resize: width 2240, height floor(300·0.56) = 168.
    ((4000, 300, 560, 4), (560, 2240), (168, 2240)),
    ((300, 4000, 560, 4), (2240, 560), (2240, 168)),
    # 800×600: only (2,2) upscales (min(1120/800, 1120/600) = 1.4) → (1120, 1120); the image already fits,
    # so it is not upscaled (target = clamp(800, 560, 1120) × clamp(600, 560, 1120)).
    ((800, 600, 560, 4), (1120, 1120), (600, 800)),
    # 1920×1080: all downscale; (2,2) gives min(0.583, 1.037) = 0.583, (1,3)/(1,4) only 1080→560 = 0.519
    # → (2,2); width 1120, height floor(1080·0.5833) = 630.
    ((1920, 1080, 560, 4), (1120, 1120), (630, 1120)),
    # 100×2000: (4,1) = 2240×560 gives min(5.6, 1.12) = 1.12 ≥ 1, the only upscale; width stays 100.
    ((100, 2000, 560, 4), (2240, 560), (2000, 100)),
    ((2240, 2240, 560, 4), (1120, 1120), (1120, 1120)),  # (2,2) at scale 0.5 is the largest downscale
    ((4000, 300, 560, 1), (560, 560), (42, 560)),  # one tile: 560/4000 = 0.14 → height floor(42.0)
    # tile 336, 6 tiles, 1000×300: (1,3) and (2,3) both have scale 1008/1000 = 1.008, the smallest
    # upscale → tie → smaller area (1,3). Resize: width clamps to 1000 (scale 1), height to 336 (scale 1.12);
    # the smaller scale (width's, 1) wins → height floor(300·1) = 300: no upscaling.
    ((1000, 300, 336, 6), (336, 1008), (300, 1000)),
    # tile 448: 900×448: (1,2) gives 896/900 < 1; (1,3) and (1,4) give 1 → smaller area (1,3).
    ((900, 448, 448, 4), (448, 1344), (448, 900)),
    ((448, 448, 448, 4), (448, 448), (448, 448)),
    # 6 tiles at 560, 4000×300: the widest grid (1,6) = 3360 px → 0.84 scale; height floor(300·0.84) = 252.
    ((4000, 300, 560, 6), (560, 3360), (252, 3360)),
]


@pytest.mark.parametrize(("args", "canvas", "size"), HAND, ids=[f"{a[0]}x{a[1]}@{a[2]}/{a[3]}" for a, _, _ in HAND])
def test_canvas_and_resize_hand_computed(args, canvas, size) -> None:
    width, height, tile, max_tiles = args
    assert select_canvas(width, height, tile, max_tiles) == canvas
    assert resize_size(width, height, canvas, tile) == size


SIZES = [(1, 1), (560, 560), (561, 560), (1120, 560), (560, 1120), (4000, 300), (300, 4000), (800, 600),
         (1920, 1080), (100, 2000), (2240, 2240), (336, 336), (337, 1), (448, 896), (1000, 300), (50, 7000)]


@pytest.mark.parametrize("tile", [336, 448, 560])
@pytest.mark.parametrize("max_tiles", [1, 4, 6])
def test_canvas_table_matches_transformers(tile: int, max_tiles: int) -> None:
    for width, height in SIZES:
        ours = select_canvas(width, height, tile, max_tiles)
        theirs = tuple(int(v) for v in hf_mllama.get_optimal_tiled_canvas(height, width, max_tiles, tile))
        assert ours == theirs, (width, height)
        size = resize_size(width, height, ours, tile)
        hf_size = hf_mllama.get_image_size_fit_to_canvas(height, width, theirs[0], theirs[1], tile)
        assert size == tuple(int(v) for v in hf_size), (width, height)


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 8000),
    height=st.integers(1, 8000),
    tile=st.sampled_from([14, 56, 224, 336, 448, 560]),
    max_tiles=st.integers(1, 9),
)
def test_canvas_property_matches_transformers(width: int, height: int, tile: int, max_tiles: int) -> None:
    canvas = select_canvas(width, height, tile, max_tiles)
    assert canvas == tuple(int(v) for v in hf_mllama.get_optimal_tiled_canvas(height, width, max_tiles, tile))
    assert canvas[0] % tile == 0 and canvas[1] % tile == 0
    assert (canvas[0] // tile) * (canvas[1] // tile) <= max_tiles
    new_h, new_w = resize_size(width, height, canvas, tile)
    assert (new_h, new_w) == tuple(int(v) for v in hf_mllama.get_image_size_fit_to_canvas(height, width, *canvas, tile))
    assert 1 <= new_h <= canvas[0] and 1 <= new_w <= canvas[1]


def test_geometry_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="image width"):
        select_canvas(0, 10, 560, 4)
    with pytest.raises(ValueError, match="max_tiles"):
        select_canvas(10, 10, 560, 0)
    with pytest.raises(ValueError, match="multiples of tile_size"):
        resize_size(10, 10, (500, 560), 560)


# ---------------------------------------------------------------------------------------- HF parity


def _parity_images(rng: np.random.Generator, tile: int) -> list[Image.Image]:
    rgb = [Image.fromarray(_noise(rng, w, h)) for w, h in [(37, 300), (500, 90), (700, 260), (tile, tile), (1, 1)]]
    rgba = Image.fromarray(_noise(rng, 120, 80, 4), "RGBA")
    la = Image.fromarray(_noise(rng, 60, 90, 4), "RGBA").convert("LA")
    grey = Image.fromarray(_noise(rng, 70, 150, 1), "L")
    palette = Image.fromarray(_noise(rng, 200, 130)).convert("P")
    palette_t = Image.fromarray(_noise(rng, 90, 40)).convert("P")
    palette_t.info["transparency"] = int(np.asarray(palette_t)[0, 0])
    cmyk = Image.fromarray(_noise(rng, 100, 110, 4), "CMYK")
    return [*rgb, rgba, la, grey, palette, palette_t, cmyk]


@pytest.mark.parametrize(("tile", "max_tiles"), [(56, 4), (112, 6), (560, 4)])
def test_pixels_match_transformers(tile: int, max_tiles: int) -> None:
    """Exact (atol 0) parity of pixel_values, aspect_ratio_ids, aspect_ratio_mask and num_tiles."""
    rng = np.random.default_rng(tile + max_tiles)
    images = _parity_images(rng, tile)
    if tile == 560:  # keep the large-tile case small and fast
        images = images[:2] + images[5:7]
    transform = ImageTransform(tile_size=tile, max_tiles=max_tiles)
    ours = collate_images([[transform(im)] for im in images], max_tiles=max_tiles)
    theirs = _hf_processor(tile, max_tiles)([[im] for im in images], return_tensors="pt")

    assert ours.pixels.dtype == theirs["pixel_values"].dtype == torch.float32
    assert ours.pixels.shape == theirs["pixel_values"].shape
    torch.testing.assert_close(ours.pixels, theirs["pixel_values"], rtol=0, atol=0)
    assert torch.equal(ours.aspect_ratio_ids, theirs["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, theirs["aspect_ratio_mask"])
    assert ours.num_tiles == theirs["num_tiles"]


def test_multi_image_batch_matches_transformers() -> None:
    """Samples with 2 and 1 images: HF pads the missing image with zeros, id 0 and (quirk) mask[..., 0] = 1."""
    rng = np.random.default_rng(7)
    a, b, c = (Image.fromarray(_noise(rng, w, h)) for w, h in [(300, 40), (40, 200), (90, 90)])
    transform = ImageTransform(tile_size=56, max_tiles=4)
    ours = collate_images([[transform(a), transform(b)], [transform(c)]], max_tiles=4)
    theirs = _hf_processor(56, 4)([[a, b], [c]], return_tensors="pt")
    torch.testing.assert_close(ours.pixels, theirs["pixel_values"], rtol=0, atol=0)
    assert torch.equal(ours.aspect_ratio_ids, theirs["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, theirs["aspect_ratio_mask"])
    assert ours.num_tiles == theirs["num_tiles"]
    # HF marks tile 0 of the padding image as valid (Meta pads aspect ratios with (1, 1)); tile_mask does not
    assert theirs["aspect_ratio_mask"][1, 1, 0] == 1 and not ours.tile_mask[1, 1].any()


# ---------------------------------------------------------------------------------------- shapes


def test_one_pixel_image() -> None:
    out = ImageTransform(tile_size=560, max_tiles=4)(Image.new("RGB", (1, 1), (255, 0, 128)))
    assert isinstance(out, TiledImage)
    assert out.tiles.shape == (1, 3, 560, 560) and out.tiles.dtype == torch.float32
    assert out.grid == (1, 1) and out.aspect_ratio_id == 1
    # upscaled to a full tile: every pixel is the single colour
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(out.tiles[0].amax(dim=(1, 2)), expected)
    torch.testing.assert_close(out.tiles[0].amin(dim=(1, 2)), expected)


def test_wide_image_tiles_and_padding() -> None:
    out = ImageTransform(tile_size=560, max_tiles=4)(Image.new("RGB", (4000, 300), (200, 200, 200)))
    assert out.tiles.shape == (4, 3, 560, 560)
    assert out.grid == (1, 4) and out.aspect_ratio_id == 4  # (1,1),(1,2),(1,3),(1,4) → id 4
    # resized to 168 × 2240: rows < 168 hold the image, rows ≥ 168 are black padding in every tile
    grey = torch.tensor([(200 / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(out.tiles[:, :, :168].amin(dim=(0, 2, 3)), grey)
    torch.testing.assert_close(out.tiles[:, :, 168:].amax(dim=(0, 2, 3)), torch.tensor(PAD))

    tall = ImageTransform(tile_size=560, max_tiles=4)(Image.new("RGB", (300, 4000)))
    assert tall.grid == (4, 1) and tall.aspect_ratio_id == 8


def test_tiles_are_row_major() -> None:
    # a 2×2 canvas of 56-px tiles whose quadrants have distinct colours
    quads = [(10, 0, 0), (0, 20, 0), (0, 0, 30), (40, 40, 40)]  # top-left, top-right, bottom-left, bottom-right
    arr = np.zeros((112, 112, 3), dtype=np.uint8)
    for k, colour in enumerate(quads):
        r, c = divmod(k, 2)
        arr[r * 56 : (r + 1) * 56, c * 56 : (c + 1) * 56] = colour
    out = ImageTransform(tile_size=56, max_tiles=4)(Image.fromarray(arr))
    assert out.grid == (2, 2)
    for k, colour in enumerate(quads):
        expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip(colour, CLIP_MEAN, CLIP_STD)])
        torch.testing.assert_close(out.tiles[k].mean(dim=(1, 2)), expected)


def test_collate_mixed_batch_2_1_0_images() -> None:
    t = ImageTransform(tile_size=56, max_tiles=4)
    # 40×100 at 56 px: (2,1) and (2,2) share the smallest upscale 112/100 → smaller area (2,1), id 5
    wide, square, tall = t(Image.new("RGB", (4000, 300))), t(Image.new("RGB", (1, 1))), t(Image.new("RGB", (40, 100)))
    batch = collate_images([[wide, square], [tall], []], max_tiles=4)
    assert isinstance(batch, ImageBatch)
    assert batch.pixels.shape == (3, 2, 4, 3, 56, 56)
    assert batch.aspect_ratio_ids.tolist() == [[4, 1], [5, 0], [0, 0]]  # (1,4) → 4, (1,1) → 1, (2,1) → 5
    assert batch.aspect_ratio_ids.dtype == batch.grids.dtype == torch.long
    assert batch.grids.tolist() == [[[1, 4], [1, 1]], [[2, 1], [0, 0]], [[0, 0], [0, 0]]]
    assert batch.tile_mask.dtype == torch.bool
    assert batch.tile_mask.tolist() == [
        [[True] * 4, [True, False, False, False]],
        [[True, True, False, False], [False] * 4],
        [[False] * 4, [False] * 4],
    ]
    assert batch.num_tiles == [[4, 1], [2], []]
    assert batch.image_mask.tolist() == [[True, True], [True, False], [False, False]]
    assert torch.equal(batch.pixels[0, 0], wide.tiles)
    assert torch.equal(batch.pixels[1, 0, :2], tall.tiles)
    # padding tiles and padding images are exact zeros
    assert not batch.pixels[0, 1, 1:].any() and not batch.pixels[1, 0, 2:].any()
    assert not batch.pixels[1, 1].any() and not batch.pixels[2].any()

    fixed = collate_images([[wide], []], max_tiles=4, max_images=3)
    assert fixed.pixels.shape == (2, 3, 4, 3, 56, 56) and fixed.aspect_ratio_ids.tolist() == [[4, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="max_images=1"):
        collate_images([[wide, square]], max_tiles=4, max_images=1)
    # ids follow the collate's max_tiles: (1,4) is id 4 among 4 tiles, id 4 among 6 tiles too; (2,1) differs
    assert collate_images([[tall]], max_tiles=6).aspect_ratio_ids.item() == 7
    with pytest.raises(ValueError, match="max_tiles=2"):
        collate_images([[wide]], max_tiles=2)


def test_collate_text_only_batch() -> None:
    batch = collate_images([[], []], max_tiles=4, tile_size=56)
    assert batch.pixels.shape == (2, 0, 4, 3, 56, 56)
    assert batch.aspect_ratio_ids.shape == (2, 0) and batch.grids.shape == (2, 0, 2)
    assert batch.tile_mask.shape == (2, 0, 4) and batch.num_tiles == [[], []]
    with pytest.raises(ValueError, match="tile_size"):
        collate_images([[], []], max_tiles=4)
    with pytest.raises(ValueError, match="56 px"):
        collate_images([[ImageTransform(tile_size=28, max_tiles=4)(Image.new("RGB", (5, 5)))]], max_tiles=4, tile_size=56)


def test_batch_to() -> None:
    t = ImageTransform(tile_size=28, max_tiles=4)
    batch = collate_images([[t(Image.new("RGB", (50, 20)))]], max_tiles=4)
    moved = batch.to("cpu", dtype=torch.bfloat16)
    assert moved.pixels.dtype == torch.bfloat16 and moved.aspect_ratio_ids.dtype == torch.long
    assert moved.tile_mask.dtype == torch.bool and moved.num_tiles == batch.num_tiles
    with pytest.raises(ValueError, match="floating"):
        batch.to("cpu", dtype=torch.int64)


# ---------------------------------------------------------------------------------------- decoding


def _two_colour(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def test_exif_orientation_rotates(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90° clockwise → portrait
    buf = io.BytesIO()
    _two_colour(224, 112).save(buf, "JPEG", quality=95, exif=exif)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buf.getvalue())
    t = ImageTransform(tile_size=112, max_tiles=4)

    plain = t(_two_colour(224, 112))
    assert plain.grid == (1, 2)
    for source in (path, str(path), buf.getvalue(), Image.open(path)):
        out = t(source)
        assert out.grid == (2, 1), type(source)
        # after the clockwise turn the red (left) half is on top: tile 0 red, tile 1 blue
        red = out.tiles[0].mean(dim=(1, 2))
        blue = out.tiles[1].mean(dim=(1, 2))
        assert red[0] > 1.0 and red[2] < -1.0 and blue[0] < -1.0 and blue[2] > 1.0


def test_decoded_sources_agree(tmp_path: Path) -> None:
    image = Image.fromarray(_noise(np.random.default_rng(1), 90, 60))
    path = tmp_path / "noise.png"
    image.save(path)
    t = ImageTransform(tile_size=56, max_tiles=4)
    ref = t(image).tiles
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes())):
        assert torch.equal(t(source).tiles, ref)


def test_sixteen_bit_greyscale_scaled_not_clipped() -> None:
    """I;16 → 8 bits by v/257 (deliberate divergence: PIL/HF clip at 255, turning 16-bit images white)."""
    rng = np.random.default_rng(3)
    grey8 = _noise(rng, 64, 48, 1)
    i16 = Image.fromarray(grey8.astype(np.uint16) * 257)
    assert i16.mode.startswith("I;16")
    assert np.array_equal(np.asarray(to_rgb(i16))[..., 0], grey8)
    t = ImageTransform(tile_size=56, max_tiles=4)
    assert torch.equal(t(i16).tiles, t(Image.fromarray(grey8, "L")).tiles)
    # 32-bit "I" with 16-bit data, and float images in 0..1
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(grey8.astype(np.int32) * 257)))[..., 1], grey8)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(grey8.astype(np.float32) / 255)))[..., 2], grey8)


def test_transparency_composited_on_white() -> None:
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(clear)).tolist() == [[[255, 255, 255]] * 4] * 4
    half = np.asarray(to_rgb(Image.new("LA", (2, 2), (0, 128))))
    assert (half == 127).all()


def test_text_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    with pytest.raises(ValueError, match=r"notes\.txt.*not a decodable image") as info:
        ImageTransform(tile_size=56)(path)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_truncated_jpeg_is_a_clear_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_noise(np.random.default_rng(2), 200, 150)).save(buf, "JPEG")
    data = buf.getvalue()[: len(buf.getvalue()) // 2]
    path = tmp_path / "cut.jpg"
    path.write_bytes(data)
    t = ImageTransform(tile_size=56)
    with pytest.raises(ValueError, match=r"cut\.jpg.*truncated"):
        t(path)
    with pytest.raises(ValueError, match=r"shard-0\.tar:KEY\.jpg.*truncated"):
        t(data, source="shard-0.tar:KEY.jpg")
    with pytest.raises(ValueError, match=r"image bytes \(\d+ bytes\)"):
        t(data[:20])


def test_other_input_errors(tmp_path: Path) -> None:
    t = ImageTransform(tile_size=56)
    with pytest.raises(ValueError, match=r"missing\.png.*no such file"):
        t(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="ndarray"):
        t(np.zeros((4, 4, 3), dtype=np.uint8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="std"):
        ImageTransform(std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="tile_size"):
        ImageTransform(tile_size=0)
