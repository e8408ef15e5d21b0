"""Modalities a `MultimodalLlama` composes: each turns its inputs into what the frozen LM reads."""

from mm_llama.modalities.base import Modality, SpanEmbeddings
from mm_llama.modalities.image import ImageInputs, ImageModality, build_image_encoder

__all__ = ["ImageInputs", "ImageModality", "Modality", "SpanEmbeddings", "build_image_encoder"]
