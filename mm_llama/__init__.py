"""mm-llama: a frozen Llama 3 language model with image, video and speech encoders fused in.

The text side imports at once; the multimodal names (`MultimodalLlama`, `load_multimodal`, …) load on
first use, so `import mm_llama` stays light for text-only scripts.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from mm_llama.checkpoints import CheckpointError, load_llama, save_hf
from mm_llama.config import LlamaConfig, RopeScaling, load_config, preset
from mm_llama.generation import GenerationConfig, GenerationResult, generate
from mm_llama.model import LlamaDecoder
from mm_llama.tokenizer import Tokenizer, load_tokenizer

try:
    __version__ = version("mm-llama")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# name → module that defines it, imported when the name is first read
_LAZY = {
    "MultimodalLlama": "mm_llama.multimodal",
    "load_multimodal": "mm_llama.checkpoints.multimodal_loading",
    "load_adapter_run": "mm_llama.checkpoints.multimodal_loading",
    "save_adapter": "mm_llama.checkpoints.multimodal_loading",
    "load_image_model": "mm_llama.image_chat",
    "answer_images": "mm_llama.image_chat",
    "answer_video": "mm_llama.video_chat",
    "answer_speech": "mm_llama.speech_chat",
    "answer_media": "mm_llama.media_chat",
    "load_recipe": "mm_llama.train.recipe",
    "run_training": "mm_llama.train.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mm_llama' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointError",
    "GenerationConfig",
    "GenerationResult",
    "LlamaConfig",
    "LlamaDecoder",
    "RopeScaling",
    "Tokenizer",
    "__version__",
    "generate",
    "load_config",
    "load_llama",
    "load_tokenizer",
    "preset",
    "save_hf",
    *_LAZY,
]
