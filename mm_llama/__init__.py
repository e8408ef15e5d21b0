"""mm-llama: a frozen Llama 3 language model with image, video and speech encoders fused in."""

from mm_llama.config import LlamaConfig, RopeScaling, load_config, preset
from mm_llama.model import LlamaDecoder

__all__ = ["LlamaConfig", "LlamaDecoder", "RopeScaling", "load_config", "preset"]
