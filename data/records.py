"""Record readers: a sample's ``KEY.txt`` / ``KEY.json`` → the fields a task's prompt and response need,
plus every reference response. Training and evaluation read records with these same functions (layouts:
[data/LAYOUTS.md](LAYOUTS.md)); training labels the first reference, evaluation scores against all.

A record that cannot be used raises :class:`RecordError` with a skip ``reason`` (``missing_field``,
``bad_field``, ``no_translation``, ``empty_labels``) that the loaders count by.

Conversations about one image come in three forms, all read into the same fields (`read_question_answer`):
our ``turns``, LLaVA / ShareGPT ``conversations`` (``{"from": "human" | "gpt" | "user" | "assistant" |
"system", "value": STR}``) and OpenAI / Hugging Face chat ``messages`` (``{"role", "content": STR or a list
of text / image parts}``). In the latter two the image's place is the ``<image>`` marker (`IMAGE_MARKER`) in a
user text or the image part of a content list; it becomes `IMAGE_SLOT` in the first question, where
`data.prompts` puts the ``<|image|>`` token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHAT_FIELDS", "IMAGE_MARKER", "IMAGE_SLOT", "EmptyReferenceError", "Record", "RecordError", "read_caption",
    "read_question_answer", "read_transcript", "read_translation",
]

CHAT_FIELDS = ("conversations", "messages")
"""KEY.json fields that hold a conversation in a public format: LLaVA / ShareGPT, OpenAI / Hugging Face chat."""

IMAGE_MARKER = "<image>"
"""Where a ``conversations`` / ``messages`` user text puts the record's image (LLaVA's marker; an image part of
a ``messages`` content list counts as one)."""

IMAGE_SLOT = "\ufffc"
"""U+FFFC OBJECT REPLACEMENT CHARACTER: the image's place inside a ``question`` read from a conversation
record; `data.prompts` puts the media ids there instead of before the text. Never in a question as written:
a record whose text holds it is skipped (``bad_field``)."""


class RecordError(ValueError):
    """A record a task cannot use; ``reason`` names the skip counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class EmptyReferenceError(RecordError):
    """The reference response is empty or whitespace: no token to label, so training and evaluation both
    skip the record (evaluation counts it as ``empty_references``)."""

    def __init__(self, message: str) -> None:
        super().__init__("empty_labels", message)


@dataclass(frozen=True)
class Record:
    """`fields`: what the task's prompt needs plus its response field (the training target);
    `references`: every reference response, stripped, the target first; `qtype`: the question type a
    VQA record states (``type`` / ``question_type``), else None; `extra`: other per-record facts
    (``image_key``)."""

    fields: dict[str, Any]
    references: tuple[str, ...]
    qtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _string(meta: Mapping[str, Any], name: str) -> str:
    value = meta.get(name)
    if value is None:
        raise RecordError("missing_field", f"no {name!r} in KEY.json (it has {sorted(meta)})")
    if not isinstance(value, str):
        raise RecordError("bad_field", f"{name!r} in KEY.json must be a string, got {type(value).__name__}")
    return value


def read_caption(text: str | None, meta: Mapping[str, Any]) -> Record:
    """Caption from a non-empty ``KEY.txt``, else ``caption`` in KEY.json; a ``captions`` list in KEY.json
    adds references (img2dataset and COCO-style records)."""
    refs: list[str] = []
    if text is not None and text.strip():
        refs.append(text.strip())
    elif meta.get("caption") is not None:
        refs.append(_string(meta, "caption").strip())
    extra = meta.get("captions")
    if isinstance(extra, list):
        refs += [c.strip() for c in extra if isinstance(c, str) and c.strip() and c.strip() not in refs]
    refs = [r for r in refs if r]
    if not refs:
        if text is not None or meta.get("caption") is not None:
            raise EmptyReferenceError("the reference caption is empty (no labelled token)")
        raise RecordError("missing_field",
                          "no caption: expected a non-empty KEY.txt, a 'caption' or a 'captions' list in KEY.json")
    return Record({"caption": refs[0]}, tuple(refs))


