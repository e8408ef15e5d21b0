"""Llama 3.2 Vision image transform: decode → RGB → tiled canvas → resize → pad → normalise → tiles.

One image becomes a `TiledImage` (`tiles [n_tiles, 3, tile, tile]`, its `(h, w)` tile grid and
aspect-ratio id); `collate_images` stacks the images of a batch of samples into an `ImageBatch`
(`pixels [B, N, T, 3, tile, tile]`, T = max_tiles) with masks for padding tiles and padding images.

Semantics follow Meta's reference and Hugging Face's `MllamaImageProcessor` (transformers 5.x, whose
default class is the torchvision-backed one), so outputs match it exactly (see
`tests/data/test_image_transform.py`):

1. Canvas (`select_canvas`): among the tile grids of `supported_aspect_ratios(max_tiles)`, each canvas
   has scale `min(canvas_w / width, canvas_h / height)`. If any scale is ≥ 1, take the smallest such
   (the least upscale), else the largest (the least downscale); ties → the smallest canvas area, then
   the first grid in `supported_aspect_ratios` order.
2. Resize target (`resize_size`): clamp width to `[tile_size, canvas_w]` and height to
   `[tile_size, canvas_h]`, then keep the aspect ratio along the side that needs the smaller scale
   (floor, at least 1 pixel). So small images grow to one tile's size, never to the whole canvas.
3. Resize bilinear with antialiasing on the uint8 image (torchvision `resize`, as HF does), pad black
   (0) bottom/right to the canvas, split into tiles row-major, then rescale by 1/255 and normalise with
   CLIP mean/std in one step: `(x - 255·mean) / (255·std)` (padding thus becomes `-mean/std`, as in HF).

Colour handling matches HF's `convert_to_rgb`: anything with an alpha band or a `transparency` entry
(RGBA, LA, PA, P/L/RGB with tRNS) is composited onto a white background; other modes go through
`Image.convert("RGB")`. One deliberate divergence: high-bit-depth greyscale (`I;16*`, `I`, `F`) is
scaled to 8 bits (`v / 257` for 16-bit data) instead of PIL's clip at 255, which turns almost every
16-bit image white. EXIF orientation is applied (`ImageOps.exif_transpose`) for every input;
HF applies it only when it opens a path itself.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.v2 import functional as tvF

from mm_llama.encoders.tiling import aspect_ratio_id, supported_aspect_ratios

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageBatch",
    "ImageInput",
    "ImageTransform",
    "TiledImage",
    "collate_images",
    "load_image",
    "resize_size",
    "select_canvas",
    "to_rgb",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Image.Image | str | os.PathLike | bytes | bytearray | memoryview

_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# geometry


def select_canvas(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The tiled canvas `(canvas_h, canvas_w)` in pixels (multiples of `tile_size`) for an image.

    Llama 3.2 Vision rule: for each grid `(h, w)` in `supported_aspect_ratios(max_tiles)` the canvas is
    `(h·tile_size, w·tile_size)` and its scale is `min(canvas_w / width, canvas_h / height)`. If some
    scale is ≥ 1, the smallest of those wins (least upscaling); otherwise the largest (least
    downscaling). Among canvases with exactly the selected scale, the smallest area wins, and among
    equal areas the first grid in `supported_aspect_ratios` order (numpy `argmin`, as in HF).

    Scales are IEEE doubles of integer ratios, as in HF's `get_optimal_tiled_canvas`; with image and
    canvas sides below ~1e7 two different ratios never round to the same double, so this is the exact
    rule.
    """
    width = _check_positive("image width", width)
    height = _check_positive("image height", height)
    tile_size = _check_positive("tile_size", tile_size)
    max_tiles = _check_positive("max_tiles", max_tiles)

    canvases = [(h * tile_size, w * tile_size) for h, w in supported_aspect_ratios(max_tiles)]
    scales = [min(cw / width, ch / height) for ch, cw in canvases]
    upscales = [s for s in scales if s >= 1.0]
    chosen = min(upscales) if upscales else max(scales)
    best: tuple[int, int] | None = None
    for canvas, scale in zip(canvases, scales):
        if scale == chosen and (best is None or canvas[0] * canvas[1] < best[0] * best[1]):
            best = canvas
    assert best is not None  # `chosen` is one of `scales`
    return best


