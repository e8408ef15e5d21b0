"""Adapters of different modalities, trained in separate runs, load onto one frozen LM as a plain union
(`model.init_from: [run_a, run_b]`); a key two runs hold is an error; adapter files from before
modalities were named still load."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from mm_llama.checkpoints.loading import load_llama
from mm_llama.checkpoints.multimodal_loading import (
    ADAPTER_FILE, adapter_state_dict, export_groups, load_multimodal, read_adapter_run_config, vision_config_from_dict,
)
from mm_llama.data.image_transform import ImageTransform, collate_images
from mm_llama.media_tokens import MediaTokens
from mm_llama.modalities import ImageModality
from mm_llama.multimodal import MultimodalLlama
from mm_llama.train.build import load_adapter_weights
from mm_llama.train.recipe import RecipeError, load_recipe
from mm_llama.train.trainer import run_training
from tests.mm_llama.modalities.stand_ins import SketchModality
from tests.train.test_trainer_setup import Assets, assets, mm_overrides  # noqa: F401


def _images(seed: int):
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    return collate_images([[ImageTransform(tile_size=32, max_tiles=1)(Image.fromarray(pixels))]], max_tiles=1)


def _image_modality(lm_cfg, run: Path) -> ImageModality:
    cfg = read_adapter_run_config(run)
    return ImageModality(lm_cfg, vision_config_from_dict(cfg["encoder"], cfg["vision"]), encoder=cfg["encoder"],
                         fusion_layers=tuple(cfg["fusion_layers"]))


@pytest.fixture(scope="module")
def runs(assets: Assets, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """Run A: a 2-step image adapter run (`mm-llama train`); run B: a stand-in second modality trained on
    its own for 2 steps and exported the way a run exports; the model B was."""
    run_a = tmp_path_factory.mktemp("image-run")
    run_training(load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=2)), run_a)
    lm = load_llama(assets.base_lm)
    torch.manual_seed(1)
    sketch = SketchModality(lm.cfg, _image_modality(lm.cfg, run_a).vision_cfg, fusion_layers=(1,), encoder="timm")
    model_b = MultimodalLlama(lm, [sketch])
    model_b.set_trainable(["sketch.encoder", "sketch.fusion"])
    optimizer = torch.optim.AdamW([p for p in model_b.parameters() if p.requires_grad], lr=1e-2)
    sketch_id = MediaTokens(lm.cfg.vocab_size).video
    tokens = torch.tensor([[1, sketch_id, 5, 9, 7, 3]])
    for step in range(2):
        logits = model_b(tokens, media={"sketch": _images(step)})
        loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:].clamp(max=lm.cfg.vocab_size - 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run_b = tmp_path_factory.mktemp("sketch-run")
    save_file(adapter_state_dict(model_b, export_groups(model_b)), str(run_b / ADAPTER_FILE))
    return run_a, run_b, model_b.eval(), tokens


def test_two_runs_load_as_a_union_and_each_answers_as_alone(runs, assets: Assets) -> None:  # noqa: F811
    run_a, run_b, model_b, sketch_tokens = runs
    exported = load_file(str(run_b / ADAPTER_FILE))
    assert exported and all(k.startswith(("sketch.", "decoder.layers.1.fusion.sketch.",
                                          "decoder.tok_embeddings.media.sketch")) for k in exported)
    lm = load_llama(assets.base_lm)
    torch.manual_seed(7)  # fresh weights everywhere, so only what init_from loads can make outputs agree
    both = MultimodalLlama(lm, [SketchModality(lm.cfg, model_b.sketch.vision_cfg, fusion_layers=(1,), encoder="timm"),
                                _image_modality(lm.cfg, run_a)]).eval()
    files = load_adapter_weights(both, [run_a, run_b])
    assert files == [run_a / ADAPTER_FILE, run_b / ADAPTER_FILE]

    image_alone = load_multimodal(run_a)
    image_tokens = torch.tensor([[1, MediaTokens(lm.cfg.vocab_size).image, 5, 9, 7, 3]])
    with torch.no_grad():
        assert torch.equal(both(image_tokens, images=_images(5)), image_alone(image_tokens, images=_images(5)))
        assert torch.equal(both(sketch_tokens, media={"sketch": _images(6)}),
                           model_b(sketch_tokens, media={"sketch": _images(6)}))


def test_a_key_two_runs_hold_is_an_error_naming_it(runs, assets: Assets) -> None:  # noqa: F811
    run_a, _, _, _ = runs
    lm = load_llama(assets.base_lm)
    model = MultimodalLlama(lm, [_image_modality(lm.cfg, run_a)])
    with pytest.raises(RecipeError, match=r"model\.init_from: .*adapter\.safetensors and .*adapter\.safetensors both "
                                          r"hold (image|decoder)\."):
        load_adapter_weights(model, [run_a, run_a])


def test_a_recipe_takes_a_list_of_runs(runs, assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    run_a, _, _, _ = runs
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=1, model__init_from=[str(run_a)],
                                                           optim__lr=1e-12))
    stage = run_training(cfg, tmp_path)
    before = load_file(str(run_a / ADAPTER_FILE))
    after = load_file(str(tmp_path / ADAPTER_FILE))
    assert set(after) == set(before)
    assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in before.items())
    assert stage.steps == 1


def test_adapter_files_from_before_named_modalities_still_load(runs, tmp_path: Path) -> None:
    run_a, _, _, _ = runs
    legacy = {}
    for key, tensor in load_file(str(run_a / ADAPTER_FILE)).items():
        if key.startswith("image."):
            key = key[len("image."):]
        elif key == "decoder.tok_embeddings.media.image.weight":
            rows = torch.cat([tensor, torch.randn(7, tensor.shape[1])])  # the 7 reserved rows of the old table
            key, tensor = "decoder.tok_embeddings.fusion_embedding.weight", rows
        else:
            key = key.replace(".fusion.image.", ".fusion.")
        legacy[key] = tensor
    assert "encoder.backbone.pos_embed" in legacy and "projector.weight" in legacy
    old_run = tmp_path / "old-run"
    old_run.mkdir()
    shutil.copy(run_a / "config.yaml", old_run / "config.yaml")
    save_file(legacy, str(old_run / ADAPTER_FILE))
    tokens = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        images = _images(3)
        image_tokens = torch.tensor([[1, load_multimodal(run_a).image.token_id, 5, 9]])
        assert torch.equal(load_multimodal(old_run)(image_tokens, images=images),
                           load_multimodal(run_a)(image_tokens, images=images))
        assert torch.equal(load_multimodal(old_run)(tokens), load_multimodal(run_a)(tokens))
