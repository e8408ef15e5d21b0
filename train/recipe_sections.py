"""The sections of a training recipe (`RecipeConfig` and its `model`, `data`, `optim`, `schedule`, `train`,
`checkpoint`, `logging`, `distributed` dataclasses) with their range checks; reading YAML into them is
`mm_llama.train.recipe`'s."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

DECODER_GROUP = "decoder"  # the LM's trainable group; the others come from the model (train.optim)
LORA_GROUP = "lora"  # LoRA factors in the LM's layers (mm_llama.trainable; kept here so recipes import no torch)
PARAM_KINDS = ("weight", "bias", "norm", "gate", "embedding")  # see train.optim.param_kind
METRIC_TASKS = {"caption": "cider", "vqa": "vqa_accuracy", "video_caption": "cider", "video_qa": "vqa_accuracy",
                "asr": "wer", "ast": "bleu"}
"""Tasks `mm-llama eval` (and `train.eval_metric_samples`) scores by generating, with their headline metric."""


class RecipeError(ValueError):
    """A recipe (file or overrides) that cannot be used as written."""


# ------------------------------------------------------------------------------------------ sections
@dataclass
class LoraSection:
    """`model.lora`: low-rank updates on frozen linear layers of the LM (`mm_llama.adapters.lora`).

    `rank` r, `alpha` (the update is scaled by alpha / r), `dropout` on the LoRA input, `targets`: the
    linear layers of each decoder layer to wrap, by our names (`wq wk wv wo w1 w2 w3`) or Hugging Face's
    (`q_proj k_proj v_proj o_proj gate_proj down_proj up_proj`). The factors form the trainable group
    `lora`; list it in `model.train` (null trains every group but `decoder`, `lora` included).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])

    def problems(self) -> list[str]:
        from mm_llama.adapters.lora import lora_problems  # torch only for recipes that use LoRA

        return [f"model.lora.{p}" for p in lora_problems(self.rank, self.alpha, self.dropout, self.targets)]


