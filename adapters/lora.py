"""LoRA (Hu et al., 2021): trainable low-rank updates to chosen frozen linear layers of the Llama decoder.

A wrapped layer computes `y = W x + b + (alpha / rank) · B(A(dropout(x)))` with `A: [rank, in]`
(Kaiming-uniform, as `nn.Linear`'s default) and `B: [out, rank]` (zeros), so a freshly wrapped model gives
exactly the base model's outputs. The wrapper keeps the base layer's `weight` / `bias` parameters under
their own names, so the LM's checkpoint keys do not change; the factors add `<layer>.lora_a.weight` and
`<layer>.lora_b.weight`, which form the `lora` trainable group (`mm_llama.trainable.split_lora_group`).

Targets name the linear layers inside each decoder layer, by our names (`wq`, `wk`, `wv`, `wo`, `w1`,
`w2`, `w3`, or dotted: `attention.wq`) or Hugging Face's (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
`gate_proj`, `down_proj`, `up_proj`). Only the LM's own layers are wrapped, never the cross-attention
blocks of the modalities (those are trained directly) nor the output head.

`merge_lora` folds every update into its base weight and removes the wrappers (for exports of plain
weights); `merged_copy` does so on a copy that shares every other tensor with the original.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.layers import DecoderLayer
from mm_llama.trainable import LORA_GROUP, LORA_MODULES

__all__ = [
    "HF_NAMES", "LORA_GROUP", "LoraConfig", "LoraLinear", "apply_lora", "has_lora", "lora_config_of",
    "merge_lora", "merged_copy",
]

HF_NAMES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
            "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Hugging Face Llama name → ours


@dataclass(frozen=True)
class LoraConfig:
    """`rank` r of the update, `alpha` (the update is scaled by alpha / r), `dropout` on the LoRA branch's
    input (training only) and `targets`, the decoder-layer linear layers to wrap (see the module docstring)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wv")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        problems = self.problems()
        if problems:
            raise ValueError("LoRA " + "; LoRA ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these settings, one sentence each (empty when they are usable)."""
        return lora_problems(self.rank, self.alpha, self.dropout, self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> "LoraConfig":
        """From a mapping (a recipe's `model.lora`, a run's `config.yaml`); unknown keys are a ValueError."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ValueError(f"unknown LoRA setting(s) {unknown}; known: {known}")
        return cls(**dict(fields))

    def to_fields(self) -> dict[str, Any]:
        """YAML-ready fields (`targets` as a list); `from_fields` reads them back."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


def lora_problems(rank: Any, alpha: Any, dropout: Any, targets: Any) -> list[str]:
    """Range checks of LoRA settings, each naming the offending value (shared with the recipe's section)."""
    out = []
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        out.append(f"rank must be a whole number >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        out.append(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        out.append(f"dropout must lie in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not targets:
        out.append(f"targets must be a non-empty list of linear-layer names (e.g. [wq, wv] or [q_proj, v_proj]), "
                   f"got {targets!r}")
    else:
        out += [f"targets entry {t!r} is not a layer name" for t in targets if not isinstance(t, str) or not t.strip()]
    return out


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update; `weight` / `bias` are the base layer's own
    parameters (same objects, same state-dict names)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # [out, in]
        self.bias = base.bias  # [out] or None
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, **factory)  # A: [rank, in]
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, **factory)  # B: [out, rank]
        self.reset_lora_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset_lora_parameters(self) -> None:
        """A as `nn.Linear` initialises its weight (Kaiming-uniform, a=√5), B zero: the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense matrix, `scale · B @ A`: `[out, in]`, in fp32."""
        return self.scale * (self.lora_b.weight.float() @ self.lora_a.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in]` → `[..., out]`."""
        base = F.linear(x, self.weight, self.bias)
        return base + self.scale * self.lora_b(self.lora_a(self.dropout(x)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _decoder_layers(model: nn.Module) -> list[DecoderLayer]:
    """The LM's decoder layers: `model.decoder.layers` (a `MultimodalLlama`) or `model.layers` (a
    `LlamaDecoder`); a cross-attention-wrapped layer gives the plain layer it wraps. Decoder layers
    elsewhere (the speech adapter's own transformer layer) are not the LM's and are left alone."""
    lm = model.decoder if isinstance(getattr(model, "decoder", None), nn.Module) else model
    layers = []
    for entry in getattr(lm, "layers", None) or []:
        inner = entry if isinstance(entry, DecoderLayer) else getattr(entry, "layer", None)
        if isinstance(inner, DecoderLayer):
            layers.append(inner)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no Llama decoder layers to put LoRA on")
    return layers


def _linear_names(layer: nn.Module) -> list[str]:
    """Names (relative to a decoder layer) of its `nn.Linear` / `LoraLinear` submodules: `attention.wq`, …"""
    return [n for n, m in layer.named_modules() if isinstance(m, (nn.Linear, LoraLinear))
            and n.split(".")[-1] not in LORA_MODULES]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _resolve_targets(layers: list[DecoderLayer], targets: tuple[str, ...]) -> list[str]:
    """The relative linear-layer names the targets select (HF names translated); a target that selects
    nothing is a ValueError naming it and listing the names that exist."""
    names = _linear_names(layers[0])
    chosen: list[str] = []
    for target in targets:
        ours = HF_NAMES.get(target, target)
        hits = [n for n in names if _matches(n, ours)]
        if not hits:
            leaves = [n.split(".")[-1] for n in names]
            hf = [h for h, o in HF_NAMES.items() if o in leaves]
            raise ValueError(f"LoRA target {target!r} matches no linear layer of the decoder; its layers have "
                             f"{names} (short names {leaves}, or Hugging Face names {hf})")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the `cfg.targets` linear layers of every decoder layer in `model` with `LoraLinear` (in place;
    a `MultimodalLlama`'s decoder layers are shared with the decoder it was built on). The new factors
    are created on the base weight's device and dtype with `requires_grad=True`; the base weights keep
    their flags (declare the stage with `set_trainable`, group `lora`). Returns the wrapped layers'
    qualified names. A model that already has LoRA, or a target that matches nothing, is a ValueError."""
    if has_lora(model):
        raise ValueError("the model already has LoRA layers; merge_lora them first or build a fresh model")
    layers = _decoder_layers(model)
    relative = _resolve_targets(layers, cfg.targets)
    where = {id(layer): name for name, layer in model.named_modules() if isinstance(layer, DecoderLayer)}
    wrapped = []
    for layer in layers:
        for name in relative:
            parent_name, _, leaf = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            base = getattr(parent, leaf)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"LoRA target {name} of layer {where[id(layer)]} is a {type(base).__name__}, "
                                 "not an nn.Linear")
            setattr(parent, leaf, LoraLinear(base, cfg.rank, cfg.alpha, cfg.dropout))
            wrapped.append(f"{where[id(layer)]}.{name}")
    return wrapped


def _lora_modules(model: nn.Module) -> Iterator[tuple[nn.Module, str, LoraLinear]]:
    """`(parent, attribute, wrapper)` of every `LoraLinear` in `model`."""
    for parent in model.modules():
        for leaf, child in parent.named_children():
            if isinstance(child, LoraLinear):
                yield parent, leaf, child


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def lora_config_of(model: nn.Module) -> LoraConfig | None:
    """The settings `model`'s LoRA layers were made with (targets: the wrapped layers' short names, in
    order of first appearance), or None without LoRA; what a run records so that loading re-creates them."""
    found = list(_lora_modules(model))
    if not found:
        return None
    first = found[0][2]
    targets = list(dict.fromkeys(leaf for _, leaf, _ in found))
    return LoraConfig(rank=first.rank, alpha=first.alpha, dropout=first.dropout_p, targets=tuple(targets))


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold each LoRA update into its base weight and put a plain `nn.Linear` back in the wrapper's place.

    The merged weight is `W + (alpha / rank) · B @ A`, computed in fp32 and stored in W's dtype and
    device, as a **new** parameter (the old weight tensor is not written to, so a copy that shares it,
    see `merged_copy`, is unaffected); it keeps W's `requires_grad`, the bias is the base layer's. After
    merging, `model`'s state dict holds the LM's plain keys only (no `lora_a` / `lora_b`), which is what
    an export of plain weights (HF / Meta layout) writes. In eval mode (dropout off) the merged model
    computes the same function as the unmerged one, up to float rounding. Returns the number of layers
    merged (0: the model had no LoRA; nothing changes).
    """
    n = 0
    for parent, leaf, lora in list(_lora_modules(model)):
        merged = (lora.weight.float() + lora.delta_weight()).to(lora.weight.dtype)
        linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        linear.weight = nn.Parameter(merged, requires_grad=lora.weight.requires_grad)
        if lora.bias is not None:
            linear.bias = lora.bias
        setattr(parent, leaf, linear)
        n += 1
    return n


def merged_copy(model: nn.Module) -> nn.Module:
    """`model` itself when it has no LoRA; else a copy with every LoRA merged (`merge_lora`), sharing all
    other parameters and buffers with `model` (only the merged weights take new memory). `model` is left
    untouched, so a trainer can export plain weights and keep training."""
    if not has_lora(model):
        return model
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo)
    merge_lora(clone)
    return clone
