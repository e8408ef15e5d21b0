"""Declaring what trains: a model's parameters come in named groups (`image.encoder`, `image.fusion`,
`decoder`, …); a stage trains some groups and freezes the rest."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

__all__ = ["train_only"]


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
