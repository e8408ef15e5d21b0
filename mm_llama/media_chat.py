"""One prompt that holds an image, a video clip, speech, or several of them, with optional typed text (what
`mm-llama ask` runs).

A model whose run loaded an image adapter and a speech adapter onto the same frozen LM
(`model.init_from: [image_run, speech_run]`) answers a spoken question about an image: the user turn is
`<|image|>`, then `<|video|>`, then the speech span the speech adapter fills, then the typed text
(`data.prompts.chat_prompt_ids`, the layout every task's prompt has). The image and the clip go through
cross-attention, the speech replaces its span's embeddings; all are computed once at prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mm_llama.adapters.speech_adapter import speech_token_count
from mm_llama.data.image_transform import ImageInput
from mm_llama.data.prompts import chat_prompt_ids, speech_span
from mm_llama.encoders.audio_features import log_mel
from mm_llama.generation import GenerationConfig, generate
from mm_llama.media_tokens import MediaTokens
from mm_llama.multimodal import MultimodalLlama
from mm_llama.image_chat import image_batch, image_transform
from mm_llama.speech_chat import read_audio, speech_batch
from mm_llama.video_chat import DEFAULT_NUM_FRAMES, read_video, video_batch, video_transform
from mm_llama.tokenizer import Tokenizer

__all__ = ["MediaPrompt", "answer_media", "media_prompt"]


@dataclass
class MediaPrompt:
    """One prompt: its token ids and the prefill media (`{name: batch}`: an image batch, `VideoClips`, an
    `AudioBatch`)."""

    ids: list[int]
    media: dict[str, Any]


def _speech_features(audio: str | Path | torch.Tensor) -> torch.Tensor:
    """`[frames, 80]` log-mel features of a file (any rate, resampled) or of a 16 kHz mono waveform `[S]`."""
    wave = read_audio(audio) if isinstance(audio, (str, Path)) else audio
    if wave.dim() != 1:
        raise ValueError(f"audio must be a file or a 16 kHz mono waveform [samples], got shape {tuple(wave.shape)}")
    features = log_mel(wave)
    if features.shape[0] < 1:
        raise ValueError("the audio is shorter than one 25 ms frame")
    return features


def media_prompt(model: MultimodalLlama, tokenizer: Tokenizer, *, image: ImageInput | None = None,
                 video: str | Path | torch.Tensor | None = None, audio: str | Path | torch.Tensor | None = None,
                 text: str | None = None, max_new_tokens: int = 0,
                 num_frames: int = DEFAULT_NUM_FRAMES) -> MediaPrompt:
    """The prompt ids and prefill media of one question; ValueError naming what is missing or too long.
    `video`: a file (`num_frames` sampled uniformly) or decoded frames `[K, 3, H, W]` uint8."""
    if image is None and video is None and audio is None:
        raise ValueError("give an image, audio or both, and/or a video (for a text-only prompt use mm-llama generate)")
    if audio is None and not (text and text.strip()):
        raise ValueError("ask a question: typed text, or a spoken one in the audio")
    for needed, name in ((image is not None, "image"), (video is not None, "video"), (audio is not None, "speech")):
        if needed and name not in model.modality_names:
            raise ValueError(f"this model reads {list(model.modality_names)}, not {name}; load a run that trained or "
                             f"loaded a {name} adapter (model.init_from: [image_run, speech_run, ...] combines runs)")
    tokens = MediaTokens(model.text_cfg.vocab_size)
    media_ids: list[int] = []
    media: dict[str, Any] = {}
    if image is not None:
        media["image"] = image_batch(model, [image_transform(model)(image)])
        media_ids.append(tokens.image)
    if video is not None:
        frames = read_video(video, num_frames) if isinstance(video, (str, Path)) else video
        media["video"] = video_batch(model, [video_transform(model)(frames)])
        media_ids.append(tokens.video)
    if audio is not None:
        media["speech"] = speech_batch(model, [_speech_features(audio)])
        media_ids += speech_span(tokens, speech_token_count(int(media["speech"].feature_lengths[0])))
    ids = chat_prompt_ids(tokenizer, tokens, media_ids, text or "")
    if len(ids) + max_new_tokens > model.max_seq_len:
        seconds = f" ({float(media['speech'].durations[0]):.1f} s of speech)" if "speech" in media else ""
        raise ValueError(f"the prompt is {len(ids)} tokens{seconds}; with {max_new_tokens} new tokens it does not fit the "
                         f"model's max_seq_len {model.max_seq_len}; shorten the audio or the question")
    return MediaPrompt(ids, media)


def answer_media(model: MultimodalLlama, tokenizer: Tokenizer, gen: GenerationConfig, *,
                 image: ImageInput | None = None, video: str | Path | torch.Tensor | None = None,
                 audio: str | Path | torch.Tensor | None = None, text: str | None = None,
                 num_frames: int = DEFAULT_NUM_FRAMES) -> str:
    """The model's answer to one prompt holding an image, a video clip, speech (a file or a 16 kHz waveform),
    or several of them, and optional typed text."""
    prompt = media_prompt(model, tokenizer, image=image, video=video, audio=audio, text=text,
                          max_new_tokens=gen.max_new_tokens, num_frames=num_frames)
    out = generate(model, [prompt.ids], gen, prefill_inputs={"media": prompt.media})[0]
    return tokenizer.decode(out.tokens).strip()
