"""Prompt templates per task in the Llama 3 chat format, with training labels.

Training and inference build prompts with the SAME functions: :func:`prompt_ids` is the prompt up to
and including the open assistant header (what generation is fed), :func:`build_example` appends the
response and the closing ``<|eot_id|>`` and masks everything else out of the loss.

Layout (REFERENCE.md §1, §4; content is ``strip()``-ed as Meta does)::

    <|begin_of_text|>
    [<|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>]        asr / ast; a ``system`` field
    <|start_header_id|>user<|end_header_id|>\\n\\n{media ids}{text}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                          ← end of prompt_ids
    {response}<|eot_id|>                                                       ← labelled
    [user / assistant exchanges of fields["turns"], each answer + <|eot_id|>    ← labelled]

Each task's prompt parts and response field come from the task registry (`mm_llama.data.tasks`): the
user turn is the task's ``user_field`` (``prompt`` for captions, with a default instruction; ``question``
for QA; nothing for speech), the system turn (asr / ast) names the language in ``system_field``, and the
response is ``response_field`` (``caption``, ``answer``, ``text``, ``translation``). A task without a
system template takes its system turn from ``fields["system"]`` when present (a chat record's system message).

Media ids come from :class:`~mm_llama.media_tokens.MediaTokens` and are inserted as ids (the tokenizer
need not know them): one ``<|image|>`` for the image tasks, one ``<|video|>`` for the video tasks, and
for speech the span ``[speech_start] + [speech] * n_speech_tokens + [speech_end]`` whose placeholders
the speech adapter's outputs replace (``n_speech_tokens = speech_token_count(n_frames)``). They open the
user turn, unless its text holds `IMAGE_SLOT` (a conversation record whose ``<image>`` stands inside the
question): then they stand there, ``{text before}{media ids}{text after}``, each piece stripped.

Labels are aligned with ``input_ids`` (not shifted; the loss compares the logits at ``t - 1`` with
``labels[t]``): ``IGNORE_INDEX`` (−100) on every prompt and media token, the token id itself on the
response tokens and the final ``<|eot_id|>``. A sample that would have no labelled token raises
:class:`EmptyLabelsError` (it would give a NaN loss).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mm_llama.adapters.speech_adapter import speech_token_count  # the adapter owns its geometry
from mm_llama.data.records import IMAGE_SLOT
from mm_llama.data.tasks import DEFAULT_CAPTION_PROMPT, DEFAULT_VIDEO_PROMPT, get_task, task_names
from mm_llama.data.tasks import TASKS as TASKS_BY_NAME
from mm_llama.media_tokens import MediaTokens
from mm_llama.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_CAPTION_PROMPT",
    "DEFAULT_VIDEO_PROMPT",
    "IGNORE_INDEX",
    "IMAGE_SLOT",
    "RESPONSE_FIELDS",
    "TASKS",
    "EmptyLabelsError",
    "Example",
    "asr_system_prompt",
    "ast_system_prompt",
    "build_example",
    "chat_prompt_ids",
    "language_name",
    "multiple_choice_question",
    "prompt_ids",
    "short_answer_question",
    "speech_span",
    "speech_token_count",
]

IGNORE_INDEX = -100
"""Label value that the cross-entropy loss ignores (prompt, media and padding positions)."""

TASKS = task_names(prompted=True, mixtures=False)
"""The tasks whose samples are a chat prompt + labelled response."""

RESPONSE_FIELDS: dict[str, str] = {name: str(TASKS_BY_NAME[name].response_field) for name in TASKS}
"""The field of ``fields`` that holds each task's response (the labelled text)."""


# ISO 639-1 codes → the English language names the speech system prompts use. Shard metadata often
# stores codes ("en", "fr-FR"); the paper's prompts name the language ("Repeat after me in English:").
_LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan", "cs": "Czech",
    "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fr": "French",
    "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian",
    "mt": "Maltese", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sv": "Swedish",
    "sw": "Swahili", "ta": "Tamil", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian",
    "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
}


# "en", "en-US", "pt_BR", "zh-Hant-TW": a two-letter code with optional subtags.
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2}(?:[-_][A-Za-z0-9]{2,8})*")


class EmptyLabelsError(ValueError):
    """A sample whose labels would all be −100 (empty response, or truncation cut all of it)."""


