"""`ImageModality`: tiled image encoder → projection → gated cross-attention (Llama 3 paper §7, Llama 3.2
Vision). Deep fusion: the projected vision tokens are keys/values of the blocks before `fusion_layers`."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from mm_llama.config import LlamaConfig
from mm_llama.cross_attention_mask import attention_masks, flatten_key_mask, text_image_mask
from mm_llama.encoders.base import TiledImageEncoder
from mm_llama.fusion import CrossAttentionInputs
from mm_llama.media_tokens import MediaTokens
from mm_llama.modalities.base import Modality

IMAGE_ENCODERS = ("mllama", "timm")


class ImageInputs(Protocol):
    """A collated image batch (see `mm_llama.data.image_transform.ImageBatch`)."""

    pixels: torch.Tensor  # [B, N, T, 3, H, W]
    aspect_ratio_ids: torch.Tensor  # [B, N], 0 = padding image
    tile_mask: torch.Tensor  # [B, N, T]
    num_tiles: list[list[int]]


def build_image_encoder(encoder: str, vision: Any) -> TiledImageEncoder:
    """`"mllama"`: Llama 3.2 Vision's tiled ViT; `"timm"`: a timm ViT with taps and gated layers."""
    if encoder == "mllama":
        from mm_llama.encoders.mllama_vision import MllamaVisionEncoder

        return MllamaVisionEncoder(vision)
    if encoder == "timm":
        from mm_llama.encoders.timm_vit import TimmTiledEncoder

        return TimmTiledEncoder(vision)
    raise ValueError(f"unknown image encoder {encoder!r}; use one of {list(IMAGE_ENCODERS)}")


class ImageModality(Modality):
    """Images through a tiled encoder and a linear projection into cross-attention keys/values.

    Groups: `encoder` (the ViT) and `fusion` (projection, plus the blocks and the `<|image|>` row the
    model adds). `<|image|>` is the first id past the LM's vocabulary (128256 for Llama 3).
    """

    name = "image"

    def __init__(self, text: LlamaConfig, vision: Any, *, encoder: str = "mllama", fusion_layers: tuple[int, ...],
                 encoder_module: TiledImageEncoder | None = None) -> None:
        super().__init__(text, fusion_layers)
        if not fusion_layers:
            raise ValueError("the image modality needs at least one fusion layer")
        self.encoder_kind = encoder
        self.vision_cfg = vision
        self.token_id = MediaTokens(text.vocab_size).image
        self.encoder = encoder_module if encoder_module is not None else build_image_encoder(encoder, vision)
        self.projector = nn.Linear(self.encoder.out_dim, text.dim, bias=True)

    def token_ids(self) -> tuple[int, ...]:
        return (self.token_id,)

    def groups(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "fusion": self.projector}

    def encode(self, images: ImageInputs) -> torch.Tensor:
        """Projected vision tokens `[B, N·T·P, D]` (padding images and tiles are masked later as keys).

        Only real images go through the encoder; each is encoded on its own, so the result does not
        depend on the other images in the batch.
        """
        pixels = images.pixels
        batch, n_images, n_tiles = pixels.shape[:3]
        real = images.aspect_ratio_ids > 0  # [B, N]
        feats = pixels.new_zeros(batch, n_images, n_tiles, self.encoder.tokens_per_tile, self.encoder.out_dim)
        if bool(real.any()):
            real_ids, real_tiles = images.aspect_ratio_ids[real][:, None], images.tile_mask[real][:, None]
            out = self.encoder(pixels[real][:, None], real_ids, real_tiles)
            feats[real] = out[:, 0].to(feats.dtype)
        return self.projector(feats).flatten(1, 3)

    def prepare(self, tokens: torch.Tensor, inputs: ImageInputs | None,
                attention_mask: torch.Tensor | None) -> CrossAttentionInputs | None:
        if inputs is None or inputs.pixels.shape[1] == 0 or not bool((inputs.aspect_ratio_ids > 0).any()):
            if bool((tokens == self.token_id).any()):  # image tokens but no images: say which sample
                text_image_mask(tokens, self.token_id, [[] for _ in range(tokens.shape[0])], 1)
            return None
        dense = text_image_mask(tokens, self.token_id, inputs.num_tiles, inputs.pixels.shape[2])
        if attention_mask is not None:
            dense = dense & attention_mask.to(torch.bool)[:, :, None, None]
        key_rows = flatten_key_mask(dense, self.encoder.tokens_per_tile)
        key_mask, row_mask = attention_masks(key_rows)
        return CrossAttentionInputs(self.encode(inputs), key_mask, row_mask, decode_keys=key_rows[:, -1])


__all__ = ["IMAGE_ENCODERS", "ImageInputs", "ImageModality", "build_image_encoder"]
