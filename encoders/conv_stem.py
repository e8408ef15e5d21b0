"""A convolutional stem next to a ViT's linear patch embedding (the "hybrid" ViT of Dosovitskiy et al.
and Xiao et al., "Early convolutions help transformers see better").

A from-scratch ViT embeds each 16-px patch with one linear map, so every shape detail that spans a patch
border, or that must hold for any colour pair, has to be rebuilt by attention from data. On the small
data and step counts of the tiny default that is measurably too slow (issue 12: a tiny ViT trained on
glyphs in one of nine cells learns where the glyph is but stays near chance on which glyph it is). A few
3×3 convolutions give the tokens local, colour-contrast features with a receptive field the size of a
glyph before the first attention layer.

The stem is timm's own `ConvStem` (conv → norm → ReLU per layer, the last layer a plain conv) inside
timm's `HybridEmbed` with a 1×1 projection to the ViT width; the token grid is the tile side divided by
the product of the strides, so a 128-px tile with strides (2, 2, 2, 2, 1, 1) gives the same 8 × 8 tokens
as patch 16. A linear patch projection of the raw pixels at the same stride (the plain ViT embedding) is
added to every token: the stem's per-tile norms remove a tile's absolute colour, which the linear path
keeps. Measured in `make demo` (issue 12): colour questions 66 % with linear patches only, 15 % with the
stem alone, 29 % with stem + linear path (position 42 % → 63 %), so the demo recipes keep linear patches
and the stem is an option (the glyph probe's command turns it on). Without the linear path
(`stem_pixel_path: false`) a tile's raw colour, which differs between images far more than a glyph's
shape, no longer dominates the tokens: a contrastive encoder stage then learns which glyph it sees
faster (issue 12, 200 steps on glyph captions, encoder lr 1e-3: held-out identity read by a linear probe
70.7 % without the linear path and 63.0 % with it under `pool: max`; 46.7 % and 22.3 % under `pool: cls`).
`stem_pixel_path: mean` adds back only each patch's mean colour (3 numbers per token, too few to carry its
shape): on the demo's shapes, after the same contrastive stage (200 steps, `pool: max`, encoder lr 1e-3), a
linear probe reads each object's shape from the tokens under it at 47.1 % and its colour at 99.0 % (6 and 8
classes; the demo's linear-patch encoder 37.6 % / 99.1 %, a random linear-patch ViT 33.4 % / 97.2 %).

The norm is per sample (no batch statistics), so an image's tokens never depend on the other images in
its batch and there are no running statistics to freeze, checkpoint or synchronise. The default,
`instance` (each channel over the positions of one tile), subtracts a tile's own background from every
channel, which is what makes the features colour-pair invariant early. Measured on the glyph probe
(direct classifier, 600 steps, lr 3e-4): instance norm 63 % identity / 100 % position, BatchNorm 77 % /
100 % (but batch-dependent), one group over all channels (`group`) and `layer` stayed at chance.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
from timm.layers import GroupNorm1, LayerNorm2d
from timm.layers.norm_act import GroupNormAct
from timm.models.vision_transformer_hybrid import ConvStem, HybridEmbed
from torch import nn

STEM_NORMS: dict[str, Callable[..., nn.Module]] = {
    "instance": partial(GroupNormAct, group_size=1),
    "group": GroupNorm1,
    "layer": LayerNorm2d,
}
"""`TimmEncoderConfig.stem_norm` value → the per-sample norm after each stem convolution (`instance`: each
channel over one tile's positions; `group`: one group over all channels and positions; `layer`: over the
channels at each position)."""


def check_conv_stem(channels: tuple[int, ...], strides: tuple[int, ...], norm: str, tile_size: int,
                    patch_size: Any = None) -> None:
    """Raise `ValueError` naming the bad value when the stem settings cannot build a stem for `tile_size`
    (`patch_size`: the backbone's `timm_kwargs['patch_size']`, if given; it must be the total stride)."""
    if len(channels) != len(strides) or not channels:
        raise ValueError(
            f"stem_channels {list(channels)} and stem_strides {list(strides)} must be non-empty and of equal "
            "length (one output width and one stride per convolution)"
        )
    bad = [v for v in (*channels, *strides) if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ValueError(f"stem_channels and stem_strides must be positive integers, got bad values {bad}")
    if norm not in STEM_NORMS:
        raise ValueError(f"stem_norm must be one of {sorted(STEM_NORMS)}, got {norm!r}")
    grid = math.prod(strides)
    if tile_size % grid:
        raise ValueError(
            f"the stem's total stride {grid} (product of stem_strides {list(strides)}) does not divide "
            f"tile_size {tile_size}; pick strides whose product divides the tile side"
        )
    if patch_size is not None and patch_size != grid:
        raise ValueError(
            f"timm_kwargs['patch_size']={patch_size!r} disagrees with the conv stem: its strides {list(strides)} "
            f"make tokens of {grid} px; set patch_size to their product or remove it"
        )


PIXEL_PATHS: tuple[str, ...] = ("patch", "mean", "none")
"""What is added to the stem's tokens (`TimmEncoderConfig.stem_pixel_path`): ``patch``, a linear projection of
each token's raw `stride × stride` pixels; ``mean``, a linear projection of their mean colour (3 numbers);
``none``, nothing."""


def pixel_path_name(value: bool | str) -> str:
    """`stem_pixel_path` as one of `PIXEL_PATHS` (``true`` is ``patch``, ``false`` is ``none``); `ValueError` else."""
    if value is True or value is False:
        return "patch" if value else "none"
    if value not in PIXEL_PATHS:
        raise ValueError(f"stem_pixel_path must be true, false or one of {list(PIXEL_PATHS)}, got {value!r}")
    return value


class ConvStemEmbed(HybridEmbed):
    """`HybridEmbed` over a conv stem plus a projection of the pixels under each token (`pixel_path`, one of
    `PIXEL_PATHS`): tiles `[R, C, H, W]` → tokens `[R, (H/stride)·(W/stride), width]`."""

    def __init__(self, *args: Any, stride: int, pixel_path: str = "patch", in_chans: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, in_chans=in_chans, **kwargs)
        if not self.flatten:
            raise ValueError("the conv stem emits flat token sequences (NLC); dynamic_img_size is not supported")
        width = self.proj.out_channels
        self.pixel_proj: nn.Module | None = {
            "patch": lambda: nn.Conv2d(in_chans, width, kernel_size=stride, stride=stride),
            "mean": lambda: nn.Sequential(nn.AvgPool2d(stride), nn.Conv2d(in_chans, width, kernel_size=1)),
            "none": lambda: None,
        }[pixel_path_name(pixel_path)]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = super().forward(x)
        return tokens if self.pixel_proj is None else tokens + self.pixel_proj(x).flatten(2).transpose(1, 2)


def conv_stem_embed_layer(channels: tuple[int, ...], strides: tuple[int, ...], norm: str,
                          pixel_path: bool | str = "patch") -> Callable[..., nn.Module]:
    """An `embed_layer` for `timm.create_model` (used with `patch_size=1`): tiles `[R, 3, H, W]` →
    tokens `[R, (H/s)·(W/s), width]` with `s = prod(strides)`; `pixel_path` (`PIXEL_PATHS`) adds a projection
    of the pixels under each token."""
    stem = ConvStem(in_chans=3, depth=len(channels), channels=tuple(channels), kernel_size=3,
                    stride=tuple(strides), norm_layer=STEM_NORMS[norm])
    return partial(ConvStemEmbed, backbone=stem, stride=math.prod(strides), pixel_path=pixel_path_name(pixel_path))
