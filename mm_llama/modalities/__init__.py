"""Modalities a `MultimodalLlama` composes: each turns its inputs into what the frozen LM reads."""

from mm_llama.modalities.base import Modality, SpanEmbeddings
from mm_llama.modalities.image import ImageInputs, ImageModality, build_image_encoder
from mm_llama.modalities.speech import AudioInputs, SpeechModality
from mm_llama.modalities.video import VideoInputs, VideoModality

__all__ = [
    "AudioInputs", "ImageInputs", "ImageModality", "Modality", "SpanEmbeddings", "SpeechModality", "VideoInputs",
    "VideoModality", "build_image_encoder",
]
