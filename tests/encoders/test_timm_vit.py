"""The paper's encoder recipe on a timm ViT: weight loading, taps, gated layers, masking, ViT-H/14 sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from mm_llama.encoders.base import TiledImageEncoder
from mm_llama.encoders.timm_vit import PAPER_TAPS, TimmEncoderConfig, TimmTiledEncoder

TINY_KWARGS: dict[str, Any] = dict(embed_dim=32, depth=4, num_heads=4, patch_size=16)
TILE = 32  # 2 × 2 patches of 16 → 4 patches + CLS = 5 tokens per tile


def tiny_config(**overrides: Any) -> TimmEncoderConfig:
    fields: dict[str, Any] = dict(
        model_name="vit_tiny_patch16_224",
        timm_kwargs=dict(TINY_KWARGS),
        tile_size=TILE,
        max_tiles=4,
        taps=(3, 0, 1),  # unsorted and including block 0 on purpose
        n_gated_layers=2,
    )
    fields.update(overrides)
    return TimmEncoderConfig(**fields)


def tiny_timm_model(img_size: int = TILE, **overrides: Any) -> nn.Module:
    """A stand-alone timm model as a user would have trained it (with a 10-way classifier head)."""
    kwargs = {**TINY_KWARGS, **overrides}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=img_size, **kwargs)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B=2, N=3: a 1×1 image, a 2×2 image, a padding image; a 1×2 image and two padding images."""
    pixels = torch.randn(2, 3, 4, 3, TILE, TILE)
    aspect_ratio_ids = torch.tensor([[1, 6, 0], [2, 0, 0]])
    tile_mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    tile_mask[0, 0, :1] = True
    tile_mask[0, 1, :] = True
    tile_mask[1, 0, :2] = True
    return pixels, aspect_ratio_ids, tile_mask


def open_gates(encoder: TimmTiledEncoder, value: float = 0.7) -> None:
    """Switch every tanh gate on (and give the gated layers non-trivial biases) so masking is tested."""
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if name.split(".")[-1] in ("gate", "gate_attn", "gate_ffn"):
                param.fill_(value)
        for module in encoder.gated_layers.modules():
            if isinstance(module, nn.LayerNorm):
                module.bias.normal_()


# --------------------------------------------------------------------------------------------------
# 1. weights from a local file


def assert_backbone_equals(encoder: TimmTiledEncoder, source: nn.Module) -> None:
    source_params = dict(source.named_parameters())
    for name, param in encoder.backbone.named_parameters():
        torch.testing.assert_close(param, source_params[name], rtol=0, atol=0, msg=name)


def test_loads_safetensors_and_ignores_classifier_head(tmp_path: Path) -> None:
    source = tiny_timm_model()
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    encoder = TimmTiledEncoder(tiny_config(weights=str(path)))
    assert_backbone_equals(encoder, source)
    assert "head.weight" in source.state_dict() and "head.weight" not in encoder.backbone.state_dict()


def test_random_backbone_positions_start_at_patch_embedding_scale() -> None:
    """A from-scratch backbone draws its position table at `pos_embed_init_std` (default 0.6), the RMS of
    patch embeddings of normalised pixels, instead of timm's 0.02 (issue 12: at 0.02 a small ViT barely
    tells patches apart by place); `None` keeps timm's init."""
    torch.manual_seed(0)
    cfg = tiny_config(timm_kwargs={**TINY_KWARGS, "embed_dim": 64}, tile_size=128)  # 65 × 64 table entries
    ours = TimmTiledEncoder(cfg).backbone.pos_embed.detach()
    timm_default = TimmTiledEncoder(tiny_config(pos_embed_init_std=None)).backbone.pos_embed.detach()
    assert ours.std().item() == pytest.approx(0.6, rel=0.05)
    assert ours.abs().max().item() <= 3 * 0.6
    assert timm_default.std().item() == pytest.approx(0.02, rel=0.25)
    patches = TimmTiledEncoder(cfg).backbone.patch_embed(torch.randn(8, 3, 128, 128))  # normalised pixels
    assert 0.3 < patches.pow(2).mean().sqrt().item() < 1.2  # the scale the table is matched to


