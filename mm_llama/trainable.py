"""Declaring what trains: a model's parameters come in named groups (`image.encoder`, `image.fusion`,
`decoder`, `lora`, …); a stage trains some groups and freezes the rest.

LoRA weights (`mm_llama.adapters.lora`) sit inside the decoder's layers but are their own group,
`lora`: `split_lora_group` moves every parameter under a `lora_a` / `lora_b` module out of the
`decoder` group, so a stage can train them while the LM's own weights stay frozen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

__all__ = ["LORA_GROUP", "LORA_MODULES", "is_lora_parameter", "split_lora_group", "train_only"]

LORA_GROUP = "lora"
LORA_MODULES = ("lora_a", "lora_b")  # the attribute names `LoraLinear` gives its two low-rank factors


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter / state-dict name belongs to a LoRA factor (`….wq.lora_a.weight`)."""
    return any(part in LORA_MODULES for part in name.split(".")[:-1])


def split_lora_group(groups: Mapping[str, Mapping[str, nn.Parameter]],
                     source: str = "decoder") -> dict[str, dict[str, nn.Parameter]]:
    """`groups` with the LoRA parameters of group `source` moved into a new `lora` group placed right
    after it; unchanged (as a plain dict) when `source` holds none."""
    out: dict[str, dict[str, nn.Parameter]] = {}
    for group, params in groups.items():
        if group != source:
            out[group] = dict(params)
            continue
        lora = {n: p for n, p in params.items() if is_lora_parameter(n)}
        out[group] = {n: p for n, p in params.items() if n not in lora}
        if lora:
            out[LORA_GROUP] = lora
    return out


def train_only(groups: Mapping[str, Mapping[str, nn.Parameter]], wanted: Iterable[str]) -> None:
    """`requires_grad` on exactly the parameters of the `wanted` groups (of `groups`, a model's
    `parameter_groups()`); an unknown name is a ValueError that lists the model's groups."""
    wanted = list(wanted)
    unknown = [g for g in wanted if g not in groups]
    if unknown:
        raise ValueError(f"unknown trainable group(s) {unknown}; this model's groups are {list(groups)}")
    for group, params in groups.items():
        for p in params.values():
            p.requires_grad_(group in wanted)
