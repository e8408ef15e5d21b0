"""`MultimodalLlama`: a frozen Llama 3 decoder that sees images through gated cross-attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from mm_llama.adapters.cross_attention import GatedCrossAttentionBlock
from mm_llama.config import LlamaConfig
from mm_llama.cross_attention_mask import attention_masks, flatten_key_mask, text_image_mask
from mm_llama.encoders.base import TiledImageEncoder
from mm_llama.fusion import CROSS_ATTENTION_KEY, CrossAttentionInputs, FusionEmbedding, FusionLayer, fusion_schedule
from mm_llama.kv_cache import KVCache
from mm_llama.model import LlamaDecoder

TRAINABLE_GROUPS = ("encoder", "fusion", "decoder")
N_FUSION_TOKENS = 8  # Meta's learnable embedding rows; row 0 is <|image|>, the rest are reserved


class ImageInputs(Protocol):
    """A collated image batch (see `mm_llama.data.image_transform.ImageBatch`)."""

    pixels: torch.Tensor  # [B, N, T, 3, H, W]
    aspect_ratio_ids: torch.Tensor  # [B, N], 0 = padding image
    tile_mask: torch.Tensor  # [B, N, T]
    num_tiles: list[list[int]]


@dataclass(frozen=True)
class MultimodalConfig:
    """A text trunk, an image encoder and where they meet.

    `fusion_layers` are indices of decoder layers that get a cross-attention block *before* them;
    `encoder` names the image encoder family (`"mllama"`: Llama 3.2 Vision's tiled ViT, `"timm"`: a timm ViT
    with taps and gated layers) and `vision` is that encoder's config.
    """

    text: LlamaConfig
    vision: Any
    encoder: str = "mllama"
    fusion_layers: tuple[int, ...] = ()
    n_fusion_tokens: int = N_FUSION_TOKENS

    def __post_init__(self) -> None:
        if not self.fusion_layers:
            object.__setattr__(self, "fusion_layers", tuple(fusion_schedule(self.text.n_layers, max(1, self.text.n_layers // 4))))
        bad = [i for i in self.fusion_layers if not 0 <= i < self.text.n_layers]
        if bad:
            raise ValueError(f"fusion layer indices {bad} are outside the decoder's 0..{self.text.n_layers - 1}")
        if self.encoder not in ("mllama", "timm"):
            raise ValueError(f"unknown image encoder {self.encoder!r}; use 'mllama' or 'timm'")

    @property
    def image_token_id(self) -> int:
        """`<|image|>` as a model input: the first id past the LM's vocabulary (128256 for Llama 3)."""
        return self.text.vocab_size

    @property
    def vocab_size(self) -> int:
        """Input ids the model accepts (the output head keeps the LM's vocabulary)."""
        return self.text.vocab_size + self.n_fusion_tokens

    @property
    def max_seq_len(self) -> int:
        return self.text.max_seq_len


def build_image_encoder(cfg: MultimodalConfig) -> TiledImageEncoder:
    if cfg.encoder == "mllama":
        from mm_llama.encoders.mllama_vision import MllamaVisionEncoder

        return MllamaVisionEncoder(cfg.vision)
    from mm_llama.encoders.timm_vit import TimmTiledEncoder

    return TimmTiledEncoder(cfg.vision)