def test_loaded_weights_replace_the_position_init(tmp_path: Path) -> None:
    source = tiny_timm_model()
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    encoder = TimmTiledEncoder(tiny_config(weights=str(path), pos_embed_init_std=0.6))
    torch.testing.assert_close(encoder.backbone.pos_embed, source.pos_embed, rtol=0, atol=0)


def test_loads_pth_with_module_prefix(tmp_path: Path) -> None:
    source = tiny_timm_model()
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    assert_backbone_equals(TimmTiledEncoder(tiny_config(weights=str(path))), source)


def test_loads_visual_prefix_and_resamples_position_embedding(tmp_path: Path) -> None:
    """Like the paper's ViT-H/14 (trained at 224 px, run on 336 px tiles): a 3×3-grid checkpoint loads
    into 2×2-grid tiles through timm's position-embedding resampling."""
    source = tiny_timm_model(img_size=48)
    path = tmp_path / "clip_visual.bin"
    torch.save({f"visual.{k}": v for k, v in source.state_dict().items()}, path)
    encoder = TimmTiledEncoder(tiny_config(weights=str(path)))
    assert encoder.backbone.pos_embed.shape == (1, 5, 32)
    source_params = dict(source.named_parameters())
    for name, param in encoder.backbone.named_parameters():
        if name != "pos_embed":
            torch.testing.assert_close(param, source_params[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(encoder.backbone.pos_embed[:, 0], source.pos_embed[:, 0])  # CLS row kept


def test_missing_keys_are_named(tmp_path: Path) -> None:
    state = tiny_timm_model().state_dict()
    del state["blocks.2.attn.qkv.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing key.*blocks\.2\.attn\.qkv\.weight"):
        TimmTiledEncoder(tiny_config(weights=str(path)))


def test_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = tiny_timm_model().state_dict()
    state["blocks.9.attn.qkv.weight"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"unexpected key.*blocks\.9\.attn\.qkv\.weight"):
        TimmTiledEncoder(tiny_config(weights=str(path)))


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "wide.safetensors"
    save_file(tiny_timm_model(embed_dim=48, num_heads=4).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"shape mismatch.*blocks\.0\.norm1\.weight: file \(48,\) vs model \(32,\)"):
        TimmTiledEncoder(tiny_config(weights=str(path)))


def test_nonexistent_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        TimmTiledEncoder(tiny_config(weights=str(missing)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read encoder weights.*garbage.pth"):
        TimmTiledEncoder(tiny_config(weights=str(garbage)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(taps=(1, 4)), r"taps \[4\] are out of range .* 4 blocks"),
        (dict(taps=(1, 1)), "duplicates"),
        (dict(taps=(-1,)), "non-negative"),
        (dict(timm_kwargs={**TINY_KWARGS, "pretrained": True}), "pretrained.*weights="),
        (dict(timm_kwargs={**TINY_KWARGS, "img_size": 64}), "img_size.*tile_size=32"),
        (dict(model_name="vit_does_not_exist"), "no model 'vit_does_not_exist'"),
        (dict(pos_embed_init_std=0.0), "pos_embed_init_std must be a positive number"),
        (dict(pos_embed_init_std=float("nan")), "pos_embed_init_std must be a positive number"),
        (dict(pos_embed_init_std="big"), "pos_embed_init_std must be a positive number"),
    ],
)
def test_bad_config_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TimmTiledEncoder(tiny_config(**overrides))


def test_bad_input_errors() -> None:
    encoder = TimmTiledEncoder(tiny_config())
    pixels, ids, mask = batch()
    with pytest.raises(ValueError, match="pixels must be"):
        encoder(pixels[:, :, :3], ids, mask[:, :, :3])
    with pytest.raises(ValueError, match="aspect_ratio_ids must lie in 0..8"):
        encoder(pixels, ids + 9, mask)
    bad_mask = mask.clone()
    bad_mask[0, 2, 0] = True  # a real tile on padding image (id 0)
    with pytest.raises(ValueError, match="padding image"):
        encoder(pixels, ids, bad_mask)


# --------------------------------------------------------------------------------------------------
# 2. taps and final output


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 2}], ids=["cls", "cls+registers"])
def test_taps_are_block_inputs_and_final_is_post_norm_output(extra: dict[str, Any]) -> None:
    cfg = tiny_config(timm_kwargs={**TINY_KWARGS, **extra})
    encoder = TimmTiledEncoder(cfg).eval()
    assert isinstance(encoder, TiledImageEncoder)
    prefix = 1 + extra.get("reg_tokens", 0)
    assert encoder.tokens_per_tile == 4 + prefix
    assert encoder.out_dim == 32 * (1 + len(cfg.taps))
    pixels, ids, mask = batch()
    with torch.no_grad():
        out = encoder(pixels, ids, mask)
    assert out.shape == (2, 3, 4, encoder.tokens_per_tile, encoder.out_dim)
    assert torch.count_nonzero(out[~mask]) == 0  # padding tiles and padding images are zeros

    # Oracle: the plain timm backbone on the real tiles, with hooks on the inputs of the tapped blocks.
    seen: dict[int, torch.Tensor] = {}
    handles = [
        encoder.backbone.blocks[i].register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0]))
        for i in cfg.taps
    ]
    with torch.no_grad():
        final = encoder.backbone.forward_features(pixels[mask])  # ends with backbone.norm (CLIP's ln_post)
    for handle in handles:
        handle.remove()
    got_final, got_taps = TimmTiledEncoder.split_features(out[mask], len(cfg.taps))
    torch.testing.assert_close(got_final, final, rtol=0, atol=0)
    for block, got in zip(cfg.taps, got_taps):
        torch.testing.assert_close(got, seen[block], rtol=0, atol=0, msg=f"tap of block {block}")
    # tap 0 is the embedded input (after pos-embed and norm_pre), not the output of block 0
    assert not torch.equal(seen[0], encoder.backbone.blocks[0](seen[0]))


