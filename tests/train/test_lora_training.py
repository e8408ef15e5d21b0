"""LoRA through the real trainer (issue 17.4): `model.lora` in the tiny recipes, the `lora` group in
`model.train`, the adapter file / LM export that carry it, and loading the run back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mm_llama.adapters.lora import LoraConfig, has_lora, merge_lora
from mm_llama.checkpoints.loading import load_llama
from mm_llama.checkpoints.multimodal_loading import ADAPTER_FILE, load_multimodal, save_adapter
from mm_llama.train.checkpointing import TRAINABLE_FILE, list_checkpoints
from mm_llama.train.recipe import RecipeError, load_recipe
from mm_llama.train.stages import build, resolve_recipe
from mm_llama.train.trainer import run_training
from tests.train.test_trainer import _first_batch
from tests.train.test_trainer_setup import Assets, assets, lm_overrides, mm_overrides  # noqa: F401

LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def lora_run(assets: Assets, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """An image adapter run (2 steps), then a LoRA stage on it (3 steps, only `lora` trains); the second
    run's result, its recipe and its model as built before the first step."""
    root = tmp_path_factory.mktemp("lora")
    first = run_training(load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=2)), root / "adapter")
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=3, model__init_from=str(first.run_dir),
                                                           model__lora=LORA, model__train=["lora"]))
    initial = build(resolve_recipe(cfg)).model  # the same seed and init_from: the weights the run starts from
    return run_training(cfg, root / "lora"), cfg, initial


def _logits(model: torch.nn.Module, batch) -> torch.Tensor:
    text = batch.text
    with torch.no_grad():
        return model.eval()(text.input_ids, images=batch.images, attention_mask=text.attention_mask)


def test_a_lora_stage_changes_only_the_lora_weights(lora_run) -> None:
    result, _, initial = lora_run
    before, after = initial.state_dict(), result.model.state_dict()
    assert set(before) == set(after)
    lora_keys = {k for k in before if ".lora_" in k}
    assert len(lora_keys) == 2 * 2 * 2  # 2 layers × (wq, wv) × (A, B)
    unchanged_elsewhere = [k for k in before if k not in lora_keys and not torch.equal(before[k], after[k])]
    assert not unchanged_elsewhere
    assert all(not torch.equal(before[k], after[k]) for k in lora_keys if ".lora_b." in k)
    assert list(result.model.parameter_groups())[-1] == "lora"
    checkpoint = list_checkpoints(result.run_dir)[-1][1]
    assert set(load_file(str(checkpoint / TRAINABLE_FILE))) == lora_keys  # resume state: the trained group only


def test_a_lora_run_loads_back_with_identical_logits(lora_run, tmp_path: Path) -> None:
    result, cfg, _ = lora_run
    run_dir = result.run_dir
    adapter = load_file(str(run_dir / ADAPTER_FILE))
    assert {k for k in adapter if ".lora_" in k} == {k for k in result.model.state_dict() if ".lora_" in k}
    assert any(k.startswith("image.encoder.") for k in adapter)  # the image adapter it started from, too
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["lora"] == {**LORA, "dropout": 0.0}
    batch = _first_batch(cfg, result)
    expected = _logits(result.model, batch)
    loaded = load_multimodal(run_dir)
    assert has_lora(loaded)
    assert torch.equal(_logits(loaded, batch), expected)
    # save_adapter's own schema records the LoRA settings as well
    save_adapter(result.model, tmp_path / "export", base_lm=cfg.model.base_lm)
    assert yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())["lora"] == {
        "rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wq", "wv"]}
    assert torch.equal(_logits(load_multimodal(tmp_path / "export"), batch), expected)
    merge_lora(loaded)
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=1e-5, atol=1e-5)


def test_a_text_only_lora_fine_tune_exports_merged_plain_weights(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    cfg = load_recipe("tiny_lm_pretrain", lm_overrides(assets, steps=3, model__text=None,
                                                       model__base_lm=str(assets.base_lm), model__lora={"rank": 2}))
    result = run_training(cfg, tmp_path)
    base = load_llama(assets.base_lm).state_dict()
    trained = result.model.state_dict()
    assert not [k for k in base if not torch.equal(base[k], trained[k])]  # the LM itself stayed frozen
    assert list(json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines())[-1].keys() \
        == {"lora"}
    export = load_llama(tmp_path / "model")  # plain HF weights: no LoRA keys could load here
    tokens = torch.tensor([[1, 5, 9, 7, 3, 11]])
    with torch.no_grad():
        expected = result.model.eval()(tokens)
        torch.testing.assert_close(export(tokens), expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(export.layers[0].attention.wq.weight, base["layers.0.attention.wq.weight"])


@pytest.mark.parametrize(("overrides", "named"), [
    (['model.lora={"rank": 0}'], "model.lora.rank must be a whole number >= 1, got 0"),
    (["model.lora.dropout=1.5"], "model.lora.dropout must lie in [0, 1), got 1.5"),
    (['model.lora.rank="four"'], "model.lora.rank: expected an integer, got 'four'"),
    (["model.lora.alpha=-1"], "model.lora.alpha must be a finite number > 0, got -1.0"),
    (["model.lora.targets=[]"], "model.lora.targets must be a non-empty list"),
    (["model.lora.rank=2", 'data.task="contrastive"'], "data.task=contrastive trains the image encoder"),
    (["model.lora.rank=2", 'model.train=["lora"]'], "model.train=[lora] with no model.init_from"),
])
def test_bad_lora_settings_are_recipe_errors_naming_the_value(assets: Assets, overrides: list[str],  # noqa: F811
                                                              named: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny_vision_pretrain", mm_overrides(assets) + overrides)
    assert named in str(err.value)


def test_an_unknown_lora_target_is_a_recipe_error_listing_the_layers(assets: Assets) -> None:  # noqa: F811
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, model__lora={"targets": ["q_proj", "query"]}))
    with pytest.raises(RecipeError) as err:
        build(resolve_recipe(cfg))
    assert "model.lora: LoRA target 'query' matches no linear layer" in str(err.value)
    assert "attention.wq" in str(err.value)


def test_a_llama_lora_stage_trains_the_lora_group(assets: Assets) -> None:  # noqa: F811
    with pytest.raises(RecipeError, match="trains its one group, lora"):
        load_recipe("tiny_lm_pretrain", lm_overrides(assets, model__lora={"rank": 2}, model__train=["decoder"]))
    cfg = load_recipe("tiny_lm_pretrain", lm_overrides(assets, model__lora={"rank": 2}))
    model = build(resolve_recipe(cfg)).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert LoraConfig(rank=2) == LoraConfig.from_fields({"rank": 2})