def _answers(meta: Mapping[str, Any]) -> tuple[str, ...]:
    """The answers of one question, the training target first: ``answer``, or an ``answers`` list (strings
    or VQA v2's ``{"answer": …}`` objects) whose most frequent answer is the target (the first of equally
    frequent ones); all of them are references, with the counts VQA scoring uses."""
    answers = meta.get("answers")
    refs: list[str] = []
    if meta.get("answer") is None and isinstance(answers, list) and answers:
        for a in answers:
            value = a.get("answer") if isinstance(a, Mapping) else a
            if not isinstance(value, str):
                raise RecordError("bad_field", "'answers' in KEY.json must hold strings or {'answer': str} objects, "
                                               f"got {a!r:.80}")
            refs.append(value.strip())
    else:
        refs.append(_string(meta, "answer").strip())
    refs = [r for r in refs if r]
    if not refs:
        raise EmptyReferenceError("the reference answer is empty (no labelled token)")
    counts = Counter(refs)
    target = max(dict.fromkeys(refs), key=lambda r: counts[r])  # first of the most frequent
    rest = list(refs)
    rest.remove(target)  # one occurrence moves to the front; the counts VQA scoring uses stay as they were
    return (target, *rest)


def _question(meta: Mapping[str, Any]) -> str:
    question = _string(meta, "question")
    if not question.strip():
        raise RecordError("bad_field", "'question' in KEY.json is empty")
    if IMAGE_SLOT in question:
        raise RecordError("bad_field", "'question' in KEY.json holds U+FFFC, the character that marks the image's "
                                       f"place; write the question without it, got {question!r:.80}")
    return question


