"""Issue 11: NaN / infinity anywhere in a recipe is refused when the recipe is validated, naming the key."""

from __future__ import annotations

import pytest

from mm_llama.train.recipe import RecipeError, load_recipe, recipe_from_dict


@pytest.mark.parametrize("override, key, shown", [
    ("optim.lr=.inf", "optim.lr", "inf"),
    ("optim.lr=.nan", "optim.lr", "nan"),
    ("optim.lr={fusion: -.inf}", "optim.lr.fusion", "-inf"),
    ("optim.lr_multipliers={encoder: .inf}", "optim.lr_multipliers.encoder", "inf"),
    ("optim.weight_decay=.inf", "optim.weight_decay", "inf"),
    ("optim.betas=[0.9, .nan]", "optim.betas[1]", "nan"),
    ("optim.eps=.inf", "optim.eps", "inf"),
    ("optim.grad_clip=.inf", "optim.grad_clip", "inf"),
    ("schedule.min_lr_ratio=.nan", "schedule.min_lr_ratio", "nan"),
    ("data.max_skip_fraction=.nan", "data.max_skip_fraction", "nan"),
    ("data.max_batch_seconds=.inf", "data.max_batch_seconds", "inf"),
    ("model.fusion_gate_init=.inf", "model.fusion_gate_init", "inf"),
    ("model.contrastive={init_temperature: .inf}", "model.contrastive.init_temperature", "inf"),
    ("optim.lr=1e39", "optim.lr", "1e+39 (past float32's"),  # finite in Python, infinite as float32
])
def test_non_finite_floats_are_refused_naming_key_and_value(override: str, key: str, shown: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe("tiny_vision_pretrain", [override])
    message = str(caught.value)
    assert f"{key} must be a finite number, got {shown}" in message
    assert message.count(key + " ") == 1, message  # not repeated by the range checks of the same key


def test_finite_values_pass_and_every_bad_key_is_listed() -> None:
    from mm_llama.train.recipe import non_finite_values

    cfg = load_recipe("tiny_vision_pretrain", ["optim.lr=1e-3", "optim.grad_clip=null"])
    assert non_finite_values(cfg) == []
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({"optim": {"lr": float("inf"), "eps": float("nan")}, "train": {"steps": 3}})
    assert "optim.lr must be a finite number, got inf" in str(caught.value)
    assert "optim.eps must be a finite number, got nan" in str(caught.value)