def resize_size(width: int, height: int, canvas: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """Distortion-free resize target `(new_h, new_w)` of a `width × height` image inside `canvas`.

    `canvas` is `(canvas_h, canvas_w)` from `select_canvas`. Same semantics as HF's
    `get_image_size_fit_to_canvas`: the target width is `width` clamped to `[tile_size, canvas_w]`
    and the target height `height` clamped to `[tile_size, canvas_h]`; the side needing the smaller
    scale takes its target exactly and the other side follows the aspect ratio
    (`floor(side · scale)`, at least 1, at most its own target). Hence an image smaller than a tile is
    upscaled to one tile's size along its binding side, never to the whole canvas; a larger image is
    downscaled to fit. The result always fits the canvas.
    """
    width = _check_positive("image width", width)
    height = _check_positive("image height", height)
    tile_size = _check_positive("tile_size", tile_size)
    canvas_h, canvas_w = (int(canvas[0]), int(canvas[1]))
    if canvas_h < tile_size or canvas_w < tile_size or canvas_h % tile_size or canvas_w % tile_size:
        raise ValueError(
            f"canvas {(canvas_h, canvas_w)} must be (h, w) multiples of tile_size={tile_size}; "
            "get it from select_canvas(width, height, tile_size, max_tiles)"
        )

    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h = target_h / height
    scale_w = target_w / width
    if scale_w < scale_h:
        new_w = target_w
        new_h = min(math.floor(height * scale_w) or 1, target_h)
    else:
        new_h = target_h
        new_w = min(math.floor(width * scale_h) or 1, target_w)
    return new_h, new_w


# --------------------------------------------------------------------------------------------------
# decoding and colour


def _describe(image: object, source: str | None) -> str:
    if source is not None:
        return source
    if isinstance(image, (str, os.PathLike)):
        return f"image file {os.fspath(image)!r}"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(image)} bytes)"
    return "image"


