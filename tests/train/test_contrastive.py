"""Contrastive image-encoder pretraining against the frozen LM: loss goes down, the LM stays frozen, and
the exported backbone loads as `TimmEncoderConfig(weights=…)` / `model.encoder_checkpoint`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mm_llama.checkpoints.loading import load_llama
from mm_llama.data.collate import TextBatch
from mm_llama.encoders.timm_vit import TimmEncoderConfig, TimmTiledEncoder
from mm_llama.encoders.contrastive import ContrastiveSettings
from mm_llama.train.contrastive import caption_tokens
from mm_llama.train.recipe import RecipeError, load_recipe
from mm_llama.train.trainer import run_training
from tests.train.test_trainer_setup import VISION, Assets, assets, mm_overrides  # noqa: F401


def _overrides(a: Assets, steps: int, **more: object) -> list[str]:
    values: dict[str, object] = {"model__vision": {k: v for k, v in VISION.items() if k != "n_gated_layers"},
                                 "data__task": "contrastive", "data__batch_size": 8, "optim__lr": 3e-3, **more}
    return [o for o in mm_overrides(a, steps=steps, **values)
            if not o.startswith("model.fusion_layers")] + ["model.contrastive={pool: cls, embed_dim: 16}"]


@pytest.fixture(scope="module")
def run(assets: Assets, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    cfg = load_recipe("tiny_image_encoder_pretrain", _overrides(assets, steps=16, checkpoint__every=16))
    return run_training(cfg, tmp_path_factory.mktemp("contrastive")), cfg


def test_caption_tokens_are_bos_plus_the_labelled_caption_without_eot() -> None:
    ids = torch.tensor([[1, 7, 8, 20, 21, 22, 9, 0], [1, 7, 8, 30, 9, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 20, 21, 22, 9, -100], [-100, -100, -100, 30, 9, -100, -100, -100]])
    captions, mask = caption_tokens(TextBatch(ids, labels, ids != 0), pad_id=0)
    assert captions.tolist() == [[1, 20, 21, 22], [1, 30, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_contrastive_loss_decreases_and_the_lm_stays_frozen(run, assets: Assets) -> None:  # noqa: F811
    result, _ = run
    history = result.history
    assert sum(history[-4:]) / 4 < sum(history[:4]) / 4 - 0.1, history
    base = load_llama(assets.base_lm).state_dict()
    assert all(torch.equal(v, base[k]) for k, v in result.model.lm.state_dict().items())
    groups = result.model.parameter_groups()
    assert list(groups) == ["image.encoder", "contrastive", "decoder"]
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == set(groups["image.encoder"]) | set(groups["contrastive"])
    assert "logit_scale" in groups["contrastive"]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "temperature"} <= set(records[-1])


def test_exported_backbone_loads_as_timm_encoder_weights(run) -> None:
    result, _ = run
    weights = result.run_dir / "encoder.safetensors"
    assert result.export == weights and weights.is_file()
    encoder = TimmTiledEncoder(TimmEncoderConfig(**{**VISION, "weights": str(weights)}))
    trained = result.model.encoder.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in encoder.backbone.state_dict().items())


def test_image_stage_starts_from_the_contrastive_run(run, assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    result, _ = run
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=1, model__encoder_checkpoint=str(result.run_dir),
                                                           optim__lr=1e-12))
    stage = run_training(cfg, tmp_path)
    trained = result.model.encoder.state_dict()
    loaded = stage.model.image.encoder.backbone.state_dict()
    assert all(torch.allclose(loaded[k], v, atol=1e-8) for k, v in trained.items())


def test_settings_are_validated(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="model.contrastive.temperature"):
        ContrastiveSettings.from_dict({"temperature": 0.1})
    with pytest.raises(ValueError, match="pool"):
        ContrastiveSettings(pool="attention")
    bad = load_recipe("tiny_image_encoder_pretrain", _overrides(assets, steps=1) + ["model.contrastive.pool=sum"])
    with pytest.raises(RecipeError, match=r"model.contrastive.pool must be one of \['cls', 'mean', 'max'\], got 'sum'"):
        run_training(bad, tmp_path / "bad")
    cfg = load_recipe("tiny_image_encoder_pretrain", _overrides(assets, steps=1, model__encoder="mllama",
                                                                model__vision={}))
    with pytest.raises(RecipeError, match="model.encoder=timm"):
        run_training(cfg, tmp_path)


def test_text_features_are_standardised_so_a_shared_component_cannot_collapse_them(run) -> None:
    """A large offset shared by every caption's pooled LM state (what a tiny LM's features carry) must not
    change the text embeddings: the per-feature batch standardisation removes it before the projection."""
    result, _ = run
    model = result.model
    dim = model.lm.cfg.dim
    torch.manual_seed(0)
    pooled = torch.randn(6, dim)
    shared = 50.0 * torch.randn(dim)
    project = lambda x: torch.nn.functional.normalize(model.text_proj(model.text_norm(x)), dim=-1)  # noqa: E731
    with torch.no_grad():
        plain, offset = project(pooled), project(pooled + shared)
        raw_offset = torch.nn.functional.normalize(model.text_proj(pooled + shared), dim=-1)
    torch.testing.assert_close(offset, plain, atol=1e-4, rtol=1e-4)
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert (raw_offset @ raw_offset.T)[off_diagonal].mean() > 0.9  # without it: nearly one direction
    assert (plain @ plain.T)[off_diagonal].abs().mean() < 0.5
    assert not list(model.text_norm.buffers())  # batch statistics only: nothing outside the checkpoint


@pytest.mark.parametrize("pool", ["cls", "mean", "max"])
def test_image_embedding_pools_the_backbone_tokens_as_named(run, pool: str) -> None:
    """`pool` picks the class token, the mean or the per-feature max of the patch tokens, before the
    projection: recomputed here from the backbone's own tokens."""
    result, cfg = run
    model = result.model.eval()
    tile = cfg.model.vision["tile_size"]
    torch.manual_seed(0)
    pixels = torch.randn(3, 1, 1, 3, tile, tile)
    images = SimpleNamespace(pixels=pixels, tile_mask=torch.ones(3, 1, 1, dtype=torch.bool))
    saved = model.settings
    try:
        model.settings = dataclasses.replace(saved, pool=pool)
        with torch.no_grad():
            feats = model.encoder.forward_features(pixels[:, 0, 0])  # [B, 1 + P, W]
            patches = feats[:, model.num_prefix_tokens:]
            pooled = {"cls": feats[:, 0], "mean": patches.mean(dim=1), "max": patches.max(dim=1).values}[pool]
            expected = torch.nn.functional.normalize(model.image_proj(pooled), dim=-1)
            torch.testing.assert_close(model.encode_images(images), expected)
    finally:
        model.settings = saved