class MultimodalLlama(nn.Module):
    """Frozen LM + image encoder + projection + gated cross-attention (Llama 3 paper §7).

    `decoder` keeps the plain Llama checkpoint keys; cross-attention blocks wrap the layers in
    `cfg.fusion_layers` and `<|image|>` (id `cfg.image_token_id`) gets a trainable embedding row. What trains
    is declared with `set_trainable(encoder=…, fusion=…, decoder=…)`.
    """

    def __init__(
        self,
        cfg: MultimodalConfig,
        decoder: LlamaDecoder | None = None,
        encoder: TiledImageEncoder | None = None,
    ) -> None:
        super().__init__()
        self.mm_cfg = cfg
        self.decoder = decoder if decoder is not None else LlamaDecoder(cfg.text)
        for i in cfg.fusion_layers:
            self.decoder.layers[i] = FusionLayer(self.decoder.layers[i], GatedCrossAttentionBlock(cfg.text))
        self.decoder.tok_embeddings = FusionEmbedding(self.decoder.tok_embeddings, cfg.n_fusion_tokens)
        self.decoder.tie_weights()
        self.encoder = encoder if encoder is not None else build_image_encoder(cfg)
        self.projector = nn.Linear(self.encoder.out_dim, cfg.text.dim, bias=True)

    @property
    def cfg(self) -> MultimodalConfig:
        return self.mm_cfg

    def tie_weights(self) -> None:
        self.decoder.tie_weights()

    # ------------------------------------------------------------------ trainable sets
    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every parameter in exactly one of `encoder`, `fusion` (projection, cross-attention, new
        embedding rows) and `decoder` (the LM)."""
        fusion_ids = {id(p) for p in self._fusion_parameters()}
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        groups: dict[str, dict[str, nn.Parameter]] = {name: {} for name in TRAINABLE_GROUPS}
        for name, p in self.named_parameters():
            group = "encoder" if id(p) in encoder_ids else "fusion" if id(p) in fusion_ids else "decoder"
            groups[group][name] = p
        return groups

    def _fusion_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.projector.parameters()
        yield from self.decoder.tok_embeddings.fusion_embedding.parameters()
        for layer in self.decoder.layers:
            if isinstance(layer, FusionLayer):
                yield from layer.fusion.parameters()

    def set_trainable(self, *, encoder: bool, fusion: bool, decoder: bool = False) -> None:
        """Declare what trains in this stage; everything else is frozen."""
        flags = {"encoder": encoder, "fusion": fusion, "decoder": decoder}
        for group, params in self.parameter_groups().items():
            for p in params.values():
                p.requires_grad_(flags[group])

    # ------------------------------------------------------------------ images
    def encode_images(self, images: ImageInputs) -> torch.Tensor:
        """Projected vision tokens `[B, N·T·P, D]` (padding images and tiles are masked later as keys).

        Only real images go through the encoder; each is encoded on its own, so the result does not
        depend on the other images in the batch.
        """
        pixels = images.pixels
        batch, n_images, n_tiles = pixels.shape[:3]
        real = images.aspect_ratio_ids > 0  # [B, N]
        feats = pixels.new_zeros(batch, n_images, n_tiles, self.encoder.tokens_per_tile, self.encoder.out_dim)
        if bool(real.any()):
            out = self.encoder(pixels[real][:, None], images.aspect_ratio_ids[real][:, None], images.tile_mask[real][:, None])
            feats[real] = out[:, 0].to(feats.dtype)
        return self.projector(feats).flatten(1, 3)

    def _cross_attention_inputs(
        self,
        tokens: torch.Tensor,
        images: ImageInputs | None,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> CrossAttentionInputs | None:
        state = cache.fusion_state.get(CROSS_ATTENTION_KEY) if cache is not None and cache.length > 0 else None
        if state is not None:  # decoding: every new token sees what the last prompt token saw
            key_rows = state["decode_keys"][:, None, :].expand(tokens.shape[0], tokens.shape[1], -1)
            key_mask, row_mask = attention_masks(key_rows)
            return CrossAttentionInputs(None, key_mask, row_mask, kv=state["kv"])
        if images is None or images.pixels.shape[1] == 0 or not bool((images.aspect_ratio_ids > 0).any()):
            if bool((tokens == self.cfg.image_token_id).any()):  # image tokens but no images: say which sample
                text_image_mask(tokens, self.cfg.image_token_id, [[] for _ in range(tokens.shape[0])], 1)
            return None  # text only: the decoder runs exactly as the plain LM
        dense = text_image_mask(tokens, self.cfg.image_token_id, images.num_tiles, images.pixels.shape[2])
        if attention_mask is not None:
            dense = dense & attention_mask.to(torch.bool)[:, :, None, None]
        key_rows = flatten_key_mask(dense, self.encoder.tokens_per_tile)
        key_mask, row_mask = attention_masks(key_rows)
        inputs = CrossAttentionInputs(self.encode_images(images), key_mask, row_mask)
        if cache is not None:
            cache.fusion_state[CROSS_ATTENTION_KEY] = {"kv": inputs.kv, "decode_keys": key_rows[:, -1]}
        return inputs

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.decoder.new_cache(batch_size, max_len)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        images: ImageInputs | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        extras: dict[str, Any] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits `[B, T, V]` for `tokens [B, T]` containing one `<|image|>` per image in `images`.

        Text rows before a sample's first image, padding rows and text-only samples get no image signal.
        With a `cache`, the first call (prefill) computes each fusion layer's image keys/values once;
        later calls reuse them and need no `images`.
        """
        extras = dict(extras or {})
        inputs = self._cross_attention_inputs(tokens, images, attention_mask, cache)
        if inputs is not None:
            extras[CROSS_ATTENTION_KEY] = inputs
        return self.decoder(tokens, attention_mask=attention_mask, cache=cache, extras=extras, last_only=last_only)
