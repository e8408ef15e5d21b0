"""The built-in recipes: all load and validate, carry the paper's settings, and the tiny ones chain."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mm_llama.train.stages import stage_kind
from mm_llama.train.recipe import RECIPES_DIR, load_recipe

ROOT = Path(__file__).resolve().parents[2]
PAPER = ["lm_pretrain", "image_encoder_pretrain", "vision_pretrain", "vision_anneal", "vision_sft"]
TINY = ["tiny_lm_pretrain", "tiny_image_encoder_pretrain", "tiny_vision_pretrain"]
SPEECH = ["speech_sft", "tiny_speech_sft"]


def test_every_recipe_is_there_and_validates() -> None:
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert set(PAPER + TINY + SPEECH) <= set(names)
    for name in names:
        cfg = load_recipe(name)
        assert cfg.name == name and cfg.description
        stage_kind(cfg)  # model.kind and data.task agree


def test_recipes_ship_with_the_package() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "recipes/*.yaml" in setuptools["package-data"]["mm_llama.train"]


def test_vision_pretrain_has_the_papers_settings() -> None:
    cfg = load_recipe("vision_pretrain")
    m = cfg.model
    assert (m.kind, m.train) == ("multimodal", ["image.encoder", "image.fusion"])
    assert m.vision["tile_size"] == 336 and m.vision["max_tiles"] <= 4 and cfg.data.max_tiles <= 4
    assert m.vision["taps"] == [3, 7, 15, 23, 30] and m.vision["n_gated_layers"] == 8
    assert cfg.optim.lr == 1e-3 and cfg.schedule.kind == "cosine" and cfg.optim.weight_decay == 0.01
    assert cfg.data.batch_size == 8  # the paper's micro-batch for image-text pairs
    assert cfg.data.batch_size * 8 * cfg.optim.accumulation_steps == 16384  # one 8-GPU node
    text = (RECIPES_DIR / "vision_pretrain.yaml").read_text()
    assert "ONE GPU" in text and "16384" in text


def test_anneal_and_sft_continue_from_the_previous_stage() -> None:
    pretrain, anneal, sft = (load_recipe(n) for n in ("vision_pretrain", "vision_anneal", "vision_sft"))
    assert anneal.model.vision["tile_size"] > pretrain.model.vision["tile_size"]
    assert anneal.optim.lr == 2e-5 and anneal.schedule.warmup_steps > 0 and anneal.schedule.kind == "cosine"
    assert anneal.model.init_from and sft.model.init_from
    assert "decoder" not in sft.model.train and sft.data.task == "vqa"
    assert "Instruct" in (RECIPES_DIR / "vision_sft.yaml").read_text()


@pytest.mark.parametrize("name", ["image_encoder_pretrain", "tiny_image_encoder_pretrain"])
def test_encoder_pretraining_is_contrastive_against_the_frozen_lm(name: str) -> None:
    cfg = load_recipe(name)
    assert cfg.data.task == "contrastive" and cfg.model.encoder == "timm" and cfg.model.train == ["image.encoder", "contrastive"]
    assert cfg.model.contrastive["init_temperature"] == 0.07


def test_tiny_recipes_chain() -> None:
    lm, encoder, vision = (load_recipe(n) for n in TINY)
    assert lm.model.kind == "llama" and lm.data.task == "lm"
    backbone = ("model_name", "timm_kwargs", "tile_size")
    assert {k: encoder.model.vision[k] for k in backbone} == {k: vision.model.vision[k] for k in backbone}
    assert encoder.model.vision["max_tiles"] == vision.model.vision["max_tiles"] == vision.data.max_tiles
    assert vision.model.encoder_checkpoint and vision.model.train == ["image.encoder", "image.fusion"]
    for cfg in (lm, encoder, vision):
        assert cfg.train.steps <= 500 and cfg.data.shards


def test_glyph_probe_recipes_share_one_backbone() -> None:
    encoder, probe = load_recipe("tiny_glyph_encoder"), load_recipe("tiny_glyph_probe")
    assert {k: v for k, v in probe.model.vision.items() if k != "n_gated_layers"} == encoder.model.vision
    assert encoder.model.vision["stem_pixel_path"] is False and encoder.model.contrastive["pool"] == "max"
    assert probe.model.encoder_checkpoint == "runs/glyph-encoder" and probe.data.task == "vqa"
    bases = load_recipe("tiny_image_encoder_pretrain"), load_recipe("tiny_vision_pretrain")
    assert (stage_kind(encoder), stage_kind(probe)) == tuple(stage_kind(b) for b in bases)
