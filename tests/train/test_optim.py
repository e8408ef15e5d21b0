"""Optimizer: exactly the trainable parameters, frozen ones refused, per-group lrs, decay rules, schedule."""

from __future__ import annotations

import math

import pytest
import torch

from mm_llama import LlamaDecoder, preset
from mm_llama.train.optim import (
    OptimizerParamsError, build_optimizer, build_scheduler, check_optimizer_params, current_lrs, param_kinds,
    parameter_groups,
)
from mm_llama.train.recipe import OptimConfig, RecipeError, ScheduleConfig
from tests.train.helpers import tiny_model


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_optimizer_holds_exactly_the_trainable_parameters() -> None:
    model = tiny_model()
    groups = parameter_groups(model)
    opt = build_optimizer(model, OptimConfig(lr={"image.encoder": 1e-4, "image.fusion": 1e-3}))
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(_ids(held))
    assert _ids(held) == _ids(groups["image.encoder"].values()) | _ids(groups["image.fusion"].values())
    assert _ids(held) == _ids(p for p in model.parameters() if p.requires_grad)
    assert not _ids(held) & _ids(groups["decoder"].values())
    assert {g["name"] for g in opt.param_groups} == {"image.encoder.decay", "image.encoder.no_decay",
                                                     "image.fusion.decay", "image.fusion.no_decay"}
    assert isinstance(opt, torch.optim.AdamW)


def test_a_frozen_parameter_can_never_get_in() -> None:
    model = tiny_model()
    frozen = model.decoder.layers[0].attention.wq.weight
    assert not frozen.requires_grad
    opt = build_optimizer(model, OptimConfig())
    with pytest.raises(OptimizerParamsError, match="frozen parameter"):
        opt.add_param_group({"params": [frozen], "name": "sneaky"})
    assert all(frozen is not p for g in opt.param_groups for p in g["params"])

    # an optimizer assembled by hand around the guard is caught by the check (run at build and resume)
    hand_made = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + [frozen])
    with pytest.raises(OptimizerParamsError, match=r"frozen parameter\(s\) decoder\.layers\.0\.attention\.wq\.weight"):
        check_optimizer_params(hand_made, model)

    # the trainable set changed after the optimizer was built (e.g. a resume under other flags)
    model.set_trainable(["image.fusion"])
    with pytest.raises(OptimizerParamsError, match=r"frozen parameter\(s\) image\.encoder\."):
        check_optimizer_params(opt, model)
    model.set_trainable(["image.encoder", "image.fusion", "decoder"])
    with pytest.raises(OptimizerParamsError, match="missing from the optimizer"):
        check_optimizer_params(opt, model)

    model.set_trainable([])
    with pytest.raises(OptimizerParamsError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig())


def test_per_group_learning_rates() -> None:
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr={"image.encoder": 1e-4, "image.fusion": 1e-3},
                                             lr_multipliers={"image.fusion": 2.0}))
    assert current_lrs(opt) == pytest.approx({"image.encoder": 1e-4, "image.fusion": 2e-3})
    opt = build_optimizer(model, OptimConfig(lr=1e-3, lr_multipliers={"image.encoder": 0.1}))
    assert current_lrs(opt) == pytest.approx({"image.encoder": 1e-4, "image.fusion": 1e-3})
    with pytest.raises(ValueError, match=r"add optim\.lr\.image\.encoder"):
        build_optimizer(model, OptimConfig(lr={"image.fusion": 1e-3}))


def test_group_names_in_the_recipe_must_be_the_models() -> None:
    model = tiny_model()
    groups = r"its groups are \['image\.encoder', 'image\.fusion', 'decoder'\]"
    with pytest.raises(RecipeError, match=r"optim\.lr\.fuson: not a parameter group of this model; " + groups):
        build_optimizer(model, OptimConfig(lr={"image.encoder": 1e-4, "fuson": 1e-3}))
    with pytest.raises(RecipeError, match=r"optim\.lr_multipliers\.encoder: not a parameter group"):
        build_optimizer(model, OptimConfig(lr_multipliers={"encoder": 0.1}))
    with pytest.raises(RecipeError, match=r"optim\.weight_decay_groups entry 'weights', optim\.weight_decay_groups "
                                          r"entry 'fusion\.gate': not a parameter group"):
        build_optimizer(model, OptimConfig(weight_decay_groups=["weights", "fusion.gate", "image.fusion.norm"]))


