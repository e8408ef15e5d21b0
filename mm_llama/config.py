"""Llama 3 text-model configuration, built from an HF `config.json`, a Meta `params.json` or a preset."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (`rope_type: llama3`); REFERENCE.md §1 gives the rule."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama 3 decoder."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    head_dim: int | None = None
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads} "
                "for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with ``changes``. A head_dim that was derived (``dim // n_heads``) is derived again when
        ``dim`` or ``n_heads`` changes, so ``preset("tiny").replace(dim=128)`` gets head_dim 32, not the
        preset's 16; an explicit head_dim that differs from ``dim // n_heads`` is kept."""
        derived = self.head_dim == self.dim // self.n_heads
        if derived and "head_dim" not in changes and ({"dim", "n_heads"} & changes.keys()):
            changes = {**changes, "head_dim": None}
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "LlamaConfig":
        """Build from the fields of an HF `LlamaConfig` (`config.json`)."""
        if "text_config" in cfg and "hidden_size" not in cfg:
            cfg = cfg["text_config"]  # an Mllama config holds the text trunk under text_config
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = _parse_rope_scaling(rope)
        try:
            return cls(
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                vocab_size=cfg["vocab_size"],
                ffn_dim=cfg["intermediate_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_seq_len=cfg.get("max_position_embeddings", 8192),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                head_dim=cfg.get("head_dim"),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
            )
        except KeyError as e:
            raise ValueError(
                f"HF config is missing the field {e.args[0]!r}; is this a Llama config.json?"
            ) from None

    def to_hf_dict(self) -> dict[str, Any]:
        """Fields of an HF `LlamaConfig`, so the saved checkpoint loads in transformers."""
        rope: dict[str, Any] | None = None
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.ffn_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "bfloat16",
        }

    # ------------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta_params(cls, params: dict[str, Any], max_seq_len: int | None = None) -> "LlamaConfig":
        """Build from Meta's `params.json` (FFN size derived from `multiple_of`/`ffn_dim_multiplier`)."""
        try:
            dim = params["dim"]
            n_heads = params["n_heads"]
            n_layers = params["n_layers"]
        except KeyError as e:
            raise ValueError(
                f"params.json is missing the field {e.args[0]!r}; is this a Meta Llama checkpoint?"
            ) from None
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            raise ValueError(
                f"params.json has vocab_size={vocab!r}; Llama 3 checkpoints state it (128256)"
            )
        scaled = bool(params.get("use_scaled_rope", False))
        scaling = None
        if scaled:
            scaling = RopeScaling(factor=float(params.get("rope_scale_factor", 8.0)))
        if max_seq_len is None:
            max_seq_len = 131072 if scaled else 8192
        return cls(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            vocab_size=vocab,
            ffn_dim=meta_ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=scaling,
            max_seq_len=max_seq_len,
            tie_embeddings=False,
        )

    def to_meta_params(self) -> dict[str, Any]:
        """Meta `params.json` fields; raises when the FFN size is not expressible as Meta's rule."""
        multiple_of, multiplier = _meta_ffn_args(self.dim, self.ffn_dim)
        params: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "use_scaled_rope": self.rope_scaling is not None,
        }
        if self.rope_scaling is not None and self.rope_scaling.factor != 8.0:
            params["rope_scale_factor"] = self.rope_scaling.factor
        return params


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN width: `multiple_of`-rounded `int(2·4·dim/3 · ffn_dim_multiplier)`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_ffn_args(dim: int, ffn_dim: int) -> tuple[int, float | None]:
    """Find `multiple_of`/`ffn_dim_multiplier` that reproduce `ffn_dim` under Meta's rule."""
    base = int(2 * (4 * dim) / 3)
    for multiple_of in (1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn_dim % multiple_of:
            continue
        for multiplier in (None, ffn_dim / base, (ffn_dim - multiple_of / 2) / base):
            if meta_ffn_dim(dim, multiple_of, multiplier) == ffn_dim:
                return multiple_of, multiplier
    raise ValueError(f"cannot express ffn_dim={ffn_dim} for dim={dim} with Meta's params.json rule")


def _parse_rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r}; mm-llama supports {list(SUPPORTED_ROPE_TYPES)} "
            "(Llama 3 uses 'default', Llama 3.1/3.2 use 'llama3')"
        )
    if rope_type == "default":
        return None
    try:
        return RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"rope type 'llama3' needs the field {e.args[0]!r} in rope_scaling") from None


def load_config(path: str | Path) -> LlamaConfig:
    """Read `config.json` (HF) or `params.json` (Meta) from a checkpoint directory or file."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "config.json", path / "params.json"]
    for file in candidates:
        if file.is_file():
            data = json.loads(file.read_text())
            if file.name == "params.json" or "n_layers" in data:
                return LlamaConfig.from_meta_params(data)
            return LlamaConfig.from_hf_dict(data)
    raise FileNotFoundError(
        f"no config.json (HF) or params.json (Meta) in {path}; point at a Llama checkpoint directory"
    )


_LLAMA31_ROPE = RopeScaling()

PRESETS: dict[str, LlamaConfig] = {
    "llama3-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "llama3-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "llama3.1-8b": LlamaConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
    ),
    "llama3.1-70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
        rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
    ),
    "llama3.1-405b": LlamaConfig(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248,
        rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
    ),
    "llama3.2-1b": LlamaConfig(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
        rope_scaling=RopeScaling(factor=32.0), max_seq_len=131072,
    ),
    "llama3.2-3b": LlamaConfig(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
        rope_scaling=RopeScaling(factor=32.0), max_seq_len=131072,
    ),
    # Test and demo sizes: GQA, llama3 scaling, a tiny vocabulary.
    "tiny": LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=160,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64),
        max_seq_len=256, bos_token_id=None, eos_token_id=None,
    ),
    "tiny-tied": LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=512, ffn_dim=160,
        max_seq_len=256, tie_embeddings=True, bos_token_id=None, eos_token_id=None,
    ),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
    """A named configuration (`llama3-8b`, `llama3.1-405b`, `tiny`, ...), optionally changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
