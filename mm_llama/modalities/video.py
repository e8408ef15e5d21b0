"""`VideoModality`: frames through the image modality's encoder → perceiver → video cross-attention (paper §7.2).

    frames [B, K, tiles, 3, H, W] ─ image encoder + projector (frozen, the image modality's; K in chunks)
      → frame tokens [B, K, tiles·P, D] ─ perceiver resampler (groups of `group_size` frames → `n_latents`)
      → aggregated frames [B, G, L, D] (+ a learned embedding of their order) ─ gated cross-attention blocks
        before `fusion_layers`

Deep fusion like images: text rows see a clip from its `<|video|>` token on (the image rules,
`cross_attention_mask`), its keys are the `G·L` latents of its real groups. The video blocks sit before
every 4th image cross-attention layer by default and run before the image block of the same layer.
Groups: `aggregator` (the perceiver) and `fusion` (the blocks and the `<|video|>` row). The encoder and
projector belong to the image modality (`image.encoder`, `image.fusion`): the paper trains only the
video parameters, and a model with video always has the image modality it borrows them from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from mm_llama.adapters.perceiver import PERCEIVER_PRESETS, PerceiverConfig, PerceiverResampler
from mm_llama.config import LlamaConfig
from mm_llama.cross_attention_mask import attention_masks, flatten_key_mask, text_image_mask
from mm_llama.fusion import CrossAttentionInputs
from mm_llama.media_tokens import MediaTokens
from mm_llama.modalities.base import Modality
from mm_llama.modalities.image import ImageInputs, ImageModality

__all__ = ["DEFAULT_FRAME_CHUNK", "MAX_CLIP_FRAMES", "VideoInputs", "VideoModality", "video_config", "video_config_fields",
           "video_fusion_layers"]

DEFAULT_FRAME_CHUNK = 8  # frames per image-encoder call: memory grows with the chunk, not the clip
MAX_CLIP_FRAMES = 64  # the paper's most frames per clip; it sizes the aggregated frames' order embeddings


class VideoInputs(Protocol):
    """A collated video batch (see `mm_llama.data.collate.VideoTextBatch`)."""

    frames: ImageInputs  # pixels [B, K, T, 3, H, W]: the N axis is frames
    frame_mask: torch.Tensor  # [B, K], True on real frames


@dataclass
class _FrameChunk:
    """Frames `k0:k1` of every clip, shaped as an image batch for `ImageModality.encode`."""

    pixels: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    tile_mask: torch.Tensor


def video_fusion_layers(image_layers: Sequence[int]) -> tuple[int, ...]:
    """Every 4th image cross-attention layer, counted from the top as Meta spreads them: image layers
    [3, 7, …, 31] → video before [15, 31]; [1, 3] → [3]."""
    if not image_layers:
        raise ValueError("video cross-attention goes before image cross-attention layers, and there are none")
    return tuple(sorted(image_layers)[::-1][::4][::-1])


class VideoModality(Modality):
    """Video clips (one per row) as cross-attention inputs: the frames are encoded by `image`'s encoder and
    projector, merged over time by a perceiver resampler, and read by the video blocks."""

    name = "video"
    fusion_rank = 0  # its block runs before the image block at a shared layer (paper §7.2)
    borrows = ("image",)

    def __init__(self, text: LlamaConfig, image: ImageModality, aggregator: PerceiverConfig, *,
                 fusion_layers: tuple[int, ...] = (), frame_chunk: int = DEFAULT_FRAME_CHUNK) -> None:
        layers = tuple(fusion_layers) or video_fusion_layers(image.fusion_layers)
        super().__init__(text, layers)
        if frame_chunk < 1:
            raise ValueError(f"frame_chunk must be a positive number of frames, got {frame_chunk}")
        object.__setattr__(self, "_image", image)  # borrowed, not a submodule: its weights stay the image's
        self.token_id = MediaTokens(text.vocab_size).video
        self.aggregator_cfg = aggregator
        self.frame_chunk = frame_chunk
        encoder = image.encoder
        self.aggregator = PerceiverResampler(aggregator, text.dim, encoder.tokens_per_tile * encoder.max_tiles,
                                             max_groups=-(-MAX_CLIP_FRAMES // aggregator.group_size))

    @property
    def image(self) -> ImageModality:
        return self._image  # type: ignore[attr-defined]

    def token_ids(self) -> tuple[int, ...]:
        return (self.token_id,)

    def groups(self) -> dict[str, nn.Module]:
        return {"aggregator": self.aggregator}

    def encode_frames(self, frames: ImageInputs, frame_mask: torch.Tensor) -> torch.Tensor:
        """Projected frame tokens `[B, K, T·P, D]`, `frame_chunk` frames at a time; without gradients when
        the borrowed encoder and projector are frozen (the video stages), so only one chunk's activations
        are alive at once."""
        pixels = frames.pixels
        batch, n_frames, n_tiles = pixels.shape[:3]
        ids = frames.aspect_ratio_ids * frame_mask.to(frames.aspect_ratio_ids.dtype)  # padding frames stay out
        frozen = not any(p.requires_grad for p in self.image.parameters())
        chunks = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            for k0 in range(0, n_frames, self.frame_chunk):
                k1 = min(k0 + self.frame_chunk, n_frames)
                chunk = _FrameChunk(pixels[:, k0:k1], ids[:, k0:k1], frames.tile_mask[:, k0:k1])
                chunks.append(self.image.encode(chunk).unflatten(1, (k1 - k0, -1)))
        return torch.cat(chunks, dim=1)

    def aggregate(self, inputs: VideoInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """`(latents [B, G, L, D], group_mask [B, G])` of each row's clip; the tokens of tiles a frame lacks
        (a clip of fewer tiles than another in the batch) are not keys of the perceiver."""
        frame_mask = inputs.frame_mask.to(torch.bool)
        tokens = self.encode_frames(inputs.frames, frame_mask)
        tile_mask = inputs.frames.tile_mask.to(torch.bool)  # [B, K, T]
        token_mask = tile_mask.repeat_interleave(tokens.shape[2] // tile_mask.shape[2], dim=2)
        return self.aggregator(tokens.to(self.aggregator.latents.dtype), frame_mask, token_mask)

    def prepare(self, tokens: torch.Tensor, inputs: VideoInputs | None,
                attention_mask: torch.Tensor | None) -> CrossAttentionInputs | None:
        if inputs is None or inputs.frame_mask.shape[1] == 0 or not bool(inputs.frame_mask.any()):
            if bool((tokens == self.token_id).any()):  # video tokens but no clips: say which sample
                text_image_mask(tokens, self.token_id, [[] for _ in range(tokens.shape[0])], 1)
            return None
        latents, group_mask = self.aggregate(inputs)
        n_groups, n_latents = latents.shape[1], latents.shape[2]
        clips = [[int(n)] if bool(row.any()) else [] for n, row in zip(group_mask.sum(dim=1).tolist(), group_mask)]
        dense = text_image_mask(tokens, self.token_id, clips, n_groups)  # a clip's groups are an image's tiles
        if attention_mask is not None:
            dense = dense & attention_mask.to(torch.bool)[:, :, None, None]
        key_rows = flatten_key_mask(dense, n_latents)
        key_mask, row_mask = attention_masks(key_rows)
        return CrossAttentionInputs(latents.flatten(1, 2), key_mask, row_mask, decode_keys=key_rows[:, -1])


def video_config(fields: dict[str, Any] | None) -> tuple[PerceiverConfig, tuple[int, ...], int]:
    """A recipe's / run's `model.video` (`{aggregator: PRESET | {fields}, fusion_layers: [...], frame_chunk: N}`;
    the aggregator defaults to `tiny`) → `(aggregator config, fusion layers (empty: every 4th image
    layer), frame chunk)`."""
    fields = dict(fields or {})
    unknown = sorted(set(fields) - {"aggregator", "fusion_layers", "frame_chunk"})
    if unknown:
        raise ValueError(f"model.video: unknown key(s) {unknown}; it takes aggregator, fusion_layers and frame_chunk")
    value = fields.get("aggregator") or "tiny"
    if isinstance(value, str):
        if value not in PERCEIVER_PRESETS:
            raise ValueError(f"model.video.aggregator: unknown preset {value!r}; presets: {sorted(PERCEIVER_PRESETS)}")
        aggregator = PERCEIVER_PRESETS[value]
    elif isinstance(value, dict):
        values = dict(value)
        base = PERCEIVER_PRESETS[values.pop("preset")] if "preset" in values else PerceiverConfig()
        known = {f.name for f in dataclasses.fields(PerceiverConfig)}
        bad = sorted(set(values) - known)
        if bad:
            raise ValueError(f"model.video.aggregator: unknown field(s) {bad}; PerceiverConfig has {sorted(known)} "
                             "(plus 'preset')")
        aggregator = dataclasses.replace(base, **values)
    else:
        raise ValueError(f"model.video.aggregator must be a preset name or a mapping of fields, got {value!r}")
    layers = tuple(int(i) for i in fields.get("fusion_layers") or ())
    return aggregator, layers, int(fields.get("frame_chunk", DEFAULT_FRAME_CHUNK))


def video_config_fields(modality: VideoModality) -> dict[str, Any]:
    """The `model.video` mapping that rebuilds `modality` (what a run directory records)."""
    return {"aggregator": dataclasses.asdict(modality.aggregator_cfg), "fusion_layers": list(modality.fusion_layers),
            "frame_chunk": modality.frame_chunk}
