"""The task registry: every task named once, with the modality its samples carry, the shard layouts it
reads, its record reader, its prompt parts and its response field. Prompts (`data.prompts`), loaders
(`data.pipelines`), training steps, recipes, evaluation, `bench` and the demo all read it.

=================  ==============  ========  ===================================  =================================
task               family          modality  user turn / system turn              response (record reader)
=================  ==============  ========  ===================================  =================================
``caption``        image_text      image     ``prompt`` (default instruction)     ``caption`` (`read_caption`)
``vqa``            image_text      image     ``question``                         ``answer`` (`read_question_answer`)
``caption_vqa``    image_text      image     per record: vqa if KEY.json has a question or conversation, else caption
``video_caption``  video_text      video     ``prompt`` (default instruction)     ``caption``
``video_qa``       video_text      video     ``question``                         ``answer``
``asr``            audio_text      speech    system: Repeat after me in {lang}:   ``text`` (`read_transcript`)
``ast``            audio_text      speech    system: Translate … into {lang}:     ``translation`` (`read_translation`)
``best_rq``        speech_pretrain speech    the audio only (KEY.flac / …; no text needed)
``lm``             text            —         packed documents (KEY.txt / corpus files)
``contrastive``    contrastive     image     image–caption pairs (`read_caption`)
=================  ==============  ========  ===================================  =================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mm_llama.data.records import (
    CHAT_FIELDS, Record, RecordError, read_caption, read_question_answer, read_transcript, read_translation,
)

__all__ = [
    "DEFAULT_CAPTION_PROMPT", "DEFAULT_VIDEO_PROMPT", "FAMILIES", "TASKS", "TaskSpec", "get_task", "task_names",
]

DEFAULT_CAPTION_PROMPT = "Describe this image in one sentence."
"""Instruction of the ``caption`` task (the same text as ``mm_llama.image_chat``'s default)."""

DEFAULT_VIDEO_PROMPT = "Describe this video in one sentence."
"""Instruction of the ``video_caption`` task."""

FAMILIES = ("image_text", "video_text", "audio_text", "speech_pretrain", "text", "contrastive")


@dataclass(frozen=True)
class TaskSpec:
    """One task.

    `family`: which loader and training step serve it; `modality`: the modality whose media its samples
    carry (None: text only); `layouts`: the shard layouts it reads (data/LAYOUTS.md). Prompt parts:
    `user_field` (the fields entry that is the user turn's text; `user_default` when that entry may be
    left out), `system_template` formatted with the language named by `system_field`. `response_field`:
    the labelled fields entry. `reader(text, meta, **options)` turns KEY.txt / KEY.json into a `Record`.
    `parts` (a mixture): the tasks a record may be, the first whose `accepts(meta)` says yes.
    """

    name: str
    family: str
    modality: str | None
    layouts: tuple[str, ...]
    response_field: str | None = None
    user_field: str | None = None
    user_default: str | None = None
    system_template: str | None = None
    system_field: str | None = None
    reader: Callable[..., Record] | None = None
    parts: tuple[str, ...] = ()
    accepts: Callable[[Mapping[str, Any]], bool] | None = None
    evaluated: bool = False

    @property
    def prompted(self) -> bool:
        """Whether samples become a chat prompt + labelled response (`data.prompts.build_example`)."""
        return self.response_field is not None

    def resolve(self, meta: Mapping[str, Any]) -> TaskSpec:
        """The task a record of this one is: itself, or for a mixture the first part that accepts it."""
        if not self.parts:
            return self
        for name in self.parts:
            part = TASKS[name]
            if part.accepts is None or part.accepts(meta):
                return part
        raise RecordError("bad_field", f"no part of {self.name} ({', '.join(self.parts)}) takes this record")

    def read(self, text: str | None, meta: Mapping[str, Any], **options: Any) -> Record:
        """The record's fields and references (a mixture reads it as the part it is)."""
        task = self.resolve(meta)
        if task.reader is None:
            raise ValueError(f"task {self.name!r} reads no records")
        return task.reader(text, meta, **options)


_QA_FIELDS = ("question", "turns", *CHAT_FIELDS)
"""KEY.json fields that make a record a VQA one (for the ``caption_vqa`` mixture)."""

_SPECS = (
    TaskSpec("caption", "image_text", "image", ("image-caption",), "caption", user_field="prompt",
             user_default=DEFAULT_CAPTION_PROMPT, reader=read_caption, evaluated=True),
    TaskSpec("vqa", "image_text", "image", ("image-qa",), "answer", user_field="question",
             reader=read_question_answer, accepts=lambda meta: any(k in meta for k in _QA_FIELDS), evaluated=True),
    TaskSpec("caption_vqa", "image_text", "image", ("image-qa", "image-caption"), parts=("vqa", "caption")),
    TaskSpec("video_caption", "video_text", "video", ("video-caption",), "caption", user_field="prompt",
             user_default=DEFAULT_VIDEO_PROMPT, reader=read_caption),
    TaskSpec("video_qa", "video_text", "video", ("video-qa",), "answer", user_field="question",
             reader=read_question_answer),
    TaskSpec("asr", "audio_text", "speech", ("speech",), "text", system_template="Repeat after me in {}:",
             system_field="language", reader=read_transcript, evaluated=True),
    TaskSpec("ast", "audio_text", "speech", ("speech",), "translation",
             system_template="Translate the following sentence into {}:", system_field="target_language",
             reader=read_translation, evaluated=True),
    TaskSpec("best_rq", "speech_pretrain", "speech", ("speech",)),
    TaskSpec("lm", "text", None, ("text",)),
    TaskSpec("contrastive", "contrastive", "image", ("image-caption",), reader=read_caption),
)
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}


def get_task(name: str) -> TaskSpec:
    """The registered task `name`; a ValueError listing the tasks otherwise."""
    spec = TASKS.get(name)
    if spec is None:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return spec


def task_names(*families: str, prompted: bool | None = None, mixtures: bool = True) -> tuple[str, ...]:
    """Registered task names of `families` (all when none given), in registry order; `prompted` keeps only
    tasks with (True) or without (False) a chat prompt; `mixtures=False` drops mixtures."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; expected {list(FAMILIES)}")
    return tuple(s.name for s in _SPECS
                 if (not families or s.family in families)
                 and (prompted is None or s.prompted == prompted)
                 and (mixtures or not s.parts))
