"""Video captioning and question answering over a `MultimodalLlama` with a video modality (what
`mm-llama video-qa` runs).

A clip is decoded to K frames spread uniformly over it (`data.decoders.decode_video`, as training reads
clips), each frame tiled like an image with the image modality's settings, and the clip goes in as one
`<|video|>` id of the training prompt (`data.prompts.prompt_ids`, task `video_qa` / `video_caption`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mm_llama.data.decoders import DecodeError, decode_video
from mm_llama.data.image_transform import ImageBatch, ImageTransform, TiledImage, collate_images
from mm_llama.data.prompts import DEFAULT_VIDEO_PROMPT, multiple_choice_question, short_answer_question
from mm_llama.generation import GenerationConfig
from mm_llama.image_chat import image_transform
from mm_llama.multimodal import MultimodalLlama
from mm_llama.tokenizer import Tokenizer

__all__ = ["DEFAULT_NUM_FRAMES", "DEFAULT_VIDEO_PROMPT", "QUESTION_STYLES", "ClipTransform", "VideoClips",
           "answer_video", "check_video_model", "run_video_settings", "first_frame_clip", "read_video", "styled_question", "video_batch",
           "video_transform"]

DEFAULT_NUM_FRAMES = 16  # the paper's video pretraining clips (REFERENCE.md §3)

QUESTION_STYLES: tuple[str, ...] = ("short", "choice", "plain")


@dataclass
class VideoClips:
    """A batch of clips as the video modality reads them (`VideoTextBatch` without the text).

    frames: an `ImageBatch` whose N axis is frames: `pixels [B, K, T, 3, H, W]`, `tile_mask [B, K, T]`.
    frame_mask: `[B, K]` bool, True on real frames (a shorter clip is padded with empty frames).
    """

    frames: ImageBatch
    frame_mask: torch.Tensor


class ClipTransform:
    """Decoded frames `[K, 3, H, W]` uint8 → K `TiledImage`s, each frame tiled as the image encoder expects."""

    def __init__(self, image: ImageTransform) -> None:
        self.image = image

    def __call__(self, frames: torch.Tensor) -> list[TiledImage]:
        if frames.ndim != 4 or frames.shape[0] < 1:
            raise ValueError(f"a clip must be frames [K, 3, H, W] with K >= 1, got shape {tuple(frames.shape)}")
        return [self.image.tile_tensor(frame) for frame in frames]


def run_video_settings(model_dir: str | Path) -> tuple[int | None, str | None]:
    """`(frames per clip, question style)` a training run used (`data.num_frames`; `data.prompt` when it is
    one of the paper's wordings, `plain` when there is none), so a model is asked as it was trained;
    `(None, None)` for what the run does not record (an export, a run of another task)."""
    import yaml

    path = Path(model_dir) / "config.yaml"
    try:
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None, None
    if not isinstance(data, dict) or not str(data.get("task", "")).startswith("video"):
        return None, None
    frames = data.get("num_frames") if isinstance(data.get("num_frames"), int) else None
    prompt = data.get("prompt")
    wordings = {styled_question("{question}", style): style for style in QUESTION_STYLES}
    style = "plain" if prompt is None else wordings.get(prompt)
    return frames, style


def check_video_model(model: MultimodalLlama) -> None:
    """ValueError unless `model` reads video, naming what it reads instead."""
    names = list(getattr(model, "modality_names", ()))
    if "video" not in names:
        raise ValueError(f"this model reads {names}, not video; load a run that trained or loaded a video adapter "
                         "(model.modalities: [image, video])")


def read_video(path: str | Path, num_frames: int = DEFAULT_NUM_FRAMES) -> torch.Tensor:
    """`[K, 3, H, W]` uint8 frames spread uniformly over the file's clip; ValueError naming the file when it
    is missing or cannot be decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {path} ({err.strerror or err})") from None
    try:
        return decode_video(data, str(path), num_frames)
    except DecodeError as err:
        raise ValueError(str(err)) from None


def first_frame_clip(frames: torch.Tensor) -> torch.Tensor:
    """The frozen-frame control: every frame of `[K, 3, H, W]` replaced by the first (motion gone, content kept)."""
    return frames[:1].expand_as(frames).clone()


def video_transform(model: MultimodalLlama) -> ClipTransform:
    """The per-frame tiling of the model's image encoder (the video borrows it)."""
    return ClipTransform(image_transform(model))


def video_batch(model: MultimodalLlama, clips: Sequence[Sequence[TiledImage]]) -> VideoClips:
    """One clip (its tiled frames) per sample → `VideoClips` on the model's device, pixels in its image dtype."""
    dtype = next(model.image.projector.parameters()).dtype
    device = next(model.parameters()).device
    vision = model.image.vision_cfg
    frames = collate_images([list(c) for c in clips], max_tiles=vision.max_tiles, tile_size=vision.tile_size)
    frames = frames.to(device, dtype=dtype)
    return VideoClips(frames, frames.image_mask)


def styled_question(question: str, style: str) -> str:
    """The question as sent: `short` → the paper's short-answer wording, `choice` → its multiple-choice
    wording (the question holds the options), `plain` → as written."""
    if style == "short":
        return short_answer_question(question)
    if style == "choice":
        return multiple_choice_question(question)
    if style == "plain":
        return question
    raise ValueError(f"question style must be one of {', '.join(QUESTION_STYLES)}, got {style!r}")


def answer_video(model: MultimodalLlama, tokenizer: Tokenizer, clip: str | Path | torch.Tensor,
                 question: str | None = None, style: str = "short", max_new_tokens: int = 64, *,
                 num_frames: int = DEFAULT_NUM_FRAMES, gen: GenerationConfig | None = None) -> str:
    """The model's answer about one clip (a file, or decoded frames `[K, 3, H, W]` uint8): `question` sent in
    `style` (`styled_question`), or without a question a caption (`DEFAULT_VIDEO_PROMPT`, the `video_caption`
    instruction). The prompt is the training one (`video_qa` / `video_caption`: `<|video|>` then the text).
    Greedy unless `gen` is given (it then sets the budget too)."""
    from mm_llama.media_chat import answer_media  # media_chat reads clips with this module's helpers

    check_video_model(model)
    text = DEFAULT_VIDEO_PROMPT if question is None else styled_question(question, style)
    gen = gen or GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=max_new_tokens, temperature=0.0)
    return answer_media(model, tokenizer, gen, video=clip, text=text, num_frames=num_frames)