def test_no_taps_gives_final_only() -> None:
    encoder = TimmTiledEncoder(tiny_config(taps=()))
    pixels, ids, mask = batch()
    with torch.no_grad():
        out = encoder(pixels, ids, mask)
        final = encoder.backbone.forward_features(pixels[mask])
    assert encoder.out_dim == 32 and out.shape[-1] == 32
    torch.testing.assert_close(out[mask], final, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# 3. gated layers: identity at init, padding tiles invisible, samples independent


def test_zero_gates_make_the_gated_stack_the_identity() -> None:
    encoder = TimmTiledEncoder(tiny_config())
    x = torch.randn(3, 4 * encoder.tokens_per_tile, 32)
    key_mask = torch.ones(3, x.shape[1], dtype=torch.bool)
    key_mask[1, 10:] = False
    assert torch.equal(encoder.gated_layers(x), x)
    assert torch.equal(encoder.gated_layers(x, key_mask), x)
    open_gates(encoder)
    assert not torch.allclose(encoder.gated_layers(x), x)


def test_gates_learn_from_zero_init() -> None:
    encoder = TimmTiledEncoder(tiny_config())
    pixels, ids, mask = batch()
    encoder(pixels, ids, mask).square().sum().backward()
    for name in ("gated_layers.layers.0.gate_attn", "gated_layers.layers.1.gate_ffn", "post_tile_embed.gate"):
        grad = encoder.get_parameter(name).grad
        assert grad is not None and grad.abs().item() > 0, name


def test_padding_tiles_do_not_influence_real_tiles() -> None:
    encoder = TimmTiledEncoder(tiny_config()).eval()
    open_gates(encoder)
    pixels, ids, mask = batch()
    with torch.no_grad():
        out = encoder(pixels, ids, mask)
        changed = pixels.clone()
        changed[~mask] = torch.randn_like(changed[~mask]) * 10
        assert torch.equal(encoder(changed, ids, mask), out)
    assert torch.count_nonzero(out[~mask]) == 0

    # Image (1, 0) has 2 real tiles of 4: its outputs equal the gated stack over just those 2 tiles.
    tiles = pixels[1, 0, :2]
    tile_ids, tile_index = torch.tensor([2, 2]), torch.tensor([0, 1])
    with torch.no_grad():
        final, taps = encoder.run_backbone(tiles, encoder.pre_tile_embed(tile_ids, tile_index))
        final = final + encoder.post_tile_embed(tile_ids, tile_index)[:, None]
        expect = encoder.gated_layers(final.reshape(1, -1, 32)).reshape(2, -1, 32)
    got_final, got_taps = TimmTiledEncoder.split_features(out[1, 0, :2], len(encoder.taps))
    torch.testing.assert_close(got_final, expect, rtol=1e-5, atol=1e-5)
    for got, tap in zip(got_taps, taps):
        torch.testing.assert_close(got, tap, rtol=1e-5, atol=1e-5)


def test_samples_are_independent_of_the_batch() -> None:
    encoder = TimmTiledEncoder(tiny_config()).eval()
    open_gates(encoder)
    pixels, ids, mask = batch()
    with torch.no_grad():
        together = encoder(pixels, ids, mask)
        for b in range(2):
            alone = encoder(pixels[b : b + 1], ids[b : b + 1], mask[b : b + 1])
            torch.testing.assert_close(alone[0], together[b], rtol=1e-5, atol=1e-5)
        other = pixels.clone()
        other[1] = torch.randn_like(other[1])
        torch.testing.assert_close(encoder(other, ids, mask)[0], together[0], rtol=1e-5, atol=1e-5)


def test_all_padding_batch_gives_zeros() -> None:
    encoder = TimmTiledEncoder(tiny_config())
    pixels = torch.randn(1, 2, 4, 3, TILE, TILE)
    out = encoder(pixels, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 4, dtype=torch.bool))
    assert out.shape == (1, 2, 4, 5, encoder.out_dim) and torch.count_nonzero(out) == 0