@dataclass
class ModelConfig:
    """What is built and what trains.

    `kind`: `multimodal` (frozen LM + modalities), `llama` (a plain decoder, for pretraining tiny LMs)
    or `speech_encoder` (a Conformer alone, for BEST-RQ pretraining: `model.speech.encoder` and
    `model.speech.best_rq`, the quantizer and masking settings of `encoders.best_rq.BestRqConfig`). `base_lm`: the Llama checkpoint directory (HF or Meta) the fusion attaches
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
    frozen. A `llama` model has the one group `decoder`, which always trains. `modalities`: what the
    model reads (`image`, `video`, `speech`; null = the modality of `data.task`, with `image` beside
    `video`); `video`: the video modality's `aggregator` (perceiver: a preset name, `tiny` or `paper`,
    or a mapping of `adapters.perceiver.PerceiverConfig` fields with an optional `preset`),
    `fusion_layers` (empty: every 4th image cross-attention layer) and `frame_chunk` (frames per
    image-encoder call); `speech`: the speech modality's
    `encoder` and `adapter` (a preset name, `tiny` or `paper`, or a mapping of fields with an optional
    `preset`), `encoder_checkpoint` (a BEST-RQ run or its `speech_encoder.safetensors`: the Conformer
    to start from), `best_rq` and `ctc` (the CTC aid of a speech stage, `mm_llama.train.speech_ctc`: `blank`, a special
    token's text or an id, `weight`, `scale`; absent in the paper recipes). `contrastive`: settings of
    contrastive image-encoder pretraining (`data.task: contrastive`; see `train.contrastive`):
    `embed_dim`, `pool` (cls | mean), `init_temperature`, `max_logit_scale`. `lora`: LoRA on the LM's
    linear layers (`LoraSection`; null = none): its trainable group is `lora`, the LM's weights stay
    frozen; for `model.kind: llama` the stage then trains `lora` only and its export merges it.
    """

    kind: Literal["multimodal", "llama", "speech_encoder"] = "multimodal"
    base_lm: str | None = None
    text: str | dict[str, Any] | None = None
    encoder: Literal["mllama", "timm"] = "mllama"
    vision: dict[str, Any] = field(default_factory=dict)
    encoder_checkpoint: str | None = None
    init_from: str | list[str] | None = None
    fusion_layers: list[int] = field(default_factory=list)
    fusion_gate_init: float = 0.0
    modalities: list[str] | None = None
    speech: dict[str, Any] = field(default_factory=dict)
    video: dict[str, Any] = field(default_factory=dict)
    train: list[str] | None = None
    contrastive: dict[str, Any] = field(default_factory=dict)
    lora: LoraSection | None = None

    def problems(self) -> list[str]:
        out = self.lora.problems() if self.lora is not None else []
        if self.train is not None and not self.train:
            out.append("model.train is empty: nothing would train; name at least one group (null = every group "
                       "but the LM's)")
        if self.kind == "llama" and len(self.init_runs()) > 1:
            out.append(f"model.init_from lists {len(self.init_runs())} runs: a model.kind=llama stage starts from one LM")
        llama_group = LORA_GROUP if self.lora is not None else DECODER_GROUP
        if self.kind == "llama" and self.train not in (None, [llama_group]):
            out.append(f"model.train={self.train}: a model.kind=llama stage trains its one group, {llama_group}"
                       f"{' (model.lora is set; the LM stays frozen)' if self.lora is not None else ''}; "
                       "leave model.train out")
        if self.lora is not None and self.kind == "multimodal" and self.train == [LORA_GROUP] and not self.init_from:
            out.append("model.train=[lora] with no model.init_from: the modalities would stay at their random start "
                       "and the run's adapter file (which holds only trained or loaded modalities) could not be "
                       "loaded; start from an adapter run (model.init_from), train a modality group as well, or "
                       "fine-tune the text LM alone with model.kind=llama")
        if self.lora is not None and self.kind == "speech_encoder":
            out.append("model.lora puts LoRA on an LM, but model.kind=speech_encoder has none; remove model.lora")
        out += [f"model.fusion_layers has a negative index {i}" for i in self.fusion_layers if i < 0]
        out += [f"model.modalities: unknown modality {m!r}; use image, video and/or speech"
                for m in self.modalities or [] if m not in ("image", "video", "speech")]
        if self.modalities and "video" in self.modalities and "image" not in self.modalities:
            out.append("model.modalities lists video without image: video frames go through the image modality's "
                       "encoder; list both (modalities: [image, video])")
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
    `prompt`: overrides the task's instruction (question answering: a wording with a `{question}` slot,
    e.g. "Answer the question using a single word or phrase. {question}", the paper's evaluation wording);
    `options`: further task-specific keyword arguments (``allow_special`` for ``lm``; for image and video
    question answering ``question_types: [shape]`` trains only on records whose KEY.json ``type`` is listed).
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
    `eval_every` steps between evaluations (0 = never) of the loss on `data.eval_shards` (at most
    `eval_batches` batches); `eval_metric_samples` N > 0 also scores the first N usable samples of
    `data.eval_shards` with the task's metric at each evaluation, by generating as `mm-llama eval` does (CIDEr
    for captions, VQA accuracy, WER for asr, BLEU for ast; logged as `eval/cider` ...; 0 = off);
    `max_nonfinite_in_a_row` skipped steps with a non-finite loss or gradient before the run stops; `device`
    `auto` | `cpu` | `cuda`."""

    steps: int = 1000
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    eval_every: int = 0
    eval_batches: int | None = None
    eval_metric_samples: int = 0
    max_nonfinite_in_a_row: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def problems(self) -> list[str]:
        return (_positive("train", self, ("steps", "max_nonfinite_in_a_row", "eval_batches"))
                + _non_negative("train", self, ("eval_every", "eval_metric_samples")))


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
        if self.model.lora is not None and self.data.task == "contrastive":
            out.append("model.lora puts LoRA on the LM, but data.task=contrastive trains the image encoder against "
                       "the frozen LM's caption features and saves only the encoder; remove model.lora")
        out += _metric_eval_problems(self)
        if self.schedule.warmup_steps > self.total_steps:
            out.append(f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds the schedule's "
                       f"{self.total_steps} steps; shorten the warm-up or raise schedule.total_steps / train.steps")
        return out  # group names in optim.lr / lr_multipliers / weight_decay_groups: checked against the model


def _metric_eval_problems(cfg: RecipeConfig) -> list[str]:
    """What keeps `train.eval_metric_samples` from working: no evaluation steps, no eval shards, a task
    without a generation metric."""
    n = cfg.train.eval_metric_samples
    if n <= 0:
        return []
    out = []
    if cfg.train.eval_every <= 0:
        out.append(f"train.eval_metric_samples={n} scores the model at each evaluation, but train.eval_every is "
                   f"{cfg.train.eval_every} (never); set train.eval_every to the steps between evaluations")
    if not cfg.data.eval_shards:
        out.append(f"train.eval_metric_samples={n} scores samples of data.eval_shards, which is empty; name "
                   "held-out shards of the training layout there")
    if cfg.data.task not in METRIC_TASKS:
        out.append(f"train.eval_metric_samples needs a task scored by generation ({', '.join(METRIC_TASKS)}), "
                   f"but data.task is {cfg.data.task!r}; set train.eval_metric_samples=0 (the eval loss is still "
                   "logged)" + (" or evaluate caption and vqa shards apart with mm-llama eval"
                                if cfg.data.task == "caption_vqa" else ""))
    return out


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