def _facts(meta: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(qtype, extra)`` of a VQA record: its ``type`` / ``question_type`` and its ``image_key``."""
    qtype = meta.get("type", meta.get("question_type"))
    image_key = meta.get("image_key")
    return (qtype if isinstance(qtype, str) and qtype.strip() else None,
            {"image_key": image_key} if isinstance(image_key, str) and image_key else {})


def read_question_answer(text: str | None, meta: Mapping[str, Any]) -> Record:
    """``question`` and ``answer`` (or ``answers``, see `_answers`) from KEY.json.

    A conversation about one image is ``turns``: a list of such ``{question, answer | answers}`` objects,
    asked in order in one sequence (each answer labelled). The first turn is the record's question and
    references (what evaluation scores); the later ones are ``fields["turns"]`` as ``(question, target)``
    pairs, which `data.prompts.build_example` appends as further user / assistant exchanges. A LLaVA
    ``conversations`` or chat ``messages`` list is read into the same fields (`_read_chat`), plus
    ``fields["system"]`` when it opens with a system message. A record holds at most one of the three.
    """
    present = [name for name in ("turns", *CHAT_FIELDS) if meta.get(name) is not None]
    if len(present) > 1:
        raise RecordError("bad_field", f"KEY.json holds {present}; a record holds one conversation")
    if present and present[0] in CHAT_FIELDS:
        return _read_chat(meta, present[0])
    turns = meta.get("turns")
    if turns is not None:
        if not isinstance(turns, list) or not turns or not all(isinstance(t, Mapping) for t in turns):
            raise RecordError("bad_field", "'turns' in KEY.json must be a non-empty list of {question, answer} "
                                           f"objects, got {turns!r:.80}")
        outer = {k: v for k, v in meta.items() if k != "turns"}  # image_key, type, ... of the record
        first = read_question_answer(text, {**outer, **turns[0]})
        later = [(_question(t), _answers(t)[0]) for t in turns[1:]]
        return Record({**first.fields, "turns": later}, first.references, first.qtype, first.extra)
    question = _question(meta)
    ordered = _answers(meta)
    qtype, extra = _facts(meta)
    return Record({"question": question, "answer": ordered[0]}, ordered, qtype, extra)


# --------------------------------------------------------------------------------------------------
# conversations in public formats: LLaVA / ShareGPT `conversations`, OpenAI / Hugging Face `messages`

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_KEYS = {"conversations": ("from", "value"), "messages": ("role", "content")}


@dataclass(frozen=True)
class _Message:
    """One message of a conversation: `index` in the record's list, `role` (system / user / assistant) and
    its `text`, with an image part written as `IMAGE_MARKER`."""

    index: int
    role: str
    text: str


def _read_chat(meta: Mapping[str, Any], name: str) -> Record:
    """A ``conversations`` / ``messages`` record → the fields of a ``turns`` record (`read_question_answer`):
    the first exchange is ``question`` / ``answer`` (and the one reference), the later ones ``turns``, an
    opening system message ``system``; the image marker becomes `IMAGE_SLOT` in ``question``."""
    messages = _messages(meta[name], name)
    system, exchanges = _exchanges(messages, name)
    _check_image_marker(messages, exchanges[0][0], name)
    pairs = [(_user_text(user, name), _assistant_text(assistant, name)) for user, assistant in exchanges]
    fields: dict[str, Any] = {"question": pairs[0][0], "answer": pairs[0][1], "turns": pairs[1:]}
    if system is not None and system.text.strip():  # an empty system message says nothing: left out
        fields["system"] = system.text
    qtype, extra = _facts(meta)
    return Record(fields, (pairs[0][1],), qtype, extra)


def _messages(items: Any, name: str) -> list[_Message]:
    """The messages of a ``conversations`` (``from`` / ``value``) or ``messages`` (``role`` / ``content``)
    list, roles mapped to system / user / assistant; ``bad_field`` for anything else."""
    role_key, text_key = _KEYS[name]
    if not isinstance(items, list) or not items:
        raise RecordError("bad_field", f"{name!r} in KEY.json must be a non-empty list of "
                                       f"{{{role_key!r}, {text_key!r}}} objects, got {items!r:.80}")
    messages = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, Mapping):
            raise RecordError("bad_field", f"{where} must be a {{{role_key!r}, {text_key!r}}} object, got {item!r:.80}")
        role = item.get(role_key)
        mapped = _ROLES.get(role.strip().lower()) if isinstance(role, str) else None  # ShareGPT dumps write "Human" too
        if mapped is None:
            raise RecordError("bad_field", f"{where}[{role_key!r}] is {role!r:.40}; expected one of {sorted(_ROLES)} "
                                           "(any case)")
        messages.append(_Message(i, mapped, _content(item.get(text_key), f"{where}[{text_key!r}]", parts=name == "messages")))
    return messages


def _content(value: Any, where: str, *, parts: bool) -> str:
    """A message's text: a string, or (`parts`: a chat ``messages`` content list) its text parts joined as
    they stand, each image part written as `IMAGE_MARKER`."""
    if isinstance(value, str):
        return value
    if parts and isinstance(value, list):
        return "".join(_part(part, f"{where}[{j}]") for j, part in enumerate(value))
    wanted = "a string or a list of content parts" if parts else "a string"
    raise RecordError("bad_field", f"{where} must be {wanted}, got {type(value).__name__} {value!r:.80}")


def _part(part: Any, where: str) -> str:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind in ("image", "image_url"):
        return IMAGE_MARKER
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise RecordError("bad_field", f"{where} must be {{'type': 'text', 'text': STR}}, {{'type': 'image'}} or "
                                   f"{{'type': 'image_url', ...}}, got {part!r:.80}")


def _exchanges(messages: list[_Message], name: str) -> tuple[_Message | None, list[tuple[_Message, _Message]]]:
    """``(the opening system message or None, [(user, assistant), ...])``. After the system message the
    messages must alternate user / assistant from a user one on; a trailing user message has no answer to
    label and is dropped."""
    system = messages[0] if messages[0].role == "system" else None
    rest = messages[1:] if system is not None else messages
    if len(rest) % 2 == 1 and rest[-1].role == "user":
        rest = rest[:-1]
    for n, message in enumerate(rest):
        expected = "assistant" if n % 2 else "user"
        if message.role == "system":
            raise RecordError("bad_field", f"{name}[{message.index}] is a system message; one may only come first")
        if message.role != expected:
            raise RecordError("bad_field", f"{name}[{message.index}] has role {message.role!r} where {expected!r} was "
                                           "expected: messages alternate user / assistant, starting with user "
                                           "(after an optional system message)")
    if not rest:
        raise RecordError("missing_field", f"{name!r} in KEY.json has no user message answered by an assistant one")
    return system, [(rest[n], rest[n + 1]) for n in range(0, len(rest), 2)]


def _check_image_marker(messages: list[_Message], first_user: _Message, name: str) -> None:
    """At most one `IMAGE_MARKER` in `messages` (the record has one image), in `first_user`; no `IMAGE_SLOT`."""
    slots = [m.index for m in messages if IMAGE_SLOT in m.text]
    if slots:
        raise RecordError("bad_field", f"{name}[{slots[0]}] holds U+FFFC, the character that marks the image's "
                                       "place; remove it")
    found = [(m, m.text.count(IMAGE_MARKER)) for m in messages if IMAGE_MARKER in m.text]
    total = sum(n for _, n in found)
    if total > 1:
        raise RecordError("bad_field", f"{name!r} holds {total} image markers ({IMAGE_MARKER} or image parts, in "
                                       f"{name}{[m.index for m, _ in found]}); a record has one image, so at most one")
    if found and found[0][0] is not first_user:
        message = found[0][0]
        raise RecordError("bad_field", f"the image marker is in {name}[{message.index}] ({message.role}); it must be "
                                       f"in the first user message, {name}[{first_user.index}]")


def _user_text(message: _Message, name: str) -> str:
    """The question: the text with its image marker (if any) as `IMAGE_SLOT`; ``bad_field`` when blank."""
    if not message.text.strip():
        raise RecordError("bad_field", f"{name}[{message.index}] is an empty user message")
    return message.text.replace(IMAGE_MARKER, IMAGE_SLOT)


def _assistant_text(message: _Message, name: str) -> str:
    answer = message.text.strip()
    if not answer:
        raise EmptyReferenceError(f"{name}[{message.index}] is an empty assistant message (no labelled token)")
    return answer


def read_transcript(text: str | None, meta: Mapping[str, Any], *, default_language: str | None = None) -> Record:
    """ASR: ``text`` and ``language`` (else `default_language`) from KEY.json."""
    transcript = _string(meta, "text")
    language = meta.get("language", default_language)
    if language is None:
        raise RecordError("missing_field", "no 'language' in KEY.json and the loader has no default_language")
    language = _string({"language": language}, "language")
    if not transcript.strip():
        raise EmptyReferenceError("the transcript is empty (no labelled token)")
    return Record({"text": transcript, "language": language}, (transcript.strip(),))


def read_translation(text: str | None, meta: Mapping[str, Any], *, target_language: str | None = None) -> Record:
    """AST: ``translation`` into ``target_language`` (KEY.json, else the loader's `target_language`)."""
    if meta.get("translation") is None:
        raise RecordError("no_translation", "AST needs a 'translation' in KEY.json; this sample has none")
    translation = _string(meta, "translation")
    target = meta.get("target_language", target_language)
    if target is None:
        raise RecordError("missing_field", "no 'target_language' in KEY.json and the loader has no target_language")
    target = _string({"target_language": target}, "target_language")
    if not translation.strip():
        raise EmptyReferenceError("the translation is empty (no labelled token)")
    return Record({"translation": translation, "target_language": target}, (translation.strip(),))
