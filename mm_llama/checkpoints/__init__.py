"""Checkpoint formats: HF safetensors (single and sharded) and Meta consolidated `.pth` shards."""

from mm_llama.checkpoints.hf import load_hf_state_dict, save_hf
from mm_llama.checkpoints.loading import CheckpointError, load_llama
from mm_llama.checkpoints.meta import load_meta_state_dict

__all__ = ["CheckpointError", "load_hf_state_dict", "load_llama", "load_meta_state_dict", "save_hf"]
