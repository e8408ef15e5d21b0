"""Record readers: a sample's ``KEY.txt`` / ``KEY.json`` → the fields a task's prompt and response need,
plus every reference response. Training and evaluation read records with these same functions (layouts:
[data/LAYOUTS.md](LAYOUTS.md)); training labels the first reference, evaluation scores against all.

A record that cannot be used raises :class:`RecordError` with a skip ``reason`` (``missing_field``,
``bad_field``, ``no_translation``, ``empty_labels``) that the loaders count by.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EmptyReferenceError", "Record", "RecordError", "read_caption", "read_question_answer", "read_transcript",
    "read_translation",
]


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
    return question


def read_question_answer(text: str | None, meta: Mapping[str, Any]) -> Record:
    """``question`` and ``answer`` (or ``answers``, see `_answers`) from KEY.json.

    A conversation about one image is ``turns``: a list of such ``{question, answer | answers}`` objects,
    asked in order in one sequence (each answer labelled). The first turn is the record's question and
    references (what evaluation scores); the later ones are ``fields["turns"]`` as ``(question, target)``
    pairs, which `data.prompts.build_example` appends as further user / assistant exchanges.
    """
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
    qtype = meta.get("type", meta.get("question_type"))
    image_key = meta.get("image_key")
    return Record({"question": question, "answer": ordered[0]}, ordered,
                  qtype if isinstance(qtype, str) and qtype.strip() else None,
                  {"image_key": image_key} if isinstance(image_key, str) and image_key else {})


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
