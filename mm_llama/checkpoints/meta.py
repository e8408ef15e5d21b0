"""Meta's `consolidated.NN.pth` + `params.json` layout, including model-parallel shards."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

import torch

from mm_llama.checkpoints.files import load_torch_file
from mm_llama.checkpoints.state_dict import CheckpointError

_IGNORED = {"rope.freqs"}


def consolidated_files(directory: Path) -> list[Path]:
    """`consolidated.00.pth`, `consolidated.01.pth`, … in model-parallel rank order."""
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"no consolidated.*.pth files in {directory}; is this a Meta Llama checkpoint?")
    odd = [f.name for f in files if not f.name.split(".")[1].isdigit()]
    if odd:
        raise CheckpointError(
            f"{directory} holds {', '.join(odd)}; Meta shards are named consolidated.NN.pth with NN a number"
        )
    ranks = [int(f.name.split(".")[1]) for f in files]
    if ranks != list(range(len(files))):
        raise CheckpointError(
            f"model-parallel shards in {directory} are not numbered 00..{len(files) - 1:02d}: "
            f"{', '.join(f.name for f in files)}; a shard is missing"
        )
    return files


def merge_shards(key: str, shards: list[torch.Tensor], full_shape: tuple[int, ...] | None) -> torch.Tensor:
    """Join one tensor's model-parallel pieces.

    Meta splits column-parallel weights (wq/wk/wv/w1/w3/output, and Llama 3's vocab-parallel
    tok_embeddings) along dim 0 and row-parallel weights (wo/w2) along dim 1, and replicates norms. The
    split dim is read from the shapes: it is the one dim where the pieces add up to the model's shape.
    """
    if len(shards) == 1:
        return shards[0]
    first = tuple(shards[0].shape)
    if any(tuple(s.shape) != first for s in shards):
        shapes = ", ".join(str(tuple(s.shape)) for s in shards)
        raise CheckpointError(f"model-parallel pieces of {key!r} differ in shape: {shapes}")
    if full_shape is None or first == tuple(full_shape):
        return shards[0]  # replicated (norms)
    n = len(shards)
    for dim in range(len(first)):
        split = tuple(d * n if i == dim else d for i, d in enumerate(first))
        if split == tuple(full_shape):
            return torch.cat(shards, dim=dim)
    raise CheckpointError(
        f"cannot merge {n} model-parallel pieces of {key!r} with shape {first} into the model's "
        f"shape {tuple(full_shape)}; does params.json match these weights?"
    )


def meta_keys(directory: Path) -> set[str]:
    """Tensor names in the first model-parallel shard (memory-mapped, nothing is read)."""
    return set(load_torch_file(consolidated_files(directory)[0]))


def load_meta_state_dict(
    directory: Path, expected_shapes: Mapping[str, torch.Size]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our-named tensors (Meta names are ours) merged across `consolidated.NN.pth` shards."""
    shards = [load_torch_file(f) for f in consolidated_files(directory)]
    keys = list(shards[0])
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))[:5]
            raise CheckpointError(f"consolidated.{i:02d}.pth holds different keys than consolidated.00.pth: {diff}")
    for key in keys:
        if key in _IGNORED:
            continue
        full = expected_shapes.get(key)
        yield key, merge_shards(key, [s[key] for s in shards], tuple(full) if full is not None else None)
