"""mm-llama: a frozen Llama 3 language model with image, video and speech encoders fused in."""

from mm_llama.checkpoints import CheckpointError, load_llama, save_hf
from mm_llama.config import LlamaConfig, RopeScaling, load_config, preset
from mm_llama.generation import GenerationConfig, GenerationResult, generate
from mm_llama.model import LlamaDecoder
from mm_llama.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError",
    "GenerationConfig",
    "GenerationResult",
    "LlamaConfig",
    "LlamaDecoder",
    "RopeScaling",
    "Tokenizer",
    "generate",
    "load_config",
    "load_llama",
    "load_tokenizer",
    "preset",
    "save_hf",
]
