"""A Llama 3.2 Vision directory's own image preprocessing: ``preprocessor_config.json`` (`MllamaImageProcessor`).

:func:`read_image_processing` reads its tile size (``size``), tile count (``max_image_tiles``), normalisation
(``image_mean`` / ``image_std``, ``do_normalize``) and rescaling (``do_rescale`` / ``rescale_factor``) into an
:class:`ImageProcessing`, whose :meth:`~ImageProcessing.transform` is the `ImageTransform` the checkpoint's
images must go through. Settings that contradict the model's vision config (another tile size or tile
count: the position and aspect-ratio embeddings are built for those) and settings mm-llama's transform
cannot reproduce (no resizing or padding, another resampling filter, non-square tiles) are errors that name
the file, the value and what to do. A directory without the file uses the built-in Llama 3.2 Vision
preprocessing (CLIP mean / std, rescale by 1/255).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.data.image_transform import CLIP_MEAN, CLIP_STD, ImageTransform

__all__ = ["PREPROCESSOR_FILE", "ImageProcessing", "read_image_processing"]

PREPROCESSOR_FILE = "preprocessor_config.json"
_BILINEAR = 2  # PIL.Image.BILINEAR, what MllamaImageProcessor and mm-llama resize with


@dataclass(frozen=True)
class ImageProcessing:
    """How a checkpoint's images are preprocessed: tiles of ``tile_size`` px, at most ``max_tiles``, then
    ``(x / 255 - mean) / std`` per channel (a ``preprocessor_config.json`` rescale factor other than 1/255 is
    folded into ``mean`` / ``std``). ``source``: the file it was read from."""

    tile_size: int
    max_tiles: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    source: str | None = None

    def transform(self) -> ImageTransform:
        """The image transform these settings describe."""
        return ImageTransform(tile_size=self.tile_size, max_tiles=self.max_tiles, mean=self.mean, std=self.std)


def _triple(config: dict[str, Any], key: str, path: Path) -> tuple[float, float, float]:
    value = config[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise CheckpointError(f"{path}: {key} must be 3 finite numbers (R, G, B), got {value!r}; fix the file")
    return float(value[0]), float(value[1]), float(value[2])


def _tile_size(config: dict[str, Any], path: Path) -> int | None:
    size = config.get("size")
    if size is None:
        return None
    if not isinstance(size, dict) or set(size) != {"height", "width"}:
        raise CheckpointError(f"{path}: size must be {{'height': N, 'width': N}}, got {size!r}; fix the file")
    if size["height"] != size["width"]:
        raise CheckpointError(f"{path}: size {size} is not square; Llama 3.2 Vision tiles are square (height = "
                              "width = the vision config's image_size)")
    return int(size["height"])


def _unsupported(config: dict[str, Any], path: Path) -> list[str]:
    kind = config.get("image_processor_type")
    problems = []
    if kind is not None and "Mllama" not in str(kind):
        problems.append(f"image_processor_type is {kind!r}, not MllamaImageProcessor")
    for flag in ("do_resize", "do_pad"):
        if config.get(flag, True) is False:
            problems.append(f"{flag} is false (mm-llama always resizes to the tile canvas and pads)")
    if config.get("resample", _BILINEAR) != _BILINEAR:
        problems.append(f"resample is {config['resample']!r} (mm-llama resizes bilinear, PIL's {_BILINEAR})")
    return problems


def _normalisation(config: dict[str, Any], path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`(mean, std)` for `ImageTransform`'s ``(x - 255·mean) / (255·std)`` of uint8 pixels ``x``."""
    mean = _triple(config, "image_mean", path) if "image_mean" in config else CLIP_MEAN
    std = _triple(config, "image_std", path) if "image_std" in config else CLIP_STD
    if config.get("do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if any(s <= 0 for s in std):
        raise CheckpointError(f"{path}: image_std must be > 0, got {list(std)}; fix the file")
    factor = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) is not False else 1.0
    if not (math.isfinite(factor) and factor > 0):
        raise CheckpointError(f"{path}: rescale_factor must be a positive number, got {factor!r}; fix the file")
    scale = 1.0 / (255.0 * factor)  # (x·f − m) / s = (x − 255·m′) / (255·s′) with m′ = m·scale, s′ = s·scale
    if abs(scale - 1.0) > 1e-9:
        mean, std = tuple(m * scale for m in mean), tuple(s * scale for s in std)
    return mean, std


def read_image_processing(directory: str | Path, *, tile_size: int, max_tiles: int) -> ImageProcessing | None:
    """The ``preprocessor_config.json`` of ``directory`` checked against the model's vision config
    (``tile_size``: its image_size; ``max_tiles``: its max_num_tiles); None when there is no such file.
    Raises `CheckpointError` naming the file and value for a contradiction or a setting mm-llama cannot apply."""
    path = Path(directory) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; fix the file or remove it (the built-in Llama 3.2 "
                              "Vision preprocessing is then used)") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    problems = _unsupported(config, path)
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}: mm-llama cannot preprocess images that way; use "
                              "the checkpoint's published preprocessor_config.json")
    size = _tile_size(config, path)
    if size is not None and size != tile_size:
        raise CheckpointError(f"{path} resizes to tiles of {size} px but the model's vision config has image_size "
                              f"{tile_size}: they contradict each other; fix size in {path.name} to {tile_size}")
    tiles = config.get("max_image_tiles", max_tiles)
    if tiles != max_tiles:
        raise CheckpointError(f"{path} allows max_image_tiles={tiles} but the model's vision config has "
                              f"max_num_tiles={max_tiles} (its aspect-ratio embeddings are numbered for that); "
                              f"set max_image_tiles to {max_tiles}")
    mean, std = _normalisation(config, path)
    return ImageProcessing(tile_size, max_tiles, mean, std, str(path))  # type: ignore[arg-type]