def test_weight_decay_rules() -> None:
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    kinds = {names[i]: k for i, k in param_kinds(model).items()}
    assert kinds["image.encoder.transformer.layers.0.self_attn.q_proj.weight"] == "weight"
    assert kinds["image.encoder.patch_embedding.weight"] == "weight"  # a convolution kernel
    assert kinds["image.encoder.transformer.layers.0.mlp.fc1.bias"] == "bias"
    assert kinds["image.encoder.layernorm_pre.weight"] == "norm"
    assert kinds["image.encoder.layernorm_pre.bias"] == "norm"
    assert kinds["image.encoder.global_transformer.layers.0.gate_attn"] == "gate"
    assert kinds["image.encoder.gated_positional_embedding.gate"] == "gate"
    assert kinds["image.encoder.class_embedding"] == "embedding"
    assert kinds["image.encoder.gated_positional_embedding.embedding"] == "embedding"
    assert kinds["decoder.tok_embeddings.media.image.weight"] == "embedding"
    assert kinds["decoder.layers.1.fusion.image.gate_attn"] == "gate"
    assert kinds["decoder.layers.1.fusion.image.attention.q_norm.weight"] == "norm"
    assert kinds["image.projector.bias"] == "bias"

    def decayed(opt: torch.optim.Optimizer) -> dict[str, float]:
        return {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}

    wd = decayed(build_optimizer(model, OptimConfig(weight_decay=0.01)))
    for name, kind in kinds.items():
        if name in wd:
            assert wd[name] == (0.01 if kind == "weight" else 0.0), name

    wd = decayed(build_optimizer(model, OptimConfig(weight_decay=0.1, weight_decay_groups=["weight", "image.fusion.gate"])))
    assert wd["decoder.layers.1.fusion.image.gate_attn"] == 0.1
    assert wd["image.encoder.global_transformer.layers.0.gate_attn"] == 0.0
    wd = decayed(build_optimizer(model, OptimConfig(weight_decay=0.1, weight_decay_groups=["image.encoder"])))
    assert wd["image.encoder.layernorm_pre.weight"] == 0.1 and wd["image.projector.weight"] == 0.0


def test_a_plain_decoder_is_one_group() -> None:
    lm = LlamaDecoder(preset("tiny"))
    groups = parameter_groups(lm)
    assert list(groups) == ["decoder"] and len(groups["decoder"]) == len(list(lm.parameters()))
    opt = build_optimizer(lm, OptimConfig(lr=3e-4, weight_decay=0.1))
    assert current_lrs(opt) == {"decoder": 3e-4}
    names = {id(p): n for n, p in lm.named_parameters()}
    wd = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd["layers.0.attention.wq.weight"] == 0.1 and wd["output.weight"] == 0.1
    assert wd["tok_embeddings.weight"] == 0.0 and wd["norm.weight"] == 0.0


def test_scheduler_warmup_then_cosine_keeps_group_lrs() -> None:
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr={"image.encoder": 1e-4, "image.fusion": 1e-3}))
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=10, total_steps=110, min_lr_ratio=0.1))
    seen: dict[int, dict[str, float]] = {0: current_lrs(opt)}
    for step in range(1, 201):
        opt.step()
        sched.step()
        seen[step] = current_lrs(opt)
    expected = {
        0: 0.1,   # (0 + 1) / 10: the first step already moves
        4: 0.5,
        9: 1.0,   # warm-up ends
        10: 1.0,  # cosine starts at the peak
        60: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)),  # midway: 0.55
        85: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)),
        110: 0.1,  # the end
        200: 0.1,  # and after
    }
    for step, factor in expected.items():
        assert seen[step] == pytest.approx({"image.encoder": 1e-4 * factor, "image.fusion": 1e-3 * factor}, rel=1e-12), step


def test_constant_schedule_and_no_warmup() -> None:
    opt = build_optimizer(tiny_model(), OptimConfig(lr=2e-3))
    sched = build_scheduler(opt, ScheduleConfig(kind="constant", warmup_steps=0), total_steps=5)
    for _ in range(7):
        assert current_lrs(opt) == pytest.approx({"image.encoder": 2e-3, "image.fusion": 2e-3})
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="positive total_steps"):
        build_scheduler(opt, ScheduleConfig())


def test_cpu_optimizer_is_fused_and_steps_like_the_reference_adamw() -> None:
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr={"image.encoder": 1e-4, "image.fusion": 1e-3}, weight_decay=0.1))
    assert all(g["fused"] for g in opt.param_groups)
    reference = torch.optim.AdamW(
        [{k: v if k != "params" else [p.detach().clone() for p in v] for k, v in g.items() if k != "fused"}
         for g in opt.param_groups], foreach=False)
    for step in range(3):
        torch.manual_seed(step)
        for g, ref_g in zip(opt.param_groups, reference.param_groups):
            for p, ref in zip(g["params"], ref_g["params"]):
                p.grad = torch.randn_like(p)
                ref.grad = p.grad.clone()
        opt.step()
        reference.step()
    for g, ref_g in zip(opt.param_groups, reference.param_groups):
        for p, ref in zip(g["params"], ref_g["params"]):
            torch.testing.assert_close(p.detach(), ref, atol=1e-6, rtol=1e-6)
