"""AdamW over exactly the trainable parameters, per-group learning rates, decay rules, LR schedule.

Parameter groups come from the model (`MultimodalLlama.parameter_groups()`: `image.encoder`,
`image.fusion`, …, `decoder`); any other module is one group, `decoder`. Group names in the recipe's
`optim` section must be the model's. Within a group each parameter has a *kind*
(`param_kind`): `weight` (matrices and convolutions), `bias`, `norm` (anything owned by a norm
layer), `gate` (tanh gates) or `embedding` (embedding tables, class/positional embeddings). The
optimizer gets one param group per (trainable group × decay / no decay); weight decay goes only to the
kinds / groups `OptimConfig.weight_decay_groups` names (default: `weight`).

Frozen parameters can never enter the optimizer: `build_optimizer` takes only `requires_grad`
parameters, the returned `TrainableAdamW` refuses any frozen parameter in `add_param_group`, and
`check_optimizer_params` (run at build and on resume) proves the optimizer holds exactly the
model's trainable parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from mm_llama.trainable import split_lora_group
from mm_llama.train.recipe import DECODER_GROUP, PARAM_KINDS, OptimConfig, RecipeError, ScheduleConfig


class OptimizerParamsError(ValueError):
    """The optimizer's parameters are not exactly the model's trainable parameters."""


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def parameter_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """`{group: {name: param}}` with every parameter in exactly one group.

    Uses the model's own `parameter_groups()` when it has one (`MultimodalLlama`); a plain
    `LlamaDecoder` or any other module is the single group `decoder` (plus `lora`, its LoRA factors).
    """
    inner = unwrap(model)
    own = getattr(inner, "parameter_groups", None)
    groups = own() if callable(own) else split_lora_group({DECODER_GROUP: dict(inner.named_parameters())})
    seen: dict[int, str] = {}
    for group, params in groups.items():
        for name, p in params.items():
            if id(p) in seen:
                raise ValueError(f"parameter {name} is in groups {seen[id(p)]!r} and {group!r}; "
                                 "each parameter must belong to exactly one group")
            seen[id(p)] = group
    missing = [n for n, p in inner.named_parameters() if id(p) not in seen]
    if missing:
        raise ValueError(f"{type(inner).__name__}.parameter_groups() leaves out {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}; every parameter needs a group")
    return groups


def _owners(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """id(param) → (module that owns it, its attribute name); the first owner wins for shared ones."""
    owners: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for leaf, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (module, leaf))
    return owners


def param_kind(module: nn.Module, leaf: str, param: torch.Tensor) -> str:
    """The kind of `module.<leaf>` for weight-decay rules (one of `PARAM_KINDS`).

    `embedding`: owned by an `nn.Embedding` or named like an embedding (`class_embedding`);
    `norm`: owned by a normalisation layer (class name contains "norm"); `gate`: a parameter whose
    own name contains "gate" (`gate_attn`, `gate`); `bias`: biases and any other 1-D/scalar parameter;
    `weight`: the rest (matrices, convolution kernels).
    """
    if isinstance(module, nn.Embedding) or "embedding" in leaf.lower():
        return "embedding"
    if "norm" in type(module).__name__.lower():
        return "norm"
    if leaf not in ("weight", "bias") and "gate" in leaf.lower():
        return "gate"
    if leaf == "bias" or leaf.endswith("_bias") or param.ndim < 2:
        return "bias"
    return "weight"


def param_kinds(model: nn.Module) -> dict[int, str]:
    """id(param) → kind for every parameter of `model` (see `param_kind`)."""
    return {pid: param_kind(module, leaf, getattr(module, leaf)) for pid, (module, leaf) in _owners(unwrap(model)).items()}


def decays(group: str, kind: str, decay_groups: Iterable[str]) -> bool:
    """Whether `kind` parameters of `group` get weight decay under `OptimConfig.weight_decay_groups`."""
    entries = set(decay_groups)
    return kind in entries or group in entries or f"{group}.{kind}" in entries


def group_lr(cfg: OptimConfig, group: str) -> float:
    """The learning rate of a trainable group: `cfg.lr` (or its entry for `group`) × its multiplier."""
    if isinstance(cfg.lr, dict):
        if group not in cfg.lr:
            raise ValueError(f"optim.lr gives rates for {sorted(cfg.lr)} but group {group!r} trains; "
                             f"add optim.lr.{group}=… or freeze it")
        base = cfg.lr[group]
    else:
        base = cfg.lr
    return float(base) * float(cfg.lr_multipliers.get(group, 1.0))


def check_group_names(cfg: OptimConfig, groups: list[str]) -> None:
    """Raise RecipeError naming every group in `optim.lr`, `optim.lr_multipliers` and
    `optim.weight_decay_groups` that is not one of the model's `groups`."""
    named = [(f"optim.lr.{g}", g) for g in (cfg.lr if isinstance(cfg.lr, dict) else {})]
    named += [(f"optim.lr_multipliers.{g}", g) for g in cfg.lr_multipliers]
    for entry in cfg.weight_decay_groups:
        group, _, kind = entry.rpartition(".")
        if entry not in PARAM_KINDS and entry not in groups:
            named.append((f"optim.weight_decay_groups entry {entry!r}", group if kind in PARAM_KINDS else entry))
    unknown = [where for where, g in named if g not in groups]
    if unknown:
        raise RecipeError(f"{', '.join(unknown)}: not a parameter group of this model; its groups are {groups} "
                          f"(weight_decay_groups also takes the kinds {list(PARAM_KINDS)} and 'group.kind')")


class TrainableAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` that refuses frozen parameters (`requires_grad=False`) in any param group."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        items = [params] if isinstance(params, torch.Tensor) else list(params)
        frozen = [i for i, p in enumerate(items) if isinstance(p, torch.Tensor) and not p.requires_grad]
        if frozen:
            name = param_group.get("name", f"#{len(self.param_groups)}")
            raise OptimizerParamsError(
                f"param group {name} holds {len(frozen)} frozen parameter(s) (requires_grad=False, positions "
                f"{frozen[:5]}); frozen parameters never enter the optimizer — declare what trains with "
                "set_trainable / the recipe's model.train"
            )
        if not isinstance(params, (torch.Tensor, set)):  # a set keeps torch's own error (unordered)
            param_group = {**param_group, "params": items}
        super().add_param_group(param_group)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> TrainableAdamW:
    """AdamW over the model's trainable parameters, one param group per (group × decay/no decay).

    Each param group carries `name` (`"fusion.decay"`), `group` and `decay` entries. `fused=True` when
    the parameters all live on CUDA or all on CPU. Raises if nothing is trainable.
    """
    groups = parameter_groups(model)
    check_group_names(cfg, list(groups))
    kinds = param_kinds(model)
    param_groups: list[dict[str, Any]] = []
    for group in groups:
        trainable = [p for p in groups[group].values() if p.requires_grad]
        if not trainable:
            continue
        lr = group_lr(cfg, group)
        for decay in (True, False):
            params = [p for p in trainable if decays(group, kinds[id(p)], cfg.weight_decay_groups) == decay]
            if params:
                param_groups.append({
                    "params": params, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0,
                    "name": f"{group}.{'decay' if decay else 'no_decay'}", "group": group, "decay": decay,
                })
    if not param_groups:
        raise OptimizerParamsError(
            f"{type(unwrap(model)).__name__} has no trainable parameters; name the groups to train in the "
            f"recipe's model.train (or set_trainable); its groups are {list(groups)}"
        )
    devices = {p.device.type for g in param_groups for p in g["params"]}
    # One kernel for all parameters on CUDA and on CPU (the per-parameter loop cost a tiny CPU step 4 %).
    fused = True if devices in ({"cuda"}, {"cpu"}) else None
    optimizer = TrainableAdamW(param_groups, lr=param_groups[0]["lr"], betas=tuple(cfg.betas), eps=cfg.eps,
                               weight_decay=cfg.weight_decay, fused=fused)
    check_optimizer_params(optimizer, model)
    return optimizer


def check_optimizer_params(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Raise `OptimizerParamsError` unless `optimizer` holds each trainable parameter of `model` exactly
    once and no frozen (or foreign) parameter. Run at build and after resuming."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    trainable = {id(p) for n, p in unwrap(model).named_parameters() if p.requires_grad}
    held: dict[int, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            held[id(p)] = held.get(id(p), 0) + 1
    problems = []
    frozen = [names[i] for i in held if i in names and i not in trainable]
    if frozen:
        problems.append(f"frozen parameter(s) {_few(frozen)} are in the optimizer")
    foreign = [i for i in held if i not in names]
    if foreign:
        problems.append(f"{len(foreign)} parameter(s) that are not the model's are in the optimizer")
    missing = [names[i] for i in trainable if i not in held]
    if missing:
        problems.append(f"trainable parameter(s) {_few(missing)} are missing from the optimizer")
    twice = [names.get(i, "?") for i, c in held.items() if c > 1]
    if twice:
        problems.append(f"parameter(s) {_few(twice)} appear in more than one param group")
    if problems:
        raise OptimizerParamsError(
            "the optimizer must hold exactly the trainable parameters: " + "; ".join(problems)
            + ". Rebuild it with build_optimizer after declaring what trains (set_trainable / model.train)"
        )


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" … ({len(names)} in all)" if len(names) > n else "")


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate of each trainable group (`{"encoder": …, "fusion": …}`)."""
    return {g.get("group", g.get("name", str(i))): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float, kind: str) -> float:
    """The multiplier of each group's base lr for optimizer step `step` (0-based).

    Warm-up: `(step + 1) / warmup_steps` for `step < warmup_steps` (the first step already moves);
    cosine: `min + (1 - min) · ½(1 + cos(π · p))` with `p = (step - warmup) / (total - warmup)` clipped
    to [0, 1] (1 right after warm-up, `min_lr_ratio` from `total_steps` on); constant: 1 after warm-up.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"unknown schedule kind {kind!r}; use 'cosine' or 'constant'")
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up + cosine decay (or constant) as a `LambdaLR`; each group keeps its own base lr.

    `total_steps` defaults to `cfg.total_steps` (pass `RecipeConfig.total_steps` to fall back on
    `train.steps`). The factor function comes from the recipe, not the checkpoint: on resume only the
    step count is restored.
    """
    total = total_steps if total_steps is not None else cfg.total_steps
    if total is None or total <= 0:
        raise ValueError(f"the schedule needs a positive total_steps, got {total}; set schedule.total_steps or train.steps")
    if cfg.kind not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule kind {cfg.kind!r}; use 'cosine' or 'constant'")
    warmup, min_ratio, kind = cfg.warmup_steps, cfg.min_lr_ratio, cfg.kind

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup, total_steps=total, min_lr_ratio=min_ratio, kind=kind)

    lambdas: list[Callable[[int], float]] = [factor] * len(optimizer.param_groups)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


__all__ = [
    "OptimizerParamsError", "PARAM_KINDS", "TrainableAdamW", "build_optimizer", "build_scheduler",
    "check_group_names", "check_optimizer_params", "current_lrs", "decays", "group_lr", "lr_factor", "param_kind", "param_kinds",
    "parameter_groups", "unwrap",
]
