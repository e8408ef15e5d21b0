"""`text`: a text corpus covering the grammar, for pretraining the tiny LM and training its tokenizer.

Each sample is one short *document* about one piece of content: a still scene (55 %), a clip (25 %) or a
digit string (20 %). A scene or clip document holds one or two captions, two to four question/answer
lines and a chat-style line, each in a randomly chosen format::

    A red circle on the left and a small blue square at the top.
    Question: What colour is the circle? Answer: red
    User: Describe the image. Assistant: There are two shapes: a red circle on the left and ...

so the LM sees every colour, shape, size, position, direction, count and digit word, the questions of
the QA data and the answers' one-word form. The split is decided by the content description (as for
images and clips), so the text of a test scene never appears in train.

Written two ways (both from the same documents, in index order):

- ``text`` layout: webdataset shards of ``KEY.txt`` (one document, lines separated by ``\\n``) for
  streaming LM pretraining;
- ``OUTDIR/text/{split}-corpus.txt``: all documents in plain form, each followed by one blank line, for
  tokenizer training (`read_corpus` splits it back into documents).

``chat=True`` renders every question/answer line and every ``User: … Assistant: …`` line of the
*shard* documents as one Llama 3 chat exchange in special-token text (`chat_turn`), the form the image
prompts of `mm_llama.data.prompts` use, so a tiny LM pretrained on the shards (with
``data.options.allow_special=true``) learns the chat template; captions and the other lines stay plain::

    A red circle on the left and a small blue square at the top.
    <|start_header_id|>user<|end_header_id|>\\n\\nWhat colour is the circle?<|eot_id|>⏎
    <|start_header_id|>assistant<|end_header_id|>\\n\\nred<|eot_id|>

(``⏎`` marks where the example is wrapped: an exchange is one line, and ``\\n\\n`` are two newlines.)

The chat form contains blank lines (``\\n\\n`` after each header), which the blank-line separated
corpus file cannot hold; so the corpus file always holds the *plain* form of the same documents (one
per shard document: the same count and order). That is also what a tokenizer should be trained on:
special-token text is not for BPE merges.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mm_llama.data.packed_text import read_documents
from mm_llama.data.synth import grammar
from mm_llama.data.synth.splits import draw_in_split, sample_key, sample_rng

KIND = "text"
LAYOUTS: tuple[str, ...] = ("text",)
"""Sub-folder (webdataset layout) that the ``text`` kind writes."""

CORPUS = "corpus"
"""Key of `text_records`' result holding each document's plain form for the corpus file (not a shard
layout: `write_synth` appends it to ``OUTDIR/text/{split}-corpus.txt``)."""

SYSTEM_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"
USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
EOT = "<|eot_id|>"

_QA_FORMATS = ("Question: {q} Answer: {a}", "Q: {q} A: {a}", "User: {q} Assistant: {a}", "{q} {a}")
_IMAGE_PROMPTS = ("Describe the image.", "What is in the picture?", "Caption this image.", "What do you see?")
_VIDEO_PROMPTS = ("Describe the video.", "What happens in the clip?", "Caption this video.", "What moves in the video?")
_DIGIT_LINES = (
    "The number {d} is read {w}.",
    "User: Read out {d}. Assistant: {w}",
    "Repeat after me: {w}.",
    "{w}",
    "{d} = {w}",
)
_DIGIT_CHAT = _DIGIT_LINES[1]  # the one digit line that is a question/answer exchange


def chat_turn(question: str, answer: str, system: str | None = None) -> str:
    """One Llama 3 user/assistant exchange in special-token text, laid out as `prompt_ids` + the response:
    ``<|start_header_id|>user<|end_header_id|>\\n\\n{question}<|eot_id|>``
    ``<|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>`` (one string, no newline between),
    after ``<|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>`` when ``system`` is given (the
    ASR prompt: system "Repeat after me in English:", an empty user turn where the speech goes, the transcript)."""
    head = f"{SYSTEM_HEADER}{system.strip()}{EOT}" if system is not None else ""
    return f"{head}{USER_HEADER}{question.strip()}{EOT}{ASSISTANT_HEADER}{answer.strip()}{EOT}"


@dataclass(frozen=True)
class Turn:
    """A question/answer line of a document: ``plain`` is its text form (one of the QA formats or a
    ``User: … Assistant: …`` line), `render` gives it plain or as a chat exchange."""

    question: str
    answer: str
    plain: str

    def render(self, chat: bool) -> str:
        return chat_turn(self.question, self.answer) if chat else self.plain


Line = str | Turn
"""A document line: plain text (a caption, a digit sentence) or a question/answer `Turn`."""


@dataclass(frozen=True)
class Content:
    """What a document is about: a scene, a clip or a digit string."""

    scene: grammar.Scene | None = None
    clip: grammar.Clip | None = None
    digits: str | None = None

    def description(self) -> str:
        if self.scene is not None:
            return self.scene.description()
        if self.clip is not None:
            return self.clip.description()
        return f"digits:{self.digits}"


def random_content(rng: random.Random) -> Content:
    """Draw the content of one document."""
    u = rng.random()
    if u < 0.55:
        return Content(scene=grammar.random_scene(rng))
    if u < 0.8:
        return Content(clip=grammar.random_clip(rng))
    return Content(digits=grammar.random_digits(rng))


def _qa_lines(pairs: list[grammar.QA], rng: random.Random, k: int) -> list[Line]:
    chosen = rng.sample(pairs, min(k, len(pairs)))
    return [Turn(q.question, q.answer, rng.choice(_QA_FORMATS).format(q=q.question, a=q.answer)) for q in chosen]


def render(lines: list[Line], chat: bool = False) -> str:
    """A document's text: its lines joined by ``\\n``, question/answer lines plain or (``chat``) as chat exchanges."""
    return "\n".join(line if isinstance(line, str) else line.render(chat) for line in lines)


