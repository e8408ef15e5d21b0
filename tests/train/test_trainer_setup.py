"""Shared set-up of the trainer tests (no tests here): synthetic shards, a trained BPE tokenizer, a tiny
random base LM, and recipe overrides that shrink the built-in tiny recipes to test size.

The assets are built once per session (`assets` fixture); test modules import the fixture from here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mm_llama.checkpoints.hf import save_hf
from mm_llama.config import preset
from mm_llama.model import LlamaDecoder
from mm_llama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]

# A 2-block timm ViT on one 32-px tile (2 × 2 patches + CLS = 5 tokens per tile).
VISION = {
    "model_name": "vit_tiny_patch16_224",
    "timm_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 16},
    "tile_size": 32, "max_tiles": 1, "taps": [1], "n_gated_layers": 1,
}


@dataclass
class Assets:
    root: Path
    data: Path  # shapes (image-caption, image-qa) + text, split train; shapes split val for eval
    tokenizer: Path
    base_lm: Path  # HF layout + tokenizer files
    dist_data: Path  # 8 shapes in 4 shards of 2 (distributed test)

    @property
    def captions(self) -> str:
        return str(self.data / "image-caption" / "train-*.tar")

    @property
    def eval_captions(self) -> str:
        return str(self.data / "image-caption" / "val-*.tar")


def _write_assets(root: Path) -> Assets:
    from mm_llama.data.synth import write_synth
    from mm_llama.data.synth.text import read_corpus

    data = root / "data"
    write_synth("shapes", data, n=32, seed=0, split="train", samples_per_shard=8)
    write_synth("shapes", data, n=8, seed=0, split="val", samples_per_shard=8)
    write_synth("text", data, n=60, seed=0, split="train")
    write_synth("text", data, n=12, seed=0, split="val")
    dist_data = root / "dist-data"
    write_synth("shapes", dist_data, n=8, seed=1, split="train", samples_per_shard=2)
    base = write_random_lm(root, list(read_corpus(data / "text" / "train-corpus.txt")), vocab_size=400)
    return Assets(root, data, root / "tokenizer", base, dist_data)


def write_random_lm(root: Path, corpus: list[str], vocab_size: int, **shape: object) -> Path:
    """`root/tokenizer` (BPE trained on `corpus`) and `root/base-lm`: a random `tiny` Llama (changed by
    `shape`) in HF layout with the tokenizer files next to it. Returns the LM directory."""
    from mm_llama.tokenizer_training import train_llama3_tokenizer

    tok_dir = root / "tokenizer"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus gives fewer merges than asked
        train_llama3_tokenizer(corpus, vocab_size, tok_dir)
    tok = Tokenizer.from_dir(tok_dir)
    base = root / "base-lm"
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **shape)
    save_hf(LlamaDecoder(cfg), base)
    for name in ("tokenizer.json", "tokenizer.model"):
        shutil.copy(tok_dir / name, base / name)
    return base


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    return _write_assets(tmp_path_factory.mktemp("train-assets"))


def mm_overrides(a: Assets, *, steps: int = 4, **more: object) -> list[str]:
    """Overrides that turn `tiny_vision_pretrain` into a seconds-long CPU run on the test assets."""
    values: dict[str, object] = {
        "model.base_lm": str(a.base_lm), "model.encoder_checkpoint": None, "model.vision": VISION,
        "model.fusion_layers": [1], "data.shards": [a.captions], "data.batch_size": 4, "data.shuffle_buffer": 16,
        "train.steps": steps, "train.device": "cpu", "schedule.warmup_steps": 1, "checkpoint.every": 2,
        "checkpoint.keep_last": 2, "logging.every": 1, "logging.progress": False, "logging.tensorboard": False,
        "optim.lr": 3e-3, "optim.lr_multipliers": {},
    }
    values.update({k.replace("__", "."): v for k, v in more.items()})
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def lm_overrides(a: Assets, *, steps: int = 20, **more: object) -> list[str]:
    """Overrides that turn `tiny_lm_pretrain` into a seconds-long CPU run on the test corpus."""
    values: dict[str, object] = {
        "model.text": {"preset": "tiny", "rope_scaling": None, "max_seq_len": 64},
        "data.shards": [str(a.data / "text" / "train-corpus.txt")], "data.tokenizer": str(a.tokenizer),
        "data.batch_size": 4, "data.max_seq_len": 32, "train.steps": steps, "train.device": "cpu",
        "schedule.warmup_steps": 2, "checkpoint.every": 10, "logging.every": 1, "logging.progress": False,
        "logging.tensorboard": False, "optim.lr": 1e-2,
    }
    values.update({k.replace("__", "."): v for k, v in more.items()})
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def train_command() -> list[str]:
    """`mm-llama train` as a subprocess: through the CLI once `train` is registered there."""
    from mm_llama.commands import PARSERS
    from mm_llama.commands import train

    if train.add_parser in PARSERS:
        return [sys.executable, "-m", "mm_llama.cli", "train"]
    return [sys.executable, "-m", "mm_llama.commands.train"]


def subprocess_env() -> dict[str, str]:
    """One intra-op thread (the same in every process, so CPU results are comparable bit for bit)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_command(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
