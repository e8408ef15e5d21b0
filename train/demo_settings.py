"""The numbers of the built-in demo (`mm_llama.train.demo`): data sizes, per-stage recipe overrides,
evaluation sizes, and their validation.

`DemoSettings` is the one place to tune the demo; `DemoSettings.quick()` is a smoke run. Recipe overrides
are dotted keys → values (``{"train.steps": 100, "optim.lr": 3e-4}``) applied on top of the built-in
``tiny_*`` recipes and of the paths the demo fills in.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mm_llama.data.synth.shapes import LAYOUTS as SHAPES_LAYOUTS
from mm_llama.data.synth.speech_span_text import FILLER
from mm_llama.data.tasks import TASKS, task_names

__all__ = ["MODALITIES", "AdapterStage", "DemoError", "DemoSettings", "Overrides", "check_modalities",
           "override_args"]

MODALITIES: tuple[str, ...] = ("image", "video", "speech")
"""What the demo can train, in the order it runs them (video starts from the image run)."""

TASK_LAYOUTS: dict[str, tuple[str, ...]] = {name: TASKS[name].layouts for name in task_names("image_text")}
"""The shapes layouts whose train shards an adapter stage of each ``data.task`` reads (the registry's)."""

DATA_DIR = "data"
TOKENIZER_DIR = "tokenizer"
LM_RUN = "lm"
ENCODER_RUN = "encoder"
VIDEO_RUN = "video"
SPEECH_ENCODER_RUN = "speech-encoder"
SPEECH_RUN = "speech"
EVAL_DIR = "eval"

RESERVED_NAMES = frozenset({DATA_DIR, TOKENIZER_DIR, LM_RUN, ENCODER_RUN, EVAL_DIR, "report", VIDEO_RUN, SPEECH_RUN,
                            SPEECH_ENCODER_RUN})
"""Folder names the demo uses itself (an adapter stage may not take one); ``report`` is kept free for the report."""

Overrides = dict[str, Any]
"""Recipe overrides: dotted key → value (``{"train.steps": 100, "optim.lr": 3e-4}``)."""


class DemoError(ValueError):
    """A demo that cannot run as asked (bad settings, an existing output folder, changed settings)."""


def check_modalities(modalities: Iterable[str]) -> tuple[str, ...]:
    """The requested modalities in run order, without repeats; DemoError for an unknown or empty choice."""
    chosen = list(dict.fromkeys(modalities))
    unknown = [m for m in chosen if m not in MODALITIES]
    if unknown or not chosen:
        raise DemoError(f"modalities must be a non-empty subset of {', '.join(MODALITIES)}, got "
                        f"{','.join(chosen) or 'nothing'}")
    return tuple(m for m in MODALITIES if m in chosen)


@dataclass
class AdapterStage:
    """One image-adapter training run of the demo.

    name: its run folder ``OUT/<name>`` (and its stage name). task: ``data.task`` (``vqa``, ``caption``
    or ``caption_vqa``), which also picks the shapes layouts it trains on (`TASK_LAYOUTS`). overrides:
    recipe overrides on top of the demo's (paths, task). init_from: the name of an earlier adapter stage
    whose trained weights start this one (``model.init_from=OUT/<that stage>``). recipe: the built-in
    recipe (or a YAML path) it runs. layouts: the shapes layouts it trains on, when not the task's
    (``("image-chat",)``: each image's questions and caption as one conversation, task ``vqa``).
    """

    name: str
    task: str = "vqa"
    overrides: Overrides = field(default_factory=dict)
    init_from: str | None = None
    recipe: str = "tiny_vision_pretrain"
    layouts: tuple[str, ...] | None = None

    def train_layouts(self) -> tuple[str, ...]:
        """The shapes layouts it trains on: `layouts`, else the task's (`TASK_LAYOUTS`)."""
        return self.layouts if self.layouts is not None else TASK_LAYOUTS[self.task]


def _default_vision() -> Overrides:
    # a convolutional stem (16-32-64-96 channels down to the 8 x 8 grid, then two 96-channel 3 x 3 layers) with
    # the tile's mean colour per patch added back (stem_pixel_path mean): per-object shape probed 67 % on the
    # objects encoder where the linear 16-px patches gave 35-47 %, and colour stays at 97 % (issue 12's notes)
    return {"model.vision.stem_channels": [16, 32, 64, 96, 96, 96], "model.vision.stem_strides": [2, 2, 2, 2, 1, 1],
            "model.vision.stem_pixel_path": "mean"}


def _default_encoder() -> Overrides:
    # objects captions name each shape with its size and place but no colour, so colour cannot tell a batch's
    # captions apart and the contrastive loss has to learn shape; max-pooled patches keep one small object's
    # features; the ViT at 1e-3 (issue 12's notes: 200 steps x 64, per-object shape probe 67.1 %). 300 steps:
    # the demo's shape 52.7 % where 200 gave 40.1 % (120: 23.4 %), the best use of 40 s found
    return {"train.steps": 300, "checkpoint.every": 300, "data.batch_size": 64, "model.contrastive.pool": "max",
            "optim.lr_multipliers": {"image.encoder": 0.5}}


FROZEN_ENCODER: Overrides = {"model.train": ["image.fusion"]}
"""The adapter stages train the projector and cross-attention only: the contrastively trained encoder stays
as it is. Trained along (at 3e-4), it lost shape within the first adapter steps: shape 17.5-24.5 % against
20-21.5 % with blank images; frozen, 33.5 % (issue 12's notes)."""


def _default_adapter_stages() -> list[AdapterStage]:
    # first the shape and colour questions alone (which object is which: they need the encoder's finest
    # features, and among the other questions the easy global ones win the early steps), then the
    # conversations: image-chat, one conversation per image (its ~6 questions shuffled, then its caption), task
    # vqa. Conversations alone reached shape 33.5 % (blank 21.5 %); shape questions first 43.7 % but colour fell
    # to 48.5 %; shape and colour first, shape 42.5 % and colour 62.9 % (issue 12's notes, 2026-12-05). With
    # the encoder at 300 steps, 200 + 250 adapter steps pay for its 40 s: VQA 68.5 %, shape 56.3 % (blank 11.4 %)
    # against 68.7 % / 52.7 % with 300 + 300
    return [AdapterStage("shape", task="vqa", layouts=("image-qa",),
                         overrides={**FROZEN_ENCODER, "data.options": {"question_types": ["shape", "colour"]},
                                    "data.batch_size": 32, "train.steps": 200, "checkpoint.every": 200}),
            AdapterStage("vision", task="vqa", layouts=("image-chat",), init_from="shape",
                         overrides={**FROZEN_ENCODER, "data.batch_size": 32, "train.steps": 250,
                                    "checkpoint.every": 125})]


def _default_lm() -> Overrides:
    # rows of 256 tokens hold a whole stretched ASR exchange (a speech span of up to ~150 positions). Copying a
    # held-out transcript out of a stretched user turn (text only, 100 transcripts) is update-bound: 40.8 % WER
    # after 400 steps of 16 rows, 19.4 % after 800, 6.2 % after 1,600 steps of 8 rows (164 s; lr 5e-3 there:
    # 16.9 %, 1,200 steps: 22.4 %; issue 18's notes, 2026-12-05)
    return {"model.text.max_seq_len": 512, "data.max_seq_len": 256, "data.batch_size": 8, "train.steps": 1600}


def _default_speech() -> Overrides:
    # the CTC aid with the stretched exchanges' filler as its blank (`mm_llama.train.speech_ctc`): held-out WER
    # 44.4 % after 800 steps, 30.3 % after 1,200 (the same LM), where the answer loss alone gave 81.9-91.3 %
    # (issue 18's notes, 2026-12-05)
    return {"model.speech.ctc": {"blank": FILLER, "weight": 1.0, "scale": 30.0}, "train.steps": 1200,
            "checkpoint.every": 600}


def _default_video() -> Overrides:
    # the demo's LM learned questions as plain chat exchanges (the text kind), so the clips are asked the
    # same way: data.prompt null sends the question as written. 4 frames merged into one aggregated frame at
    # lr 4e-3 for 500 steps: held-out 61.7 % (frozen frames 44.0 %; turn 82.5 % against 1.8 %) where the
    # recipe's 8 frames at 2e-3 for 300 steps gave 52.3 % (43.8 %) in about the same time (issue 18's notes).
    # Through the conv-stem objects encoder (2026-12-05, 300 encoder steps): 64.7 % (47.2 %), direction 100 %
    # where it was 28.3 %, turn / end colour 46 / 45 % where they were 88 / 87 %
    return {"data.prompt": None, "data.num_frames": 4, "optim.lr": 4e-3, "train.steps": 500,
            "model.video": {"aggregator": {"preset": "tiny", "group_size": 4}, "fusion_layers": [1, 3]}}


@dataclass
class DemoSettings:
    """Everything the demo's stages use (the one place to tune it).

    seed: synthetic data seed. train_images / test_images: shapes images of the train / test split (the
    image-qa layout holds about 6 questions per image). square_images: render them all square (the shapes
    kind's ``square`` option): the tiny ViT sees one tile, and mixed aspect ratios would letterbox it and
    move every grid position to other pixels per image size. text_documents: text documents for the LM.
    samples_per_shard: records per shard file. vocab_size: the tokenizer's base BPE vocabulary (the 256
    Llama 3 special tokens come on top). encoder_images: ``objects`` images (one shape each, captioned
    without its colour) the encoder stage learns from. vision: ``model.vision.*`` overrides, the image
    backbone of the encoder, adapter and video stages (one backbone: the encoder's weights load into the
    others). lm / encoder: recipe overrides of the ``tiny_lm_pretrain`` / ``tiny_image_encoder_pretrain``
    stages. adapter_stages: the image-adapter runs, in order (evaluation and the video stage use the last).

    video_train_clips / video_test_clips: ``moving-shapes`` clips per split. video: overrides of the
    ``tiny_video_pretrain`` stage. speech_train_utterances / speech_test_utterances: ``speech`` utterances
    per split (the test split's voices and sentences never occur in train); their train transcripts also
    go to the LM as ASR exchanges, so the frozen LM knows how to answer the ASR prompt. speech_pretrain:
    overrides of a ``tiny_speech_bestrq`` stage that pretrains the Conformer first (None: no such stage).
    asr_text_copies: how many times each of those exchanges is written, each with its transcript stretched over
    the user turn differently, the way a speech span lays it out (`speech_span_text`; 0: once, with an empty user
    turn). speech_silent_clips: silent training clips (transcribed "."), and as many stretched silent exchanges
    per copy in the LM's text. speech: overrides of the ``tiny_speech_sft`` stage.

    eval_vqa_samples / eval_caption_samples / eval_video_samples / eval_speech_samples: test questions,
    captions, clip questions and utterances scored (None: the whole test split). eval_batch_size:
    generation batch. report_samples: test images, clips and utterances shown in the report (each).
    """

    seed: int = 0
    train_images: int = 4000
    test_images: int = 200
    square_images: bool = True
    text_documents: int = 5000
    samples_per_shard: int = 1000
    vocab_size: int = 1024
    encoder_images: int = 4000
    vision: Overrides = field(default_factory=_default_vision)
    lm: Overrides = field(default_factory=_default_lm)
    encoder: Overrides = field(default_factory=_default_encoder)
    adapter_stages: list[AdapterStage] = field(default_factory=_default_adapter_stages)
    video_train_clips: int = 1500
    video_test_clips: int = 200
    video: Overrides = field(default_factory=_default_video)
    # 4,000 (and 200 silent clips) made the encoder's own CTC decode better (33.2 % WER against 38.6 %) but not
    # the transcripts (39.4 % against 38.1 % in a lab run with 2,000; 20 s more of data; issue 18's notes)
    speech_train_utterances: int = 2000
    speech_test_utterances: int = 200
    asr_text_copies: int = 3
    # 5 % silent clips: without them the silence control answered with a guessed sentence (6 words on average);
    # with them, nothing (helper calibration 2026-12-05, 4,000 utterances + 200 silent: 100 of 100 silent). An LM
    # that learned to copy stretched spans but never an empty one answered 64 of 200 silences with words
    speech_silent_clips: int = 100
    speech_pretrain: Overrides | None = None
    speech: Overrides = field(default_factory=_default_speech)
    eval_vqa_samples: int | None = 1000
    eval_caption_samples: int | None = 200
    eval_video_samples: int | None = 1000
    eval_speech_samples: int | None = 200
    eval_batch_size: int = 16
    report_samples: int = 12

    @classmethod
    def quick(cls) -> DemoSettings:
        """A smoke-test configuration: a few samples and documents, a handful of steps per stage (seconds
        on one CPU thread; the numbers it reports mean nothing)."""
        small = {"train.steps": 3, "checkpoint.every": 3, "logging.every": 1, "schedule.warmup_steps": 1,
                 "data.batch_size": 4, "data.shuffle_buffer": 8}
        return cls(
            train_images=8, test_images=4, encoder_images=8, text_documents=40, samples_per_shard=32, vocab_size=300,
            lm={**small, "data.max_seq_len": 64, "model.text.max_seq_len": 512},
            encoder={**_default_encoder(), **small},
            adapter_stages=[AdapterStage(stage.name, stage.task, {**stage.overrides, **small}, stage.init_from,
                                         stage.recipe, stage.layouts) for stage in _default_adapter_stages()],
            video_train_clips=4, video_test_clips=2, video={**_default_video(), **small},
            speech_train_utterances=4, speech_test_utterances=2, speech_silent_clips=2, speech_pretrain={**small},
            speech={**_default_speech(), **small},
            eval_vqa_samples=8, eval_caption_samples=4, eval_video_samples=4, eval_speech_samples=2,
            eval_batch_size=4, report_samples=2,
        )

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they can run)."""
        out = []
        for name in ("train_images", "test_images", "encoder_images", "text_documents", "samples_per_shard", "eval_batch_size",
                     "report_samples", "video_train_clips", "video_test_clips", "speech_train_utterances",
                     "speech_test_utterances"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                out.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("speech_silent_clips", "asr_text_copies"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                out.append(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("eval_vqa_samples", "eval_caption_samples", "eval_video_samples", "eval_speech_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                out.append(f"{name} must be a positive integer or None (the whole test split), got {value!r}")
        if not isinstance(self.square_images, bool):
            out.append(f"square_images must be true or false, got {self.square_images!r}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 257:
            out.append(f"vocab_size must be an integer >= 257 (256 bytes + merges), got {self.vocab_size!r}")
        for name in ("vision", "lm", "encoder", "video", "speech"):
            out += _override_problems(name, getattr(self, name))
        if isinstance(self.vision, dict):
            out += [f"vision: key {k!r} is not under model.vision. (the image backbone)" for k in self.vision
                    if isinstance(k, str) and not k.startswith("model.vision.")]
        if self.speech_pretrain is not None:
            out += _override_problems("speech_pretrain", self.speech_pretrain)
        return out + self._adapter_problems()

    def _adapter_problems(self) -> list[str]:
        if not self.adapter_stages:
            return ["adapter_stages is empty: add at least one AdapterStage (evaluation uses the last)"]
        out: list[str] = []
        seen: list[str] = []
        for i, stage in enumerate(self.adapter_stages):
            where = f"adapter_stages[{i}] ({stage.name!r})"
            if not isinstance(stage.name, str) or not stage.name or "/" in stage.name or stage.name.startswith("."):
                out.append(f"{where}: name must be a plain folder name")
            elif stage.name in RESERVED_NAMES or stage.name in seen or stage.name.startswith(("eval-", "data-")):
                out.append(f"{where}: name is taken (by the demo: {sorted(RESERVED_NAMES)}, eval-*, data-*, or an "
                           "earlier stage)")
            if stage.task not in TASK_LAYOUTS:
                out.append(f"{where}: task must be one of {list(TASK_LAYOUTS)}, got {stage.task!r}")
            if stage.layouts is not None and (not stage.layouts or not set(stage.layouts) <= set(SHAPES_LAYOUTS)):
                out.append(f"{where}: layouts must be shapes layouts {list(SHAPES_LAYOUTS)}, got {stage.layouts!r}")
            if stage.init_from is not None and stage.init_from not in seen:
                out.append(f"{where}: init_from {stage.init_from!r} is not an earlier adapter stage ({seen or 'none'})")
            out += _override_problems(f"{where}.overrides", stage.overrides)
            seen.append(stage.name)
        return out

    def validate(self) -> DemoSettings:
        """Raise `DemoError` listing every problem; return self."""
        issues = self.problems()
        if issues:
            raise DemoError("invalid demo settings:\n  " + "\n  ".join(issues))
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the state file and metrics.json)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _override_problems(where: str, overrides: Any) -> list[str]:
    if not isinstance(overrides, dict):
        return [f"{where} must be a dict of dotted recipe keys to values, got {overrides!r:.80}"]
    out = [f"{where}: key {k!r} is not a dotted recipe key such as 'train.steps'"
           for k in overrides if not isinstance(k, str) or not k or "=" in k]
    for key, value in overrides.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            out.append(f"{where}: the value of {key!r} ({value!r:.80}) is not plain data (numbers, strings, bools, "
                       "None, lists, dicts)")
    return out


def override_args(overrides: Overrides) -> list[str]:
    """``{"train.steps": 3, "data.shards": ["a.tar"]}`` → ``["train.steps=3", 'data.shards=["a.tar"]']``
    for `load_recipe` (values as JSON, which its YAML reader reads back unchanged)."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
