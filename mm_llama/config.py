"""Llama 3 text-model configuration, built from an HF `config.json`, a Meta `params.json` or a preset."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "llama3")
_SIZES = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len")
_MISSING: Any = object()


def show_value(value: Any) -> str:
    """A JSON value as it appears in the file, with its type: `"64" (str)`, `true (bool)`, `null`."""
    if value is None:
        return "null"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


class ConfigFields:
    """Typed reads of one JSON object (`config.json`, `params.json`, a nested section of them).

    Each reader rejects a wrong type or range with a ValueError naming the field, the value and what
    would fit, e.g. `'hidden_size' is "64" (str); expected a positive integer`. bool is not accepted
    where a number is expected (Python counts `true` as the integer 1).
    """

    def __init__(self, data: Any, *, where: str = "", missing_hint: str = "") -> None:
        if not isinstance(data, dict):
            what = repr(where) if where else "the config"
            raise ValueError(f"{what} is {show_value(data)}; expected a JSON object of named fields")
        self.data: dict[str, Any] = data
        self.where = where
        self.missing_hint = missing_hint

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def _value(self, key: str, default: Any) -> Any:
        """The value (None when absent or null); a required field that is absent raises."""
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if default is _MISSING and key not in self.data:
            hint = f"; {self.missing_hint}" if self.missing_hint else ""
            raise ValueError(f"the config is missing the field {self.name(key)!r}{hint}")
        return None if default is _MISSING else default

    def _bad(self, key: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"{self.name(key)!r} is {show_value(value)}; expected {expected}")

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int = 1) -> int:
        """An integer >= `minimum` (a JSON string, float or bool is refused)."""
        value = self._value(key, default)
        if value is None and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self._bad(key, value, expected)
        return value

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = True) -> float:
        """A finite float (JSON integers are accepted), > 0 when `positive`."""
        value = self._value(key, default)
        if value is None and default is not _MISSING:
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0):
            raise self._bad(key, value, "a finite number > 0" if positive else "a finite number")
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self._value(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def section(self, key: str) -> "ConfigFields | None":
        """A nested JSON object as ConfigFields; None when absent or null."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._bad(key, value, "a JSON object of named fields (or null)")
        return ConfigFields(value, where=self.name(key), missing_hint=self.missing_hint)

    def token_ids(self, key: str) -> int | list[int] | None:
        """A token id, a list of token ids, or null."""
        value = self.data.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise self._bad(key, value, "a token id >= 0, a list of them, or null")
        return value


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
        for name in _SIZES + (("head_dim",) if self.head_dim is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} is {value!r}; expected a positive integer")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name} is {value!r}; expected a finite number > 0")
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
    def from_hf_dict(cls, cfg: dict[str, Any], *, where: str = "") -> "LlamaConfig":
        """Build from the fields of an HF `LlamaConfig` (`config.json`); `where` names a nested section
        (`text_config`) in error messages. Wrong types and ranges raise ValueError naming the field."""
        if isinstance(cfg, dict) and "text_config" in cfg and "hidden_size" not in cfg:
            cfg, where = cfg["text_config"], "text_config"  # an Mllama config holds the trunk under text_config
        f = ConfigFields(cfg, where=where, missing_hint="is this a Llama config.json?")
        rope = next((r for r in (f.section("rope_parameters"), f.section("rope_scaling")) if r and r.data), None)
        theta = rope.number("rope_theta", None) if rope is not None else None
        n_heads = f.integer("num_attention_heads")
        return cls(
            dim=f.integer("hidden_size"),
            n_layers=f.integer("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=f.integer("num_key_value_heads", n_heads),
            vocab_size=f.integer("vocab_size"),
            ffn_dim=f.integer("intermediate_size"),
            norm_eps=f.number("rms_norm_eps", 1e-5),
            rope_theta=theta if theta is not None else f.number("rope_theta", 10000.0),
            rope_scaling=_parse_rope_scaling(rope) if rope is not None else None,
            max_seq_len=f.integer("max_position_embeddings", 8192),
            tie_embeddings=f.boolean("tie_word_embeddings", False),
            head_dim=f.integer("head_dim", None),
            bos_token_id=f.token_ids("bos_token_id"),
            eos_token_id=f.token_ids("eos_token_id"),
        )

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
        """Build from Meta's `params.json` (FFN size derived from `multiple_of`/`ffn_dim_multiplier`).
        Wrong types and ranges raise ValueError naming the field."""
        f = ConfigFields(params, missing_hint="is this a Meta Llama checkpoint?")
        dim, n_heads, n_layers = f.integer("dim"), f.integer("n_heads"), f.integer("n_layers")
        if f.raw("vocab_size", -1) in (None, -1):
            raise ValueError(
                f"params.json has vocab_size={f.raw('vocab_size', -1)!r}; Llama 3 checkpoints state it (128256)"
            )
        vocab = f.integer("vocab_size")
        scaled = f.boolean("use_scaled_rope", False)
        scaling = RopeScaling(factor=f.number("rope_scale_factor", 8.0)) if scaled else None
        if max_seq_len is None:
            max_seq_len = 131072 if scaled else 8192
        return cls(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=f.integer("n_kv_heads", n_heads),
            vocab_size=vocab,
            ffn_dim=meta_ffn_dim(dim, f.integer("multiple_of", 256), f.number("ffn_dim_multiplier", None)),
            norm_eps=f.number("norm_eps", 1e-5),
            rope_theta=f.number("rope_theta", 500000.0),
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


def _parse_rope_scaling(rope: ConfigFields) -> RopeScaling | None:
    rope_type = rope.raw("rope_type", rope.raw("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r}; mm-llama supports {list(SUPPORTED_ROPE_TYPES)} "
            "(Llama 3 uses 'default', Llama 3.1/3.2 use 'llama3')"
        )
    if rope_type == "default":
        return None
    rope = ConfigFields(rope.data, where=rope.where, missing_hint=f"rope type 'llama3' needs it in {rope.where}")
    scaling = RopeScaling(
        factor=rope.number("factor"),
        low_freq_factor=rope.number("low_freq_factor"),
        high_freq_factor=rope.number("high_freq_factor"),
        original_max_position_embeddings=rope.integer("original_max_position_embeddings"),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ValueError(
            f"{rope.name('high_freq_factor')!r} is {scaling.high_freq_factor} and {rope.name('low_freq_factor')!r} "
            f"is {scaling.low_freq_factor}; llama3 rope scaling needs high_freq_factor > low_freq_factor"
        )
    return scaling


def load_config(path: str | Path) -> LlamaConfig:
    """Read `config.json` (HF) or `params.json` (Meta) from a checkpoint directory or file."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "config.json", path / "params.json"]
    for file in candidates:
        if file.is_file():
            try:
                data = json.loads(file.read_text())
                if file.name == "params.json" or (isinstance(data, dict) and "n_layers" in data):
                    return LlamaConfig.from_meta_params(data)
                return LlamaConfig.from_hf_dict(data)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
                raise ValueError(f"{file}: {e}") from e
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
