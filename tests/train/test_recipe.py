"""Recipes: strict keys and types, overrides, inheritance, config.yaml round trip."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mm_llama.train.recipe import (
    RecipeConfig, RecipeError, load_recipe, parse_override, recipe_from_dict, save_config,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_load_from_an_empty_recipe(tmp_path: Path) -> None:
    cfg = load_recipe(_write(tmp_path / "r.yaml", ""))
    assert cfg == RecipeConfig()
    assert cfg.total_steps == cfg.train.steps


def test_unknown_keys_are_all_named_with_dotted_paths_and_valid_keys(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", """
model:
  encoder_typ: mllama
optim:
  betaz: [0.9, 0.99]
  lr: {encoder: 1.0e-4, fuson: 1.0e-3}
nonsense: 1
""")
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, ["train.stepz=3", "data.options.anything=1"])
    msg = str(err.value)
    for name in ("model.encoder_typ", "optim.betaz", "nonsense", "train.stepz"):
        assert name in msg
    assert "train.stepz (from an override)" in msg
    assert "valid keys of model: kind, base_lm" in msg and "fusion_gate_init" in msg
    assert "valid keys of train: steps" in msg
    assert "valid top-level keys: name" in msg
    assert "data.options" not in msg  # free-form section
    # group names are the model's, checked when the optimizer is built (tests/train/test_optim.py)


def test_the_old_trainable_flags_point_to_model_train(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"model\.train_encoder: .* \(replaced by model\.train, a list of the model's "
                                          r"groups such as \[image\.encoder, image\.fusion\]\)"):
        load_recipe(_write(tmp_path / "old.yaml", "model:\n  train_encoder: true\n"))
    with pytest.raises(RecipeError, match=r"model\.train is empty: nothing would train"):
        load_recipe(_write(tmp_path / "none.yaml", "model:\n  train: []\n"))


def test_dotted_group_overrides_give_the_models_group_names(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", "optim:\n  lr_multipliers: {image.encoder: 0.1}\n")
    cfg = load_recipe(recipe, ["optim.lr_multipliers.image.fusion=2", "optim.lr.image.encoder=1e-4",
                               "optim.lr.image.fusion=1e-3"])
    assert cfg.optim.lr_multipliers == {"image.encoder": 0.1, "image.fusion": 2}
    assert cfg.optim.lr == {"image.encoder": 1e-4, "image.fusion": 1e-3}


def test_type_errors_name_key_value_and_expected_type(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", "train:\n  steps: many\ndata:\n  shuffle: 1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, ["optim.lr=fast", "schedule.kind=linear", "data.batch_size=2.5"])
    msg = str(err.value)
    assert "train.steps: expected an integer, got 'many' (str)" in msg
    assert "data.shuffle: expected true/false, got 1 (int)" in msg
    assert "optim.lr: expected a number or a mapping of names to a number, got 'fast'" in msg
    assert "schedule.kind: expected one of 'cosine', 'constant', got 'linear'" in msg
    assert "data.batch_size: expected an integer, got 2.5" in msg


def test_value_range_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"data\.batch_size must be > 0, got 0"):
        load_recipe(_write(tmp_path / "r.yaml", "data: {batch_size: 0}\n"))
    with pytest.raises(RecipeError, match=r"warmup_steps \(50\) exceeds the schedule's 10 steps"):
        load_recipe(_write(tmp_path / "s.yaml", "schedule: {warmup_steps: 50}\ntrain: {steps: 10}\n"))
    with pytest.raises(RecipeError, match=r"weight_decay_groups entry '' is empty"):
        load_recipe(_write(tmp_path / "w.yaml", "optim: {weight_decay_groups: ['']}\n"))


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("optim.lr=3e-4", ["optim", "lr"], 3e-4),
        ("optim.lr.fusion=1E-3", ["optim", "lr", "fusion"], 1e-3),
        ("optim.eps=1.0e-08", ["optim", "eps"], 1e-8),
        ("train.steps=10", ["train", "steps"], 10),
        ("train.compile=true", ["train", "compile"], True),
        ("logging.tensorboard=False", ["logging", "tensorboard"], False),
        ("data.shards=[a.tar, b.tar]", ["data", "shards"], ["a.tar", "b.tar"]),
        ("data.task=vqa", ["data", "task"], "vqa"),
        ("model.base_lm=null", ["model", "base_lm"], None),
        ("data.shards=[x/{000..009}.tar]", ["data", "shards"], ["x/{000..009}.tar"]),
        ("data.shards=[x/{000..009}.tar, y/{a,b}.tar]", ["data", "shards"], ["x/{000..009}.tar", "y/{a,b}.tar"]),
        ("data.prompt=a {x} b", ["data", "prompt"], "a {x} b"),
        ("model.base_lm= /a b/c", ["model", "base_lm"], "/a b/c"),
    ],
)
def test_override_values_parse_as_yaml_scalars(text: str, key: list[str], value: object) -> None:
    assert parse_override(text) == (key, value)


def test_overrides_apply_and_convert(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", "optim:\n  lr: {encoder: 1e-4, fusion: 1e-3}\n  betas: [0.9, 0.95]\n")
    cfg = load_recipe(recipe, ["optim.lr.fusion=3e-4", "train.steps=10", "data.shards=one.tar",
                               "model.fusion_layers=[1]", "optim.grad_clip=null", "optim.weight_decay=1"])
    assert cfg.optim.lr == {"encoder": 1e-4, "fusion": 3e-4}
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.steps == 10
    assert cfg.data.shards == ["one.tar"]  # a single string is a one-element list
    assert cfg.model.fusion_layers == [1]
    assert cfg.optim.grad_clip is None
    assert cfg.optim.weight_decay == 1.0 and isinstance(cfg.optim.weight_decay, float)


def test_malformed_overrides(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", "optim:\n  lr: 0.001\n")
    with pytest.raises(RecipeError, match="not of the form key.sub=value"):
        load_recipe(recipe, ["train.steps"])
    with pytest.raises(RecipeError, match=r"cannot set optim\.lr\.fusion: optim\.lr is 0\.001, not a mapping"):
        load_recipe(recipe, ["optim.lr.fusion=1e-3"])
    with pytest.raises(RecipeError, match="inherit"):
        load_recipe(recipe, ["inherit=other.yaml"])


def test_a_key_given_twice_is_refused_as_an_unquoted_brace_pattern_gives_it(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", "optim:\n  lr: 0.001\n")
    # what the shell really passes for the unquoted pattern: one override per expansion, the last would win
    split = subprocess.run(["bash", "-c", 'printf "%s\\n" data.shards=[s/{000000..000002}.tar]'],
                           capture_output=True, text=True, check=True).stdout.split()
    assert split == [f"data.shards=[s/00000{i}.tar]" for i in range(3)]
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, split)
    message = str(e.value)
    assert "data.shards is set 3 times" in message and "'data.shards=[s/000000.tar]'" in message
    assert "quote the whole override" in message
    with pytest.raises(RecipeError, match=r"optim\.lr is set 2 times"):
        load_recipe(recipe, ["optim.lr=1e-3", "train.steps=5", "optim.lr=2e-3"])
    # quoted, the pattern stays one value; a more specific key after a mapping refines it
    cfg = load_recipe(recipe, ["data.shards=[s/{000000..000002}.tar]", "optim.lr_multipliers={encoder: 0.5}",
                               "optim.lr_multipliers.encoder=0.25"])
    assert cfg.data.shards == ["s/{000000..000002}.tar"]
    assert cfg.optim.lr_multipliers == {"encoder": 0.25}


def test_inherit_merges_bases_first(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    _write(tmp_path / "base" / "common.yaml", """
optim: {lr: {encoder: 1e-4, fusion: 1e-3}, weight_decay: 0.01}
train: {steps: 100, precision: bf16}
data: {shards: [base.tar], batch_size: 16}
""")
    _write(tmp_path / "base" / "small.yaml", "inherit: common.yaml\ndata: {batch_size: 2}\n")
    child = _write(tmp_path / "child.yaml", """
