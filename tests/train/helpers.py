"""Tiny models and batches shared by the trainer tests (also imported by spawned worker processes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_llama import preset
from mm_llama.data.image_transform import ImageBatch
from mm_llama.encoders.mllama_vision import VisionConfig
from mm_llama.encoders.tiling import aspect_ratio_id
from mm_llama.multimodal import MultimodalConfig, MultimodalLlama

MAX_TILES = 4
TILE = 28


def tiny_config() -> MultimodalConfig:
    vision = VisionConfig(tile_size=TILE, patch_size=14, width=32, heads=4, mlp_dim=64, n_local_layers=2,
                          n_global_layers=1, max_tiles=MAX_TILES, taps=(1,))
    return MultimodalConfig(text=preset("tiny"), vision=vision)


def tiny_model(seed: int = 0, gates: float = 0.5) -> MultimodalLlama:
    """A tiny image model with encoder + fusion trainable, LM frozen; gates opened so gradients flow."""
    torch.manual_seed(seed)
    model = MultimodalLlama.from_config(tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(gates)
    model.set_trainable(["image.encoder", "image.fusion"])
    return model


def tiny_batch(batch: int = 4, length: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, ImageBatch]:
    """`tokens [B, T]` (BOS, `<|image|>`, text), `labels [B, T]` and one single-tile image per sample."""
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_config()
    text = torch.randint(3, cfg.text.vocab_size, (batch, length - 2), generator=g)
    tokens = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 1), cfg.image_token_id), text], 1)
    labels = torch.cat([text, torch.full((batch, 2), -100)], 1)
    pixels = torch.zeros(batch, 1, MAX_TILES, 3, TILE, TILE)
    pixels[:, :, 0] = torch.randn(batch, 1, 3, TILE, TILE, generator=g)
    tile_mask = torch.zeros(batch, 1, MAX_TILES, dtype=torch.bool)
    tile_mask[:, :, 0] = True
    images = ImageBatch(
        pixels=pixels,
        aspect_ratio_ids=torch.full((batch, 1), aspect_ratio_id((1, 1), MAX_TILES)),
        grids=torch.ones(batch, 1, 2, dtype=torch.long),
        tile_mask=tile_mask,
        num_tiles=[[1] for _ in range(batch)],
    )
    return tokens, labels, images


def select(images: ImageBatch, rows: slice) -> ImageBatch:
    return ImageBatch(images.pixels[rows], images.aspect_ratio_ids[rows], images.grids[rows], images.tile_mask[rows],
                      images.num_tiles[rows])


def loss_fn(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, images: ImageBatch) -> torch.Tensor:
    logits = model(tokens, images=images)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
