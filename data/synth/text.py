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

- ``text`` layout: webdataset shards of ``KEY.txt`` (one document, lines separated by ``\\n``, no blank
  line inside) for streaming LM pretraining;
- ``OUTDIR/text/{split}-corpus.txt``: all documents, each followed by one blank line, for tokenizer
  training (`read_corpus` splits it back into documents).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mm_llama.data.synth import grammar
from mm_llama.data.synth.splits import draw_in_split, sample_key, sample_rng

KIND = "text"
LAYOUTS: tuple[str, ...] = ("text",)
"""Sub-folder (webdataset layout) that the ``text`` kind writes."""

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


def _qa_lines(pairs: list[grammar.QA], rng: random.Random, k: int) -> list[str]:
    chosen = rng.sample(pairs, min(k, len(pairs)))
    return [rng.choice(_QA_FORMATS).format(q=q.question, a=q.answer) for q in chosen]


def document(content: Content, rng: random.Random) -> str:
    """The document text for ``content`` (several lines, no blank line)."""
    lines: list[str] = []
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
        lines.append(f"User: {prompt} Assistant: {captions[0]}")
        head, tail = lines[:1], lines[1:]
        rng.shuffle(tail)
        lines = head + tail
    else:
        assert content.digits is not None
        words = grammar.digit_words(content.digits)
        for fmt in rng.sample(_DIGIT_LINES, rng.randint(1, 3)):
            lines.append(fmt.format(d=content.digits, w=words))
    return "\n".join(lines)


@dataclass
class TextSample:
    """One document."""

    key: str
    text: str
    content: Content

    def records(self) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
        """Webdataset records per layout: ``{"text": [(KEY, {"txt"})]}``."""
        return {"text": [(self.key, {"txt": self.text.encode("utf-8")})]}


def make_text_sample(seed: int, split: str, index: int) -> TextSample:
    """Sample ``index`` of the ``text`` kind for ``(seed, split)``."""
    rng = sample_rng(KIND, seed, split, index)
    content = draw_in_split(random_content, Content.description, rng, split)
    return TextSample(sample_key(split, index), document(content, rng), content)


def text_records(seed: int, split: str, index: int) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """Records of sample ``index`` per layout (what `write_kind` consumes)."""
    return make_text_sample(seed, split, index).records()


def corpus_path(out_dir: str | Path, split: str) -> Path:
    """Where the ``text`` kind writes the plain corpus of ``split``."""
    return Path(out_dir) / "text" / f"{split}-corpus.txt"


def read_corpus(path: str | Path) -> Iterator[str]:
    """Documents of a corpus file written by the ``text`` kind (blank-line separated)."""
    block: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)