inherit: base/small.yaml
name: child
optim: {lr: {fusion: 5e-4}}
data: {shards: [child.tar]}
""")
    cfg = load_recipe(child, ["train.steps=7"])
    assert cfg.name == "child"
    assert cfg.optim.lr == {"encoder": 1e-4, "fusion": 5e-4}  # mappings merge key by key
    assert cfg.optim.weight_decay == 0.01
    assert cfg.data.shards == ["child.tar"]  # lists replace
    assert cfg.data.batch_size == 2
    assert cfg.train.precision == "bf16" and cfg.train.steps == 7

    _write(tmp_path / "a.yaml", "inherit: b.yaml\n")
    _write(tmp_path / "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(RecipeError, match="inheritance loops"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="missing.yaml does not exist"):
        load_recipe(_write(tmp_path / "c.yaml", "inherit: missing.yaml\n"))


def test_config_yaml_round_trips(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", """
name: rt
model: {vision: {tile_size: 28, taps: [1]}, fusion_layers: [0, 1]}
optim: {lr: {encoder: 1e-4, fusion: 1e-3}, lr_multipliers: {encoder: 0.5}, eps: 1e-8}
data: {shards: [a.tar], options: {prompt: "Describe: {x}"}}
schedule: {warmup_steps: 5, total_steps: 50, min_lr_ratio: 0.1}
""")
    cfg = load_recipe(recipe, ["train.steps=40", "optim.grad_clip=null"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    again = load_recipe(path)
    assert again == cfg
    assert recipe_from_dict({"train": None}).train.steps == RecipeConfig().train.steps  # empty section


def test_missing_recipe_names_builtins(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="neither a file nor a built-in recipe"):
        load_recipe(tmp_path / "nope.yaml")