def load_image(image: ImageInput, source: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode `image` (a PIL image, a path, or encoded bytes) fully and apply its EXIF orientation.

    `source` names the input in error messages (e.g. a shard member `"shard-0001.tar:KEY.jpg"`);
    paths name themselves. `max_pixels`, if set, bounds width × height as declared in the header, checked
    before anything is decoded (a few KB of PNG can declare 12000 × 12000 pixels). Raises `ValueError`
    naming the input and PIL's reason for anything that is missing, not an image, truncated, corrupt or
    larger than `max_pixels`, and `TypeError` for an unsupported input type.
    """
    what = _describe(image, source)
    if isinstance(image, Image.Image):
        opened, owned = image, False
    elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise ValueError(f"cannot read {what}: no such file; check the path")
            fp: object = path
        else:
            fp = io.BytesIO(bytes(image))
        try:
            with warnings.catch_warnings():
                if max_pixels is not None:  # our own, lower limit is checked below
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(fp)  # type: ignore[arg-type]
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise ValueError(
                f"cannot read {what}: not a decodable image ({type(e).__name__}: {e}); "
                "expected JPEG, PNG, WebP, GIF, BMP, TIFF or another format PIL can open"
            ) from None
        owned = True
        if max_pixels is not None and opened.width * opened.height > max_pixels:
            width, height = opened.size
            opened.close()
            raise ValueError(
                f"cannot read {what}: the image is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
                f"over the limit of {max_pixels / 1e6:g} megapixels; it was not decoded (downscale the file)"
            )
    else:
        raise TypeError(
            f"image must be a PIL.Image.Image, a path (str or os.PathLike) or encoded bytes, got {type(image).__name__}"
        )

    try:
        opened.load()
        oriented = ImageOps.exif_transpose(opened)
        assert oriented is not None  # in_place=False always returns an image
        if oriented is opened and owned:
            oriented = opened.copy()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(
            f"cannot read {what}: the image data is truncated or corrupt ({type(e).__name__}: {e}); "
            "re-export or re-download the file, or drop this sample"
        ) from None
    finally:
        if owned:
            opened.close()
    return oriented


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Map `I;16*` / `I` / `F` greyscale to 8-bit `L` by range instead of PIL's clip at 255.

    16-bit modes: `round(v / 257)` (0..65535 → 0..255). `I`: same when any value exceeds 255 (16-bit
    data opened as 32-bit), else taken as 8-bit. `F`: taken as 0..1 when its maximum is ≤ 1, else 0..255.
    """
    if image.mode == "F":
        a = np.asarray(image, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
    else:
        a = np.asarray(image.convert("I") if image.mode.startswith("I;16") else image, dtype=np.float64)
        if image.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way HF's `convert_to_rgb` does (see module docstring).

    Transparency (an alpha band or a `transparency` entry, e.g. P or L with tRNS) is composited onto
    white; L/1/CMYK/YCbCr/… use PIL's own conversion; `I;16*`/`I`/`F` are scaled to 8 bits first.
    """
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        image = _high_bit_depth_to_l(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# one image


@dataclass
class TiledImage:
    """One transformed image.

    tiles: `[n_tiles, 3, tile_size, tile_size]` float32, normalised, row-major over the grid.
    grid: `(h, w)` = (tiles high, tiles wide); `n_tiles = h·w`.
    aspect_ratio_id: 1-based id of `grid` in `supported_aspect_ratios(max_tiles)` of the transform.
    """

    tiles: Tensor
    grid: tuple[int, int]
    aspect_ratio_id: int

    def __post_init__(self) -> None:
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        if self.tiles.ndim != 4 or self.tiles.shape[1] != 3 or self.tiles.shape[2] != self.tiles.shape[3]:
            raise ValueError(f"tiles must be [n_tiles, 3, tile, tile], got shape {tuple(self.tiles.shape)}")
        if self.tiles.shape[0] != self.grid[0] * self.grid[1]:
            raise ValueError(f"{self.tiles.shape[0]} tiles do not fill the grid {self.grid} (h·w tiles expected)")

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def tile_size(self) -> int:
        return int(self.tiles.shape[-1])


class ImageTransform:
    """Image → `TiledImage` with the Llama 3.2 Vision tiling (see module docstring for each step).

    Args:
        tile_size: tile side in pixels (560 for Llama 3.2 Vision, 336/448 in the paper's stages).
        max_tiles: most tiles per image; the grids are `supported_aspect_ratios(max_tiles)`.
        mean, std: per-channel normalisation of the 0..1 image (CLIP's by default).
    """

    def __init__(
        self,
        tile_size: int = 560,
        max_tiles: int = 4,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        self.tile_size = _check_positive("tile_size", tile_size)
        self.max_tiles = _check_positive("max_tiles", max_tiles)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={tuple(mean)}, std={tuple(std)}")
        if any(not s > 0 for s in std):
            raise ValueError(f"std values must be > 0, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # rescale (1/255) and normalise fused into one affine step, in float32, as HF does
        self._mean255 = (torch.tensor(self.mean, dtype=torch.float32) * 255.0).view(1, 3, 1, 1)
        self._std255 = (torch.tensor(self.std, dtype=torch.float32) * 255.0).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"ImageTransform(tile_size={self.tile_size}, max_tiles={self.max_tiles}, mean={self.mean}, std={self.std})"

    def __call__(self, image: ImageInput, source: str | None = None) -> TiledImage:
        """Transform one image; `source` names bytes input in errors (paths name themselves)."""
        decoded = load_image(image, source=source)
        try:
            rgb = to_rgb(decoded)
        except (ValueError, OSError) as e:
            raise ValueError(
                f"cannot convert {_describe(image, source)} (PIL mode {decoded.mode!r}) to RGB: {e}; "
                "convert it to RGB before passing it in"
            ) from None
        pixels = tvF.pil_to_tensor(rgb)  # [3, H, W] uint8
        return self.tile_tensor(pixels)

    def tile_tensor(self, pixels: Tensor) -> TiledImage:
        """Tile an already decoded RGB image `[3, H, W]` uint8 (0..255)."""
        if pixels.ndim != 3 or pixels.shape[0] != 3 or pixels.dtype != torch.uint8:
            raise ValueError(
                f"expected an RGB uint8 tensor [3, H, W], got dtype {pixels.dtype} shape {tuple(pixels.shape)}"
            )
        height, width = int(pixels.shape[1]), int(pixels.shape[2])
        canvas_h, canvas_w = select_canvas(width, height, self.tile_size, self.max_tiles)
        new_h, new_w = resize_size(width, height, (canvas_h, canvas_w), self.tile_size)
        if (new_h, new_w) != (height, width):
            pixels = tvF.resize(
                pixels, [new_h, new_w], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True
            )
        canvas = pixels.new_zeros((3, canvas_h, canvas_w))
        canvas[:, :new_h, :new_w] = pixels
        grid = (canvas_h // self.tile_size, canvas_w // self.tile_size)
        t = self.tile_size
        # [3, gh·t, gw·t] → [gh, gw, 3, t, t] → [gh·gw, 3, t, t] (row-major over the grid)
        tiles = canvas.view(3, grid[0], t, grid[1], t).permute(1, 3, 0, 2, 4).reshape(-1, 3, t, t)
        tiles = (tiles.to(torch.float32) - self._mean255) / self._std255
        return TiledImage(tiles=tiles, grid=grid, aspect_ratio_id=aspect_ratio_id(grid, self.max_tiles))


# --------------------------------------------------------------------------------------------------
# batches


@dataclass
class ImageBatch:
    """The images of a batch of samples, padded to fixed shapes.

    pixels: `[B, N, T, 3, tile, tile]` (T = max_tiles); padding tiles and padding images are zeros.
    aspect_ratio_ids: `[B, N]` long; 1-based grid ids for `max_tiles`, 0 for padding images.
    grids: `[B, N, 2]` long; `(h, w)` of each image, `(0, 0)` for padding images.
    tile_mask: `[B, N, T]` bool; True for real tiles (all False for padding images).
    num_tiles: per sample, the tile count of each real image (ragged; HF's `num_tiles`).

    N may be 0 (no sample in the batch has an image): the tensors are then empty along N.
    """

    pixels: Tensor
    aspect_ratio_ids: Tensor
    grids: Tensor
    tile_mask: Tensor
    num_tiles: list[list[int]]

    @property
    def image_mask(self) -> Tensor:
        """`[B, N]` bool: True where a real image sits, False for padding images."""
        return self.aspect_ratio_ids > 0

    @property
    def aspect_ratio_mask(self) -> Tensor:
        """`[B, N, T]` long in HF/Meta's convention: `tile_mask` with tile 0 set for every image slot.

        Meta's reference pads the aspect ratios of missing images with `(1, 1)`, so HF's
        `aspect_ratio_mask` marks tile 0 of padding images as valid too; use `tile_mask` for the truth.
        """
        mask = self.tile_mask.to(torch.long)
        if mask.shape[-1] > 0:
            mask[..., 0] = 1
        return mask

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> ImageBatch:
        """A copy on `device`; `dtype` (a floating type) applies to `pixels` only."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype applies to pixels and must be a floating type, got {dtype}")
        return ImageBatch(
            pixels=self.pixels.to(device=device, dtype=dtype, non_blocking=non_blocking),
            aspect_ratio_ids=self.aspect_ratio_ids.to(device, non_blocking=non_blocking),
            grids=self.grids.to(device, non_blocking=non_blocking),
            tile_mask=self.tile_mask.to(device, non_blocking=non_blocking),
            num_tiles=[list(n) for n in self.num_tiles],
        )


def collate_images(
    samples: Sequence[Sequence[TiledImage]],
    max_tiles: int,
    max_images: int | None = None,
    tile_size: int | None = None,
) -> ImageBatch:
    """Stack the images of `B` samples (each a list of 0 or more `TiledImage`) into an `ImageBatch`.

    N is the largest image count in the batch, or exactly `max_images` when given (fixed shapes; a
    sample with more images is an error). When no sample has an image and `max_images` is None, N = 0
    and `pixels` is `[B, 0, T, 3, tile, tile]`; the tile size then comes from `tile_size`, which must
    be given (pass it always in pipelines whose batches can be text-only). Aspect-ratio ids are
    recomputed from each grid for this `max_tiles` (the model's), so they are right even if the
    transform used a different `max_tiles`.
    """
    max_tiles = _check_positive("max_tiles", max_tiles)
    if len(samples) == 0:
        raise ValueError("collate_images needs at least one sample, got an empty list")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 0):
        raise ValueError(f"max_images must be a non-negative integer or None, got {max_images!r}")
    if tile_size is not None:
        tile_size = _check_positive("tile_size", tile_size)

    counts = [len(s) for s in samples]
    if max_images is not None:
        for b, c in enumerate(counts):
            if c > max_images:
                raise ValueError(
                    f"sample {b} has {c} images but max_images={max_images}; raise max_images or drop images"
                )
        n_slots = max_images
    else:
        n_slots = max(counts)

    images = [(b, j, im) for b, s in enumerate(samples) for j, im in enumerate(s)]
    for b, j, im in images:
        if not isinstance(im, TiledImage):
            raise ValueError(f"sample {b} image {j} is a {type(im).__name__}, expected a TiledImage")
    dtype = images[0][2].tiles.dtype if images else torch.float32
    for b, j, im in images:
        if tile_size is None:
            tile_size = im.tile_size
        if im.tile_size != tile_size:
            raise ValueError(
                f"sample {b} image {j} has tiles of {im.tile_size} px but the batch uses {tile_size} px; "
                "use one ImageTransform(tile_size=...) for all images"
            )
        if im.num_tiles > max_tiles:
            raise ValueError(
                f"sample {b} image {j} has {im.num_tiles} tiles (grid {im.grid}) but max_tiles={max_tiles}; "
                "use the same max_tiles in ImageTransform and collate_images"
            )
    if tile_size is None:
        raise ValueError("no sample in the batch has an image, so the tile size is unknown: pass tile_size=")

    batch = len(samples)
    pixels = torch.zeros((batch, n_slots, max_tiles, 3, tile_size, tile_size), dtype=dtype)
    ratio_ids = torch.zeros((batch, n_slots), dtype=torch.long)
    grids = torch.zeros((batch, n_slots, 2), dtype=torch.long)
    tile_mask = torch.zeros((batch, n_slots, max_tiles), dtype=torch.bool)
    for b, j, im in images:
        n = im.num_tiles
        pixels[b, j, :n] = im.tiles
        ratio_ids[b, j] = aspect_ratio_id(im.grid, max_tiles)
        grids[b, j] = torch.tensor(im.grid)
        tile_mask[b, j, :n] = True
    num_tiles = [[im.num_tiles for im in s] for s in samples]
    return ImageBatch(pixels=pixels, aspect_ratio_ids=ratio_ids, grids=grids, tile_mask=tile_mask, num_tiles=num_tiles)