def document_lines(content: Content, rng: random.Random) -> list[Line]:
    """The lines of the document about ``content`` (draws from ``rng``)."""
    lines: list[Line] = []
    if content.scene is not None or content.clip is not None:
        if content.scene is not None:
            captions = [grammar.caption(content.scene, rng) for _ in range(rng.randint(1, 2))]
            pairs = grammar.scene_qa(content.scene, rng)
            prompt = rng.choice(_IMAGE_PROMPTS)
        else:
            assert content.clip is not None
            captions = [grammar.clip_caption(content.clip, rng) for _ in range(rng.randint(1, 2))]
            pairs = grammar.clip_qa(content.clip)
            prompt = rng.choice(_VIDEO_PROMPTS)
        lines.extend(dict.fromkeys(captions))  # drop a repeated phrasing, keep order
        lines.extend(_qa_lines(pairs, rng, rng.randint(2, 4)))
        lines.append(Turn(prompt, captions[0], f"User: {prompt} Assistant: {captions[0]}"))
        head, tail = lines[:1], lines[1:]
        rng.shuffle(tail)
        lines = head + tail
    else:
        assert content.digits is not None
        words = grammar.digit_words(content.digits)
        for fmt in rng.sample(_DIGIT_LINES, rng.randint(1, 3)):
            text = fmt.format(d=content.digits, w=words)
            lines.append(Turn(f"Read out {content.digits}.", words, text) if fmt == _DIGIT_CHAT else text)
    return lines


@dataclass
class TextSample:
    """One document about ``content``: its ``lines``; ``text`` is the plain form, `chat_text` the chat form."""

    key: str
    content: Content
    lines: tuple[Line, ...]

    @property
    def text(self) -> str:
        """The document with its question/answer lines in their plain text form."""
        return render(list(self.lines))

    def chat_text(self) -> str:
        """The document with its question/answer lines as Llama 3 chat exchanges (see the module docstring)."""
        return render(list(self.lines), chat=True)

    def records(self, chat: bool = False) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
        """``{"text": [(KEY, {"txt"})], CORPUS: [(KEY, {"txt"})]}``: the shard record (plain or chat form)
        and the plain form for the corpus file."""
        plain = self.text
        shard = self.chat_text() if chat else plain
        return {"text": [(self.key, {"txt": shard.encode("utf-8")})],
                CORPUS: [(self.key, {"txt": plain.encode("utf-8")})]}


def make_text_sample(seed: int, split: str, index: int) -> TextSample:
    """Sample ``index`` of the ``text`` kind for ``(seed, split)``."""
    rng = sample_rng(KIND, seed, split, index)
    content = draw_in_split(random_content, Content.description, rng, split)
    return TextSample(sample_key(split, index), content, tuple(document_lines(content, rng)))


def text_records(seed: int, split: str, index: int,
                 chat: bool = False) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """Records of sample ``index`` (what `write_synth` consumes): the ``text`` layout's record, in chat form
    with ``chat=True``, and under `CORPUS` the plain form for the corpus file."""
    if not isinstance(chat, bool):
        raise ValueError(f"chat must be True or False, got {chat!r}")
    return make_text_sample(seed, split, index).records(chat)


def corpus_path(out_dir: str | Path, split: str) -> Path:
    """Where the ``text`` kind writes the plain corpus of ``split``."""
    return Path(out_dir) / "text" / f"{split}-corpus.txt"


def read_corpus(path: str | Path) -> Iterator[str]:
    """Documents of a corpus file written by the ``text`` kind (blank-line separated), read as the LM
    pretraining data reads them."""
    return read_documents(path)
