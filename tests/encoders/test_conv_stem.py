"""The convolutional stem option of the timm encoder: token grid, per-image independence, weights round
trip through `weights=`, and the config errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mm_llama.encoders.timm_vit import TimmEncoderConfig, TimmTiledEncoder

STEM: dict[str, Any] = dict(stem_channels=(8, 16, 32), stem_strides=(2, 2, 2))  # total stride 8


def stem_config(**overrides: Any) -> TimmEncoderConfig:
    fields: dict[str, Any] = dict(
        model_name="vit_tiny_patch16_224", timm_kwargs=dict(embed_dim=32, depth=2, num_heads=4),
        tile_size=32, max_tiles=2, taps=(1,), n_gated_layers=1, **STEM,
    )
    fields.update(overrides)
    return TimmEncoderConfig(**fields)


def one_tile_inputs(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pixels [B, 3, H, W]` as B single-tile images of a `max_tiles=2` encoder."""
    b = pixels.shape[0]
    padded = torch.zeros(b, 1, 2, *pixels.shape[1:])
    padded[:, 0, 0] = pixels
    tile_mask = torch.zeros(b, 1, 2, dtype=torch.bool)
    tile_mask[:, 0, 0] = True
    return padded, torch.ones(b, 1, dtype=torch.long), tile_mask


@pytest.mark.parametrize("patch_size", [None, 8], ids=["no patch_size", "patch_size = total stride"])
def test_token_grid_is_the_tile_over_the_total_stride(patch_size: int | None) -> None:
    kwargs = dict(embed_dim=32, depth=2, num_heads=4) | ({} if patch_size is None else {"patch_size": patch_size})
    encoder = TimmTiledEncoder(stem_config(timm_kwargs=kwargs))
    assert encoder.tokens_per_tile == (32 // 8) ** 2 + 1  # 4 × 4 tokens + class token
    out = encoder(*one_tile_inputs(torch.randn(3, 3, 32, 32)))
    assert out.shape == (3, 1, 2, 17, 32 * 2)
    embed = encoder.backbone.patch_embed
    convs = [m for m in embed.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [(3, 2), (3, 2), (3, 2)]
    assert embed.proj.kernel_size == (1, 1)  # stem channels → ViT width
    assert (embed.pixel_proj.kernel_size, embed.pixel_proj.stride) == ((8, 8), (8, 8))  # raw patches, colour kept


def test_without_the_pixel_path_the_tokens_are_the_stem_alone() -> None:
    """`stem_pixel_path=False`: no raw-patch projection, and the tokens are what the stem (and its 1×1
    projection) gives; with it, the same stem's tokens plus the raw patches' projection."""
    torch.manual_seed(0)
    with_path = TimmTiledEncoder(stem_config()).backbone.patch_embed
    without = TimmTiledEncoder(stem_config(stem_pixel_path=False)).backbone.patch_embed
    assert without.pixel_proj is None
    assert not any("pixel_proj" in k for k in without.state_dict())
    without.load_state_dict({k: v for k, v in with_path.state_dict().items() if "pixel_proj" not in k})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem_tokens = with_path.proj(with_path.backbone(x)).flatten(2).transpose(1, 2)  # [B, 16, 32]
        raw = with_path.pixel_proj(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(without(x), stem_tokens)
        torch.testing.assert_close(with_path(x), stem_tokens + raw)


def test_the_mean_path_adds_each_patchs_mean_colour_only() -> None:
    """`stem_pixel_path="mean"`: the stem's tokens plus a linear map of the mean RGB under each token (the
    mean computed here by reshaping the tile into its 8 × 8 patches), so two patches with the same mean colour
    but other pixels get the same addition."""
    torch.manual_seed(0)
    embed = TimmTiledEncoder(stem_config(stem_pixel_path="mean")).backbone.patch_embed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem_tokens = embed.proj(embed.backbone(x)).flatten(2).transpose(1, 2)  # [B, 16, 32]
        means = x.reshape(2, 3, 4, 8, 4, 8).mean(dim=(3, 5)).flatten(2).transpose(1, 2)  # [B, 16, 3]
        weight, bias = embed.pixel_proj[1].weight[:, :, 0, 0], embed.pixel_proj[1].bias  # [32, 3], [32]
        torch.testing.assert_close(embed(x), stem_tokens + means @ weight.T + bias)
    assert sum(p.numel() for p in embed.pixel_proj.parameters()) == 3 * 32 + 32


def test_an_image_encodes_the_same_alone_and_in_a_batch_while_training() -> None:
    """The stem's norm is per image (no batch statistics): in train mode, an image's tokens do not
    depend on the other images of its batch, as with the linear patch embedding."""
    torch.manual_seed(0)
    encoder = TimmTiledEncoder(stem_config()).train()
    pixels = torch.randn(4, 3, 32, 32)
    together = encoder(*one_tile_inputs(pixels))
    alone = encoder(*one_tile_inputs(pixels[2:3]))
    torch.testing.assert_close(alone[0], together[2], rtol=1e-5, atol=1e-5)


def test_default_norm_is_per_channel_over_one_tile() -> None:
    """`instance`: after each stem convolution, every channel is normalised over one tile's positions (one
    group per channel), so a tile and the same tile at three times the contrast give the same features."""
    first = TimmTiledEncoder(stem_config()).backbone.patch_embed.backbone[0]
    assert first.bn.num_groups == first.bn.num_channels == 8
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(first(3.0 * x), first(x), rtol=1e-4, atol=1e-4)


def test_stem_weights_round_trip_through_weights_file(tmp_path: Path) -> None:
    """A backbone saved as a state dict (what the contrastive stage exports) loads into a second encoder
    with the same stem and gives the same tokens."""
    source = TimmTiledEncoder(stem_config()).eval()
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    loaded = TimmTiledEncoder(stem_config(weights=str(path))).eval()
    inputs = one_tile_inputs(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(loaded.run_backbone(inputs[0][:, 0, 0])[0], source.run_backbone(inputs[0][:, 0, 0])[0])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(stem_strides=(2, 2)), r"stem_channels \[8, 16, 32\] and stem_strides \[2, 2\] must be"),
        (dict(stem_channels=(8, 0, 32)), r"positive integers, got bad values \[0\]"),
        (dict(stem_strides=(2, 2, 3)), r"total stride 12 .* does not divide tile_size 32"),
        (dict(stem_pixel_path="no"), r"stem_pixel_path must be true, false or one of \['patch', 'mean', 'none'\], got 'no'"),
        (dict(stem_norm="batch"), r"stem_norm must be one of \['group', 'instance', 'layer'\], got 'batch'"),
        (dict(timm_kwargs=dict(embed_dim=32, depth=2, num_heads=4, patch_size=16)),
         r"patch_size'\]=16 disagrees with the conv stem: its strides \[2, 2, 2\] make tokens of 8 px"),
    ],
)
def test_bad_stem_settings_are_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stem_config(**overrides)


def test_yaml_lists_become_the_config_tuples() -> None:
    from mm_llama.checkpoints.multimodal_loading import vision_config_from_dict

    cfg = vision_config_from_dict("timm", {"model_name": "vit_tiny_patch16_224", "tile_size": 32,
                                           "stem_channels": [8, 16, 32], "stem_strides": [2, 2, 2]})
    assert cfg.stem_channels == (8, 16, 32) and cfg.stem_strides == (2, 2, 2)