@dataclass
class Example:
    """One tokenized training sample.

    input_ids: ``[T]`` token ids (media ids included).
    labels: ``[T]``; ``IGNORE_INDEX`` on prompt / media tokens, the token id on response + ``<|eot_id|>``.
    task: the task that built it (for error messages), None when built by hand.
    media: the media ids it was built with, so collation can count media tokens; None when built by
        hand (then pass ``media=`` to the collate functions).
    """

    input_ids: list[int]
    labels: list[int]
    task: str | None = None
    media: MediaTokens | None = None

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"Example{self._where()} has {len(self.input_ids)} input ids but {len(self.labels)} labels; "
                "they must have the same length"
            )

    def _where(self) -> str:
        return f" (task {self.task!r})" if self.task else ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_labels(self) -> int:
        """How many positions are labelled (not ``IGNORE_INDEX``)."""
        return sum(1 for y in self.labels if y != IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------
# wording helpers


def short_answer_question(question: str) -> str:
    """Evaluation wording for short answers (REFERENCE.md §3).

    ``"Answer the question using a single word or phrase. {question}"``
    """
    return f"Answer the question using a single word or phrase. {_nonempty(question, 'question')}"


def multiple_choice_question(question: str) -> str:
    """Evaluation wording for multiple choice (REFERENCE.md §3); ``question`` includes the options.

    ``"Select the correct answer from the following options: {question}. Answer with the correct
    option letter and nothing else"`` (verbatim: no trailing period, question not altered).
    """
    q = _nonempty(question, "question")
    return (
        f"Select the correct answer from the following options: {q}. "
        "Answer with the correct option letter and nothing else"
    )


def language_name(language: str) -> str:
    """The language name used in speech prompts: ISO 639-1 codes (``"en"``, ``"fr-FR"``, ``"pt_br"``)
    become English names (``"English"``, ``"French"``, ``"Portuguese"``); anything else is used as
    given (stripped), so ``"English"`` stays ``"English"``."""
    name = _nonempty(language, "language")
    if _LANGUAGE_TAG.fullmatch(name):
        code = name[:2].lower()
        if code in _LANGUAGE_NAMES:
            return _LANGUAGE_NAMES[code]
    return name


def asr_system_prompt(language: str) -> str:
    """``Repeat after me in {language}:`` (REFERENCE.md §4)."""
    return str(get_task("asr").system_template).format(language_name(language))


def ast_system_prompt(target_language: str) -> str:
    """``Translate the following sentence into {language}:`` — target language only (REFERENCE.md §4)."""
    return str(get_task("ast").system_template).format(language_name(target_language))


def speech_span(media: MediaTokens, n_speech_tokens: int) -> list[int]:
    """``[speech_start] + [speech] * n + [speech_end]``: the ids the adapter outputs replace."""
    if isinstance(n_speech_tokens, bool) or not isinstance(n_speech_tokens, int) or n_speech_tokens < 1:
        raise ValueError(
            f"n_speech_tokens must be a positive int, got {n_speech_tokens!r}; "
            "use speech_token_count(n_frames) for the features of the clip"
        )
    return [media.speech_start] + [media.speech] * n_speech_tokens + [media.speech_end]


# --------------------------------------------------------------------------------------------------
# templates


def prompt_ids(tok: Tokenizer, media: MediaTokens, task: str, fields: Mapping[str, Any]) -> list[int]:
    """The prompt of ``task`` up to and including the open assistant header (what inference feeds).

    For ``caption`` / ``vqa`` this equals ``mm_llama.image_chat.image_prompt(tok, text, media.image,
    chat=True)``. Raises ValueError for an unknown task or a missing / non-string prompt field.
    """
    system, media_ids, text = _prompt_parts(media, task, fields)
    return chat_prompt_ids(tok, media, media_ids, text, system=system)


def chat_prompt_ids(tok: Tokenizer, media: MediaTokens, media_ids: list[int], text: str = "", *,
                    system: str | None = None) -> list[int]:
    """One user turn holding ``media_ids`` then ``text`` (or ``media_ids`` where ``text`` holds `IMAGE_SLOT`),
    with an optional system turn before it, up to and including the open assistant header: the layout every
    task's prompt has (module docstring). Used as is for prompts no single task describes, such as an image
    with a spoken question."""
    media.check_tokenizer(tok)
    ids = [tok.bos_id]
    if system is not None:
        ids += tok.encode_message("system", system)
    ids += tok.encode_header("user") + _user_content(tok, media_ids, text)
    ids += [tok.eot_id] + tok.encode_header("assistant")
    return ids


def _user_content(tok: Tokenizer, media_ids: list[int], text: str) -> list[int]:
    """A user turn's content: ``media_ids`` then the stripped ``text``; when ``text`` holds one `IMAGE_SLOT`,
    the text before it, ``media_ids``, the text after it (each piece stripped, a blank one left out)."""
    if text.count(IMAGE_SLOT) > 1:
        raise ValueError(f"the user text holds {text.count(IMAGE_SLOT)} image slots (U+FFFC); a prompt has one image")
    before, slot, after = text.partition(IMAGE_SLOT)
    if not slot:
        before, after = "", text
    return _plain(tok, before) + list(media_ids) + _plain(tok, after)


def _plain(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text.strip()) if text.strip() else []


def build_example(
    tok: Tokenizer,
    media: MediaTokens,
    task: str,
    fields: Mapping[str, Any],
    *,
    max_len: int | None = None,
) -> Example:
    """Prompt + response + ``<|eot_id|>`` with labels on the response and the eot only; a conversation
    (``fields["turns"]``: later ``(question, answer)`` pairs) continues with one user / assistant exchange
    per pair, each answer and its ``<|eot_id|>`` labelled. Only the first question may hold `IMAGE_SLOT`.

    ``max_len`` (optional) truncates to at most that many tokens: the prompt is kept whole and the
    response is cut (its ``<|eot_id|>`` first). Raises :class:`EmptyLabelsError` when the response is
    empty or nothing of it survives truncation, ValueError for an unknown task / missing field.
    """
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
    prompt = prompt_ids(tok, media, task, fields)
    field = RESPONSE_FIELDS[task]
    response_text = _text_field(fields, field, task).strip()
    if not response_text:
        raise EmptyLabelsError(
            f"task {task!r}: fields[{field!r}] is empty, so the sample has no labelled token; "
            "drop samples without a response"
        )
    response = tok.encode(response_text) + [tok.eot_id]
    if max_len is not None and len(prompt) + len(response) > max_len:
        keep = max_len - len(prompt)
        if keep <= 0:
            raise EmptyLabelsError(
                f"task {task!r}: the prompt alone is {len(prompt)} tokens, max_len={max_len} leaves no room "
                f"for the {len(response)}-token response; raise max_len or drop the sample"
            )
        response = response[:keep]
    input_ids, labels = prompt + response, [IGNORE_INDEX] * len(prompt) + list(response)
    for question, answer in fields.get("turns") or ():  # a conversation: later exchanges, whole or not at all
        question = _nonempty(question, "question")
        if IMAGE_SLOT in question:
            raise ValueError(f"task {task!r}: a later question holds the image slot (U+FFFC); the image's place "
                             f"is in the first question, got {question!r:.80}")
        asked = tok.encode_header("user") + tok.encode(question) + [tok.eot_id] \
            + tok.encode_header("assistant")
        answered = tok.encode(_nonempty(answer, "answer")) + [tok.eot_id]
        if max_len is not None and len(input_ids) + len(asked) + len(answered) > max_len:
            break
        input_ids += asked + answered
        labels += [IGNORE_INDEX] * len(asked) + answered
    return Example(input_ids=input_ids, labels=labels, task=task, media=media)


# --------------------------------------------------------------------------------------------------
# internals


def _prompt_parts(media: MediaTokens, task: str, fields: Mapping[str, Any]) -> tuple[str | None, list[int], str]:
    """``(system text or None, media ids, user text)`` of ``task`` (its registry entry says which fields)."""
    if not isinstance(fields, Mapping):
        raise ValueError(f"task {task!r}: fields must be a mapping (dict), got {type(fields).__name__}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    spec = get_task(task)
    system = None
    if spec.system_template is not None:
        system = spec.system_template.format(language_name(_required_text(fields, str(spec.system_field), task)))
    elif fields.get("system") is not None:
        system = _required_text(fields, "system", task)
    if spec.modality == "speech":
        media_ids = speech_span(media, _speech_tokens(fields, task))
    else:
        media_ids = [media.image if spec.modality == "image" else media.video]
    text = ""
    if spec.user_field is not None:
        text = (_optional_text(fields, spec.user_field, task, spec.user_default) if spec.user_default is not None
                else _required_text(fields, spec.user_field, task))
    return system, media_ids, text


def _text_field(fields: Mapping[str, Any], name: str, task: str) -> str:
    value = fields.get(name)
    if value is None:
        raise ValueError(
            f"task {task!r} needs field {name!r} (a string); got fields {sorted(fields)}"
        )
    if not isinstance(value, str):
        raise ValueError(f"task {task!r}: field {name!r} must be a string, got {type(value).__name__} {value!r:.80}")
    return value


def _required_text(fields: Mapping[str, Any], name: str, task: str) -> str:
    value = _text_field(fields, name, task)
    if not value.strip():
        raise ValueError(f"task {task!r}: field {name!r} is empty")
    return value


def _optional_text(fields: Mapping[str, Any], name: str, task: str, default: str) -> str:
    if fields.get(name) is None:
        return default
    value = _text_field(fields, name, task)
    if not value.strip():
        raise ValueError(f"task {task!r}: field {name!r} is empty; leave it out to use the default {default!r}")
    return value


def _speech_tokens(fields: Mapping[str, Any], task: str) -> int:
    n = fields.get("n_speech_tokens")
    if n is None:
        raise ValueError(
            f"task {task!r} needs field 'n_speech_tokens' (speech_token_count(n_frames) of the clip's "
            f"features); got fields {sorted(fields)}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"task {task!r}: field 'n_speech_tokens' must be a positive int, got {n!r}")
    return n


def _nonempty(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError(f"{what} is empty")
    return text