# --------------------------------------------------------------------------------------------------
# 4. the paper's ViT-H/14 configuration, sized on the meta device


def test_paper_vit_h14_sizes_on_meta_device() -> None:
    with torch.device("meta"):
        encoder = TimmTiledEncoder(TimmEncoderConfig())  # vit_huge_patch14_clip_336, paper taps, 8 gated
    assert encoder.taps == PAPER_TAPS == (3, 7, 15, 23, 30)
    assert (encoder.tile_size, encoder.max_tiles) == (336, 4)
    assert encoder.width == 1280
    assert encoder.tokens_per_tile == 577  # (336 / 14)² + CLS
    assert encoder.out_dim == 7680  # 1280 × (5 taps + final)
    assert all(p.is_meta for p in encoder.parameters())

    backbone = sum(p.numel() for p in encoder.backbone.parameters())
    gated = sum(p.numel() for p in encoder.gated_layers.parameters())
    tile_embeds = sum(p.numel() for p in encoder.pre_tile_embed.parameters()) + sum(
        p.numel() for p in encoder.post_tile_embed.parameters()
    )
    w, f = 1280, 5120  # width, MLP width (copied from the ViT-H blocks)
    # two LayerNorms, qkv, proj, fc1, fc2, two gates
    per_layer = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * f + f) + (f * w + w) + 2
    assert per_layer == 19_677_442
    assert gated == 8 * per_layer == 157_419_536
    assert tile_embeds == 2 * (9 * 4 * w + 1)  # [9 aspect-ratio ids, 4 tiles, width] + gate, pre and post
    assert backbone == 631_175_680  # the paper's "630M" ViT-H/14
    assert 625e6 < backbone < 635e6
    assert len(encoder.backbone.blocks) + len(encoder.gated_layers.layers) == 40  # the paper's 40 blocks
