"""Training recipes: YAML files mapped onto nested dataclasses, with `key.sub=value` overrides.

A recipe is a YAML mapping whose top-level keys are the sections of `RecipeConfig` (`model`, `data`,
`optim`, `schedule`, `train`, `checkpoint`, `logging`, `distributed`) plus `name` / `description`.
`inherit: base.yaml` (a path relative to the recipe, or a list of them) merges the base recipe(s)
first; mappings merge key by key, everything else (lists included) is replaced.

Validation is strict: unknown keys anywhere (in the file or in an override) are one error that names
all of them by dotted path together with the valid keys of their section, and wrong types name the
key, the value and the expected type; NaN and infinity (`.nan`, `.inf`) are refused wherever they occur,
naming the key. Numbers such as `1e-3` are floats (plain YAML 1.1 would read
them as strings). Relative paths in a recipe (shards, checkpoints) are kept as written and resolve
against the working directory of the run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from mm_llama.atomic_file import atomic_write

DECODER_GROUP = "decoder"  # the LM's trainable group; the others come from the model (train.optim)
PARAM_KINDS = ("weight", "bias", "norm", "gate", "embedding")  # see train.optim.param_kind
CONFIG_FILE = "config.yaml"
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class RecipeError(ValueError):
    """A recipe (file or overrides) that cannot be used as written."""


# ------------------------------------------------------------------------------------------ sections
@dataclass
class ModelConfig:
    """What is built and what trains.

    `kind`: `multimodal` (frozen LM + image encoder + fusion) or `llama` (a plain decoder, for
    pretraining tiny LMs). `base_lm`: the Llama checkpoint directory (HF or Meta) the fusion attaches
    to. `text`: a `mm_llama.preset` name or `LlamaConfig` fields, for an LM built from scratch.
    `encoder` / `vision`: the image encoder family and its config fields. `encoder_checkpoint`: a
    pretrained encoder's weights. `init_from`: a run or export whose adapter weights start this stage
    (e.g. annealing continues pretraining). `fusion_layers`: decoder layers that get cross-attention
    (empty = every 4th). `fusion_gate_init`: the value every new cross-attention gate parameter starts
    at (both gates of each block; their scale is its tanh). 0 is Meta's: the new blocks start as the
    identity, so the frozen LM is unchanged at step 0; a non-zero start lets image features reach the LM
    from the first step, which a from-scratch encoder needs (the gates of one that sends noise would
    otherwise stay at 0). Weights from `init_from` replace it. `init_from` may list several runs (say an
    image adapter and a speech adapter trained apart): their weights are loaded as one union, and a key
    two of them hold is an error. `train`: the stage's trainable groups, named by the model
    (`[image.encoder, image.fusion]`; null = every group but the LM's `decoder`); everything else is
    frozen. A `llama` model has the one group `decoder`, which always trains. `contrastive`: settings of
    contrastive image-encoder pretraining (`data.task: contrastive`; see `train.contrastive`):
    `embed_dim`, `pool` (cls | mean), `init_temperature`, `max_logit_scale`.
    """

    kind: Literal["multimodal", "llama"] = "multimodal"
    base_lm: str | None = None
    text: str | dict[str, Any] | None = None
    encoder: Literal["mllama", "timm"] = "mllama"
    vision: dict[str, Any] = field(default_factory=dict)
    encoder_checkpoint: str | None = None
    init_from: str | list[str] | None = None
    fusion_layers: list[int] = field(default_factory=list)
    fusion_gate_init: float = 0.0
    train: list[str] | None = None
    contrastive: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if self.train is not None and not self.train:
            out.append("model.train is empty: nothing would train; name at least one group (null = every group "
                       "but the LM's)")
        if self.kind == "llama" and len(self.init_runs()) > 1:
            out.append(f"model.init_from lists {len(self.init_runs())} runs: a model.kind=llama stage starts from one LM")
        if self.kind == "llama" and self.train not in (None, [DECODER_GROUP]):
            out.append(f"model.train={self.train}: a model.kind=llama stage trains its one group, decoder; "
                       "leave model.train out")
        out += [f"model.fusion_layers has a negative index {i}" for i in self.fusion_layers if i < 0]
        return out  # a non-finite fusion_gate_init is caught by non_finite_values, as every float is

    def init_runs(self) -> list[str]:
        """`init_from` as a list (empty when unset)."""
        if self.init_from is None:
            return []
        return [self.init_from] if isinstance(self.init_from, str) else list(self.init_from)

    def trainable_groups(self, model_groups: Sequence[str]) -> list[str]:
        """The groups this stage trains among `model_groups` (the model's `parameter_groups()` names):
        `train`, or every group but `decoder` when it is null. Unknown names are a RecipeError listing
        the model's groups."""
        if self.train is None:
            return [g for g in model_groups if g != DECODER_GROUP] or [DECODER_GROUP]
        unknown = [g for g in self.train if g not in model_groups]
        if unknown:
            raise RecipeError(f"model.train names {unknown}, which this model does not have; its groups are "
                              f"{list(model_groups)}")
        return list(self.train)


@dataclass
class DataConfig:
    """What a data loader needs; names follow `mm_llama.data.pipelines.LoaderConfig` and `loader_for_task`.

    `shards` / `eval_shards`: shard paths, brace patterns, directories or globs (a single string is a
    one-element list); `task`: caption, vqa, caption_vqa, video_caption, video_qa, asr, ast, lm, …;
    `batch_size`: per rank and per micro-step; `resampled`: draw shards with replacement (endless; bound an epoch with
    `samples_per_epoch`, per rank); `shuffle` / `shuffle_buffer`: shard and sample shuffling;
    `max_skip_fraction`: stop when more undecodable samples than this are skipped (checked after
    `min_samples_before_check`); `tile_size` / `max_tiles`: image tiling (tile_size null = the model's);
    `num_frames`: video frames per clip; `max_batch_seconds`: audio batches hold at most this much padded
    audio; `max_seq_len`: tokens per sample (null = no limit); `tokenizer`: path (null = the base LM's);
    `prompt`: overrides the task's instruction; `options`: further task-specific keyword arguments.
    """

    shards: list[str] = field(default_factory=list)
    eval_shards: list[str] = field(default_factory=list)
    task: str = "caption"
    batch_size: int = 8
    num_workers: int = 0
    resampled: bool = False
    seed: int = 0
    samples_per_epoch: int | None = None
    shuffle: bool = True
    shuffle_buffer: int = 1000
    max_skip_fraction: float = 0.1
    min_samples_before_check: int = 100
    tile_size: int | None = None
    max_tiles: int = 4
    num_frames: int | None = None
    max_batch_seconds: float | None = None
    max_seq_len: int | None = None
    drop_last: bool = False
    prefetch_factor: int = 2
    check_tars: bool = True
    tokenizer: str | None = None
    prompt: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = _positive("data", self, ("batch_size", "samples_per_epoch", "tile_size", "max_tiles", "num_frames",
                                       "max_batch_seconds", "max_seq_len", "prefetch_factor"))
        out += _non_negative("data", self, ("num_workers", "shuffle_buffer", "min_samples_before_check", "seed"))
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            out.append(f"data.max_skip_fraction must be within [0, 1], got {self.max_skip_fraction}")
        return out


@dataclass
class OptimConfig:
    """AdamW settings.

    `lr`: one learning rate, or absolute rates per trainable group (`{image.encoder: 1e-4, image.fusion:
    1e-3}`); `lr_multipliers`: per-group factors applied on top (`{image.encoder: 0.1}`). Group names are
    the model's (`MultimodalLlama.parameter_groups()`); a nested mapping is the same (`{image: {encoder:
    0.1}}`, what the override `optim.lr_multipliers.image.encoder=0.1` writes). `weight_decay` applies only
    to the parameters `weight_decay_groups` names: a parameter kind (`weight`, `bias`, `norm`, `gate`,
    `embedding`; see `train.optim.param_kind`), a group (`image.encoder`: all its parameters) or both
    (`image.encoder.norm`). `grad_clip`: max global grad norm (null = no clipping);
    `accumulation_steps`: micro-batches per optimizer step (gradients accumulate in FP32).
    """

    lr: float | dict[str, float] = 1e-3
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_groups: list[str] = field(default_factory=lambda: ["weight"])
    grad_clip: float | None = 1.0
    accumulation_steps: int = 1

    def problems(self) -> list[str]:
        out = []
        lrs = self.lr if isinstance(self.lr, dict) else {"": self.lr}
        for group, lr in lrs.items():
            if lr < 0:
                out.append(f"optim.lr{'.' + group if group else ''} must be >= 0, got {lr}")
        for group, mult in self.lr_multipliers.items():
            if mult < 0:
                out.append(f"optim.lr_multipliers.{group} must be >= 0, got {mult}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            out.append(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            out.append(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            out.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        out += [f"optim.weight_decay_groups entry {entry!r} is empty; name a parameter kind {list(PARAM_KINDS)}, "
                "a group or 'group.kind'" for entry in self.weight_decay_groups if not entry.strip(".")]
        if self.grad_clip is not None and self.grad_clip <= 0:
            out.append(f"optim.grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        out += _positive("optim", self, ("accumulation_steps",))
        return out


@dataclass
class ScheduleConfig:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` × lr at `total_steps`
    (null = `train.steps`), or a constant rate after warm-up."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0

    def problems(self) -> list[str]:
        out = _non_negative("schedule", self, ("warmup_steps",)) + _positive("schedule", self, ("total_steps",))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            out.append(f"schedule.min_lr_ratio must be within [0, 1], got {self.min_lr_ratio}")
        return out


@dataclass
class TrainConfig:
    """The loop: `steps` optimizer steps; `precision` `auto` = bf16 autocast on CUDA, fp32 on CPU;
    `eval_every` steps between evaluations (0 = never); `max_nonfinite_in_a_row` skipped steps with a
    non-finite loss or gradient before the run stops; `device` `auto` | `cpu` | `cuda`."""

    steps: int = 1000
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    eval_every: int = 0
    eval_batches: int | None = None
    max_nonfinite_in_a_row: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def problems(self) -> list[str]:
        return (_positive("train", self, ("steps", "max_nonfinite_in_a_row", "eval_batches"))
                + _non_negative("train", self, ("eval_every",)))


@dataclass
class CheckpointConfig:
    """A checkpoint every `every` steps (and on SIGTERM/SIGINT and at the end); the newest `keep_last`
    are kept (0 = all)."""

    every: int = 1000
    keep_last: int = 3

    def problems(self) -> list[str]:
        return _positive("checkpoint", self, ("every",)) + _non_negative("checkpoint", self, ("keep_last",))


@dataclass
class LoggingConfig:
    """Metrics every `every` steps to `metrics.jsonl` (+ TensorBoard events); a progress bar."""

    every: int = 10
    tensorboard: bool = True
    progress: bool = True

    def problems(self) -> list[str]:
        return _positive("logging", self, ("every",))


@dataclass
class DistributedConfig:
    """Under torchrun: DDP for the trainable parts; `fsdp_frozen_lm` shards the frozen LM's layers with
    FSDP2 (for LMs too large to replicate); `find_unused_parameters` for batches that leave some
    trainable parameters unused (e.g. text-only batches skip cross-attention)."""

    fsdp_frozen_lm: bool = False
    find_unused_parameters: bool = False

    def problems(self) -> list[str]:
        return []


@dataclass
class RecipeConfig:
    """A complete training recipe (see the module docstring for the file format)."""

    name: str = ""
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def total_steps(self) -> int:
        """Where the schedule ends: `schedule.total_steps`, defaulting to `train.steps`."""
        return self.schedule.total_steps if self.schedule.total_steps is not None else self.train.steps

    def problems(self) -> list[str]:
        non_finite = non_finite_values(self)
        out = [f"{key} must be a finite number, got {value}"
           + (" (past float32's ±3.4e38: infinite once training holds it)" if math.isfinite(value) else "")
           + "; write a finite value" + _NULL_HINT.get(key, "")
               for key, value in non_finite]
        bad = {key.split("[")[0] for key, _ in non_finite}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):  # range checks of a non-finite key would only repeat it
                out += [p for p in section.problems() if p.split(" ", 1)[0] not in bad]
        if self.schedule.warmup_steps > self.total_steps:
            out.append(f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds the schedule's "
                       f"{self.total_steps} steps; shorten the warm-up or raise schedule.total_steps / train.steps")
        return out  # group names in optim.lr / lr_multipliers / weight_decay_groups: checked against the model


FLOAT32_MAX = 3.4028234663852886e38
_NULL_HINT = {"optim.grad_clip": " (null turns clipping off)", "data.max_batch_seconds": " (null = no limit)"}


def non_finite_values(value: Any, path: str = "") -> list[tuple[str, float]]:
    """`(dotted key, value)` of every NaN or ±inf anywhere in a recipe: float fields, per-group mappings
    (`optim.lr.fusion`), pairs (`optim.betas[1]`) and free-form mappings (`model.vision`, `data.options`).
    No recipe setting means anything sensible as NaN or infinity (`optim.lr: .inf` trains to NaN weights)."""
    if isinstance(value, float):  # past float32's range is infinity once torch holds it (optim.lr=1e39)
        return [] if math.isfinite(value) and abs(value) <= FLOAT32_MAX else [(path, value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [hit for f in dataclasses.fields(value)
                for hit in non_finite_values(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)]
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in non_finite_values(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in non_finite_values(v, f"{path}[{i}]")]
    return []


def _positive(section: str, obj: Any, names: Sequence[str]) -> list[str]:
    return [f"{section}.{n} must be > 0, got {getattr(obj, n)}" for n in names
            if getattr(obj, n) is not None and getattr(obj, n) <= 0]


def _non_negative(section: str, obj: Any, names: Sequence[str]) -> list[str]:
    return [f"{section}.{n} must be >= 0, got {getattr(obj, n)}" for n in names
            if getattr(obj, n) is not None and getattr(obj, n) < 0]


# ------------------------------------------------------------------------------------------ YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` / `3E5` (no dot) as floats, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """YAML with the float rule above; errors name the source."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise RecipeError(f"{source} is not valid YAML: {err}") from err


def _read_recipe_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of `path` with its `inherit` bases merged underneath."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"recipe inheritance loops: {cycle}; remove one of the `inherit` entries")
    if not path.is_file():
        via = f" (inherited by {chain[-1]})" if chain else ""
        raise RecipeError(f"recipe file {path} does not exist{via}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {path} is not UTF-8 text ({err.reason} at byte {err.start}); a recipe is a YAML "
                          "file: check that the path names one") from err
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}; check the path and its permissions") from err
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of sections, got a {type(raw).__name__}")
    bases = raw.pop("inherit", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{path}: `inherit` must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, _read_recipe_file(path.parent / base, (*chain, path)))
    return deep_merge(merged, raw)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merge recursively, any other value (lists too) replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"optim.lr.fusion=3e-4"` → `(["optim", "lr", "fusion"], 0.0003)`.

    The value is read as YAML (`10` int, `1e-4` float, `true` bool, `[a, b]` list, `null`); a value that
    is not valid YAML (e.g. `shards=[x/{0..9}.tar]`) is kept as a plain string.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.fullmatch(key):
        raise RecipeError(f"override {text!r} is not of the form key.sub=value (e.g. train.steps=100)")
    if key == "inherit" or key.startswith("inherit."):
        raise RecipeError(f"override {text!r}: `inherit` can only be set inside a recipe file")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else None  # noqa: S506
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `raw[path[0]][path[1]]… = value`, creating mappings on the way."""
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise RecipeError(
                f"cannot set {'.'.join(path)}: {where} is {child!r}, not a mapping; set {where} itself "
                f"(e.g. {where}={{{path[depth + 1]}: {value!r}}})"
            )
        node = child
    node[path[-1]] = value


# ------------------------------------------------------------------------------------------ typing
@dataclass
class _Issues:
    unknown: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (dotted key, section, valid keys)
    types: list[str] = field(default_factory=list)


class _Mismatch(Exception):
    pass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "anything"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {float: "a number", int: "an integer", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, path: str, issues: _Issues) -> Any:
    """`value` as type `tp`; raises `_Mismatch` for a wrong type (nested unknown keys go to `issues`)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial = _Issues()
            try:
                out = _convert(value, arg, path, trial)
            except _Mismatch:
                continue
            issues.unknown += trial.unknown
            issues.types += trial.types
            return out
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty section (`model:` with nothing under it)
            value = {}
        if not isinstance(value, dict):
            raise _Mismatch
        return _build_dataclass(tp, value, path, issues)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single item is a one-element list
        return [_convert_field(v, item, f"{path}[{i}]", issues) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a, path, issues) for v, a in zip(value, args))
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _Mismatch
        return {str(k): _convert_field(v, val_tp, f"{path}.{k}", issues) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"recipe field {path} has an unsupported annotation {tp!r}")  # a bug in this module


def _convert_field(value: Any, tp: Any, path: str, issues: _Issues) -> Any:
    """Like `_convert`, but a wrong type is recorded (naming key, value and expected type), not raised."""
    try:
        return _convert(value, tp, path, issues)
    except _Mismatch:
        issues.types.append(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return _DEFAULT


_DEFAULT = object()  # marks a field that failed conversion (its default is used until the error is raised)


def _build_dataclass(cls: type, raw: dict[str, Any], path: str, issues: _Issues) -> Any:
    hints = _hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in valid:
            issues.unknown.append((dotted, path, valid))
            continue
        converted = _convert_field(value, hints[key], dotted, issues)
        if converted is not _DEFAULT:
            kwargs[key] = converted
    return cls(**kwargs)


_RENAMED = {f"model.train_{part}": f" (replaced by model.train, a list of the model's groups such as "
            f"[image.encoder, image.fusion])" for part in ("encoder", "fusion", "decoder")}


def _flatten_group_maps(raw: dict[str, Any]) -> dict[str, Any]:
    """`optim.lr` / `optim.lr_multipliers` with nested mappings (`{image: {encoder: 0.1}}`, what a dotted
    override writes) flattened to the model's dotted group names (`{image.encoder: 0.1}`)."""
    optim = raw.get("optim")
    if not isinstance(optim, dict):
        return raw

    def flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            out.update(flat(value, name + ".") if isinstance(value, dict) else {name: value})
        return out

    optim = {k: flat(v) if k in ("lr", "lr_multipliers") and isinstance(v, dict) else v for k, v in optim.items()}
    return {**raw, "optim": optim}


# ------------------------------------------------------------------------------------------ public API
def recipe_from_dict(raw: dict[str, Any], source: str = "recipe", overridden: Sequence[str] = ()) -> RecipeConfig:
    """Validate a raw (already merged) recipe mapping; `overridden` dotted keys are marked in errors."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source} must be a mapping of sections, got a {type(raw).__name__}")
    issues = _Issues()
    cfg = _build_dataclass(RecipeConfig, _flatten_group_maps(raw), "", issues)
    messages: list[str] = []
    if issues.unknown:
        lines = []
        for dotted, section, valid in issues.unknown:
            mark = " (from an override)" if any(dotted == o or dotted.startswith(o + ".") or o.startswith(dotted + ".")
                                               for o in overridden) else ""
            where = f"valid keys of {section}" if section else "valid top-level keys"
            lines.append(f"  {dotted}{mark}: {where}: {', '.join(valid)}" + _RENAMED.get(dotted, ""))
        names = ", ".join(d for d, _, _ in issues.unknown)
        messages.append(f"unknown key(s) {names}:\n" + "\n".join(lines) + "\n  fix the spelling or remove them")
    if issues.types:
        messages.append("wrong type(s):\n" + "\n".join(f"  {t}" for t in issues.types))
    if messages:
        raise RecipeError(f"{source}: " + "\n".join(messages))
    problems = cfg.problems()
    if problems:
        raise RecipeError(f"{source}: invalid settings:\n" + "\n".join(f"  {p}" for p in problems))
    return cfg


def resolve_recipe_path(name: str | Path) -> Path:
    """A recipe path as given, or a built-in recipe name (`vision_pretrain` → train/recipes/…yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = RECIPES_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and builtin.is_file():
        return builtin
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise RecipeError(f"recipe {str(name)!r} is neither a file nor a built-in recipe; built-in: {known or 'none'}")


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Read a recipe (a path or built-in name), merge `inherit` bases and `key.sub=value` overrides, validate."""
    file = resolve_recipe_path(path)
    raw = _read_recipe_file(file)
    keys = []
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(raw, key_path, value)
        keys.append(".".join(key_path))
    return recipe_from_dict(raw, str(file), keys)


def recipe_to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    """Plain YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RecipeConfig, run_dir: str | Path, filename: str = CONFIG_FILE) -> Path:
    """Write the final merged recipe to `run_dir/config.yaml` (loadable again with `load_recipe`)."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / filename
    return atomic_write(target, yaml.safe_dump(recipe_to_dict(cfg), sort_keys=False, allow_unicode=True))
