"""Evaluation of an image model on shards: captioning (CIDEr, exact match) and VQA (VQA accuracy).

Metrics (all pure Python, no Java):

* :func:`normalize_answer` — VQA-style answer normalisation (see its docstring for the exact rules).
* :func:`exact_match` — fraction of predictions equal to one of their references after normalisation.
* :func:`vqa_accuracy` — exact match for single references; ``min(#matches / 3, 1)`` for lists of
  reference answers (the VQA rule; see :func:`vqa_score`).
* :func:`cider` — CIDEr-D from pycocoevalcap's pure-Python scorer
  (``pycocoevalcap.cider.cider.Cider``). pycocoevalcap's ``PTBTokenizer`` (like its METEOR and SPICE)
  runs Java, so it is never used: captions are tokenised here by :func:`caption_tokens` (lower-case,
  punctuation removed, split on whitespace) and the scorer is fed the space-joined tokens.
* :func:`majority_baseline` — accuracy of always giving the most common answer of each question type:
  what a model that ignores the image can reach, next to which the blank-image control is read.

:func:`evaluate` runs a model over evaluation shards (read in a fixed order by
:class:`~mm_llama.train.eval_reader.EvalShardReader`) with greedy decoding and the SAME prompt
templates as training (:func:`mm_llama.data.prompts.prompt_ids`; the VQA question is used as written
in the shard, as the training pipeline does), images going through the model's own tiling settings
(``model.image.vision_cfg.tile_size`` / ``max_tiles``). ``blank_images=True`` swaps every image for a
mid-grey one of the same size: the control that shows how much of the score comes from the image.
:func:`write_result` stores an :class:`EvalResult` as JSON.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from tqdm import tqdm

from mm_llama.atomic_file import atomic_write
from mm_llama.data.image_transform import ImageTransform, TiledImage, collate_images
from mm_llama.data.prompts import DEFAULT_CAPTION_PROMPT, prompt_ids
from mm_llama.data.records import EmptyReferenceError, Record
from mm_llama.data.tasks import TASKS, get_task
from mm_llama.generation import GenerationConfig, generate
from mm_llama.media_tokens import MediaTokens
from mm_llama.train.eval_reader import EvalShardReader

if TYPE_CHECKING:
    from mm_llama.multimodal import MultimodalLlama
    from mm_llama.tokenizer import Tokenizer

__all__ = [
    "BLANK_GREY",
    "DEFAULT_MAX_NEW_TOKENS",
    "EVAL_TASKS",
    "EmptyReferenceError",
    "EvalResult",
    "caption_tokens",
    "check_result_path",
    "cider",
    "cider_scores",
    "evaluate",
    "exact_match",
    "format_metrics",
    "majority_baseline",
    "normalize_answer",
    "question_type",
    "vqa_accuracy",
    "vqa_score",
    "write_result",
]

EVAL_TASKS = tuple(name for name, spec in TASKS.items() if spec.evaluated)
"""Tasks :func:`evaluate` knows."""

DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"caption": 48, "vqa": 10}
"""Generation budget per task when none is given (captions are one sentence, answers a word or two)."""

BLANK_GREY = (128, 128, 128)
"""The colour of the blank images of the control run."""

VQA_FULL_CREDIT = 3
"""Matching reference answers needed for full credit in the VQA rule (``min(#matches / 3, 1)``)."""

References = str | Sequence[str]
"""One reference answer / caption, or several."""

# --------------------------------------------------------------------------------------------------
# normalisation

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
    "nineteen": "19", "twenty": "20",
}
_ARTICLES = frozenset({"a", "an", "the"})
_APOSTROPHES = re.compile(r"['\u2018\u2019`]")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_OTHER_PUNCTUATION = re.compile(r"[^\w\s.]|_")


def _strip_punctuation(text: str) -> str:
    """Lower-case ``text`` and replace punctuation by spaces, keeping what carries meaning.

    Apostrophes are removed without a space (``don't`` → ``dont``), commas that separate thousands
    are removed (``1,000`` → ``1000``), a period between two digits is kept (``3.5``); every other
    punctuation or symbol character (``_`` included) becomes a space.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _APOSTROPHES.sub("", text)
    text = _THOUSANDS_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub(" ", text)
    return _OTHER_PUNCTUATION.sub(" ", text)


def normalize_answer(text: str) -> str:
    """VQA-style answer normalisation, applied to predictions and references alike.

    1. Unicode NFKC, lower-case.
    2. Punctuation: apostrophes dropped (``don't`` → ``dont``), thousands commas dropped
       (``1,000`` → ``1000``), decimal points kept (``3.5``), every other punctuation mark or symbol
       becomes a space; so a trailing period, ``?`` or ``!`` disappears and ``t-shirt`` → ``t shirt``.
    3. Number words ``zero`` … ``twenty`` become digits (``two`` → ``2``); ``none`` → ``0`` as in the
       VQA evaluation (the usual answer to "how many" when there are none).
    4. Articles ``a``, ``an``, ``the`` are removed.
    5. Whitespace is collapsed to single spaces and stripped.

    ``"The Two red circles."`` → ``"2 red circles"``; ``""`` → ``""``.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a str, got {type(text).__name__} {text!r:.80}")
    words = []
    for word in _strip_punctuation(text).split():
        if word in _ARTICLES:
            continue
        words.append(_NUMBER_WORDS.get(word, word))
    return " ".join(words)


def caption_tokens(text: str) -> list[str]:
    """Tokens of a caption for CIDEr: lower-case, punctuation removed as :func:`normalize_answer`
    does (step 2), split on whitespace. Articles and number words are kept (they are n-gram content).
    Used instead of pycocoevalcap's ``PTBTokenizer``, which needs Java."""
    if not isinstance(text, str):
        raise TypeError(f"caption_tokens expects a str, got {type(text).__name__} {text!r:.80}")
    return _strip_punctuation(text).split()


def _reference_list(refs: References, index: int) -> list[str]:
    if isinstance(refs, str):
        return [refs]
    if isinstance(refs, Sequence) and refs and all(isinstance(r, str) for r in refs):
        return list(refs)
    raise ValueError(
        f"references[{index}] must be a string or a non-empty list of strings, got {refs!r:.120}"
    )


def _check_pairs(predictions: Sequence[str], references: Sequence[References], what: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{what}: got {len(predictions)} predictions but {len(references)} references; give one "
            "reference (or list of references) per prediction"
        )
    if not predictions:
        raise ValueError(f"{what}: no predictions to score")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise ValueError(f"{what}: predictions[{i}] must be a string, got {type(p).__name__} {p!r:.80}")


# --------------------------------------------------------------------------------------------------
# answer metrics


def vqa_score(prediction: str, references: References) -> float:
    """Score of one answer (after :func:`normalize_answer` on both sides).

    A single reference (a string, or a list of one): 1.0 for a match, else 0.0. Several references
    (e.g. VQA's 10 human answers): ``min(#matching references / min(3, #references), 1)`` — VQA's
    ``min(#humans that said it / 3, 1)``; with two references both must match for full credit.
    (The official VQA script also averages over the 10 leave-one-out subsets of its 10 answers; that
    refinement is not applied.)
    """
    refs = _reference_list(references, 0)
    answer = normalize_answer(prediction)
    matches = sum(normalize_answer(r) == answer for r in refs)
    return min(matches / min(VQA_FULL_CREDIT, len(refs)), 1.0)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[References]) -> float:
    """Mean :func:`vqa_score` over the questions (in [0, 1]).

    ``references[i]`` is the answer to question ``i`` or a list of reference answers. Raises
    ValueError for different lengths or no predictions.
    """
    _check_pairs(predictions, references, "vqa_accuracy")
    return sum(vqa_score(p, _reference_list(r, i)) for i, (p, r) in enumerate(zip(predictions, references))) / len(
        predictions
    )


def exact_match(predictions: Sequence[str], references: Sequence[References]) -> float:
    """Fraction of predictions equal, after :func:`normalize_answer`, to their reference or to any one
    of their references (in [0, 1]). Raises ValueError for different lengths or no predictions."""
    _check_pairs(predictions, references, "exact_match")
    hits = 0
    for i, (p, r) in enumerate(zip(predictions, references)):
        answer = normalize_answer(p)
        hits += any(normalize_answer(ref) == answer for ref in _reference_list(r, i))
    return hits / len(predictions)


# --------------------------------------------------------------------------------------------------
# CIDEr


def cider_scores(predictions: Sequence[str], references: Sequence[References]) -> tuple[float, list[float]]:
    """``(corpus CIDEr, per-caption scores)`` from pycocoevalcap's ``Cider`` scorer (CIDEr-D: n = 1..4,
    Gaussian length penalty σ = 6, clipped counts, ×10), fed with :func:`caption_tokens` joined by
    spaces (pycocoevalcap's Java ``PTBTokenizer`` is not used).

    The n-gram IDF is computed over the references of the captions scored together, so CIDEr is a
    corpus metric: a single image always scores 0 (every n-gram occurs in all "documents"), and
    scores are comparable only on the same reference set. Values are ≥ 0 and typically up to ~10.
    Raises ValueError for different lengths, no predictions, or a caption whose references are all
    empty after tokenisation.
    """
    from pycocoevalcap.cider.cider import Cider

    _check_pairs(predictions, references, "cider")
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for i, (p, r) in enumerate(zip(predictions, references)):
        refs = [" ".join(caption_tokens(ref)) for ref in _reference_list(r, i)]
        refs = [ref for ref in refs if ref]
        if not refs:
            raise ValueError(f"cider: the references of caption {i} are empty after tokenisation: {r!r:.120}")
        gts[i] = refs
        res[i] = [" ".join(caption_tokens(p))]
    score, per_caption = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in per_caption]


def cider(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr of ``predictions`` against their reference captions (see :func:`cider_scores`;
    ``references[i]`` may also be a single string)."""
    return cider_scores(predictions, references)[0]


# --------------------------------------------------------------------------------------------------
# majority baseline


def question_type(question: str) -> str:
    """The grouping key of a question without a ``type`` field: the whole question, normalised by
    :func:`normalize_answer`.

    The nouns and attributes are kept ("how many squares are there" and "how many circles are there"
    are different types), so the groups are at least per exact question string. This is deliberately
    fine-grained: a coarse prefix ("how many") would under-state what a model can guess from the text
    alone. With small data, fine groups make the in-sample baseline optimistic (a question asked once
    is always "guessed" right); prefer an explicit ``type`` field where the data has one.
    """
    return normalize_answer(question)


def majority_baseline(
    questions: Sequence[str],
    answers: Sequence[References],
    key: Callable[[str], str] | Sequence[str | None] = question_type,
) -> float:
    """Accuracy (by :func:`vqa_score`) of always answering the most common answer of each question type.

    Args:
        questions: the question texts.
        answers: per question, the reference answer or a list of reference answers.
        key: how questions are grouped: a function of the question text (default :func:`question_type`),
            or a sequence of per-question types (e.g. the shards' ``type`` field), where ``None``
            falls back to :func:`question_type` of that question.

    The majority answer of a group is its most frequent normalised reference answer (every reference
    counts once); ties go to the alphabetically first. It is computed on the same questions it is
    scored on (in-sample), so with tiny groups it is an optimistic bound. Returns a value in [0, 1];
    raises ValueError for different lengths or no questions.
    """
    if len(questions) != len(answers):
        raise ValueError(f"majority_baseline: got {len(questions)} questions but {len(answers)} answers")
    if not questions:
        raise ValueError("majority_baseline: no questions")
    types = _question_types(questions, key)
    refs = [_reference_list(a, i) for i, a in enumerate(answers)]
    majority = _majority_answers(types, refs)
    return sum(vqa_score(majority[t], r) for t, r in zip(types, refs)) / len(questions)


def _question_types(questions: Sequence[str], key: Callable[[str], str] | Sequence[str | None]) -> list[str]:
    if callable(key):
        return [str(key(q)) for q in questions]
    if isinstance(key, (str, bytes)) or not isinstance(key, Sequence):
        raise ValueError(f"key must be a function of the question or a sequence of types, got {key!r:.80}")
    if len(key) != len(questions):
        raise ValueError(f"key holds {len(key)} types for {len(questions)} questions; give one per question")
    return [str(t) if t is not None else question_type(q) for q, t in zip(questions, key)]


def _majority_answers(types: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, str]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for t, r in zip(types, refs):
        counts[t].update(normalize_answer(a) for a in r)
    return {t: min(c.items(), key=lambda item: (-item[1], item[0]))[0] for t, c in counts.items()}


# --------------------------------------------------------------------------------------------------
# results


@dataclass
class EvalResult:
    """The outcome of :func:`evaluate`.

    task: ``caption`` or ``vqa``.
    metrics: ``caption``: ``cider``, ``exact_match``; ``vqa``: ``vqa_accuracy``, ``exact_match``,
        ``majority_baseline`` (all in [0, 1] except CIDEr, which is ≥ 0).
    by_type: ``vqa`` only: per question type, ``{"samples", "vqa_accuracy", "majority_baseline",
        "majority_answer"}``.
    counts: ``samples`` (evaluated), ``skipped_samples`` (samples skipped: undecodable, missing
        fields, empty references), ``damaged_shards`` (shards that could not be read to the end),
        ``shards``, ``empty_references`` (of the skipped samples, those whose reference answer or caption
        is empty or whitespace: training skips them as having no labelled token, so they are not scored).
    skipped: one ``{"shard", "key", "reason"}`` per skipped sample or damaged shard (``key`` None).
    settings: how the run was made (shards, batch size, blank images, generation budget, ...).
    records: one dict per evaluated sample, in reading order: ``key``, ``shard``, ``prompt`` (caption)
        or ``question``, ``type`` and ``image_key`` (vqa; KEY.json's ``image_key`` or None), ``prediction``,
        ``references`` (always a list), and the sample's own scores (``cider`` or ``score``, and
        ``exact_match``).
    """

    task: str
    metrics: dict[str, float]
    counts: dict[str, int]
    settings: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    by_type: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the content of :func:`write_result`'s file)."""
        return {
            "task": self.task,
            "metrics": dict(self.metrics),
            "by_type": {k: dict(v) for k, v in self.by_type.items()},
            "counts": dict(self.counts),
            "settings": dict(self.settings),
            "skipped": [dict(s) for s in self.skipped],
            "records": [dict(r) for r in self.records],
        }


def write_result(
    result: EvalResult, path: str | os.PathLike[str], *, settings: Mapping[str, Any] | None = None
) -> Path:
    """Write ``result`` as one JSON object (metrics, by_type, counts, settings, skipped, records).

    ``settings`` adds entries to the stored settings (e.g. the model path a command was given).
    Parent folders are created; the file is written to ``PATH.tmp`` and renamed, so a reader never
    sees half a file. Returns the path.
    """
    out = check_result_path(path)
    data = result.to_dict()
    if settings:
        data["settings"].update({k: _jsonable(v) for k, v in settings.items()})
    try:
        return atomic_write(out, json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    except OSError as err:
        raise ValueError(f"cannot write the result to {str(out)!r}: {err.strerror or err}; "
                         "choose another path") from err


def check_result_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a result file that can be written: its folder is created; raises ValueError naming the
    path when it is a directory, lies under a file, or its folder cannot be created. Call it before a
    long evaluation, so that a bad ``--out`` fails at once."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(
            f"result path {str(out)!r} is a directory; give a file name such as {str(out / 'eval.json')!r}"
        )
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"result path {str(out)!r} cannot be written: {str(blocking)!r} is a file, not a folder; "
                         "choose another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"result path {str(out)!r} cannot be written: {err.strerror or err} ({err.filename}); "
                         "choose another path") from err
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"result path {str(out)!r} cannot be written: its folder is not writable; choose another path")
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    return value


_METRIC_LABELS = {
    "cider": "CIDEr",
    "exact_match": "exact match",
    "vqa_accuracy": "VQA accuracy",
    "majority_baseline": "majority-answer baseline",
}


def format_metrics(result: EvalResult) -> str:
    """A small text table of the metrics, the per-type VQA accuracies and the sample counts."""
    rows = [(_METRIC_LABELS.get(k, k), f"{v:.4f}" if k == "cider" else f"{100 * v:.1f}%")
            for k, v in result.metrics.items()]
    for name, stats in sorted(result.by_type.items()):
        rows.append((f"  type {name} ({stats['samples']})",
                     f"{100 * stats['vqa_accuracy']:.1f}% (majority {100 * stats['majority_baseline']:.1f}%)"))
    counts = result.counts
    rows.append(("samples", str(counts.get("samples", 0))))
    if counts.get("skipped_samples") or counts.get("damaged_shards"):
        empty = counts.get("empty_references", 0)
        rows.append(("skipped", f"{counts.get('skipped_samples', 0)} samples"
                                f"{f' ({empty} with an empty reference)' if empty else ''}, "
                                f"{counts.get('damaged_shards', 0)} damaged shards"))
    width = max(len(name) for name, _ in rows)
    title = f"{result.task}{' (blank images)' if result.settings.get('blank_images') else ''}"
    lines = [title, "-" * max(len(title), width + 12)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the eval loop


@dataclass
class _Item:
    """One sample ready for generation."""

    key: str
    shard: str
    prompt: list[int]
    tiled: TiledImage
    references: list[str]
    text: str  # the question (vqa) or the instruction (caption)
    qtype: str | None = None
    image_key: str | None = None  # vqa: KEY.json's `image_key`, the image-caption record of the same image


def _references(task: str, sample: Mapping[str, Any]) -> Record:
    """The record as training reads it (`mm_llama.data.records`); a caption must also have words to score."""
    record = get_task(task).read(sample.get("txt"), sample["json"])
    if task == "caption" and not any(caption_tokens(r) for r in record.references):
        raise ValueError(f"the caption {record.references[0]!r:.80} has no words")
    return record


def _make_item(sample: Mapping[str, Any], task: str, tokenizer: Tokenizer, media: MediaTokens, transform: ImageTransform,
               *, prompt: str | None, blank_images: bool, max_seq_len: int) -> _Item:
    record = _references(task, sample)
    references = list(record.references)
    if task == "caption":
        fields: dict[str, Any] = {"prompt": prompt} if prompt is not None else {}
    else:
        fields = {"question": record.fields["question"]}
    qtype, image_key = record.qtype, record.extra.get("image_key")
    ids = prompt_ids(tokenizer, media, task, fields)
    if len(ids) >= max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, leaving no room to answer within the model's "
                         f"max_seq_len of {max_seq_len}")
    image: Image.Image = sample["image"]
    if blank_images:
        image = Image.new("RGB", image.size, BLANK_GREY)
    tiled = transform(image, source=sample.get("image_name"))
    text = fields.get("question") or fields.get("prompt") or DEFAULT_CAPTION_PROMPT
    return _Item(key=sample["key"], shard=sample["shard"], prompt=ids, tiled=tiled, references=references,
                 text=text, qtype=qtype, image_key=image_key)


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


@torch.no_grad()
def evaluate(
    model: MultimodalLlama,
    tokenizer: Tokenizer,
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    task: str,
    *,
    batch_size: int = 8,
    max_samples: int | None = None,
    blank_images: bool = False,
    max_new_tokens: int | None = None,
    prompt: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Generate greedily for every sample of ``shards`` and score the outputs.

    Args:
        model: a ``MultimodalLlama`` with an image modality (its ``image.vision_cfg`` gives the tiling; left in eval mode).
        tokenizer: its ``Tokenizer``.
        shards: eval shards (image-caption layout for ``caption``, image-qa for ``vqa``), anything
            :func:`~mm_llama.train.eval_reader.expand_eval_shards` accepts; read in order, every
            sample once.
        task: ``caption`` (references from ``KEY.txt`` or the json's ``caption``, plus a ``captions``
            list if present) or ``vqa`` (``question``; ``answer``, or an ``answers`` list; the
            optional ``type`` groups the majority baseline and the per-type breakdown).
        batch_size: samples per ``generate`` call.
        max_samples: stop after this many evaluated samples (skipped ones do not count).
        blank_images: replace each image by a mid-grey (``BLANK_GREY``) image of the same size. The
            real image is still decoded (for its size), so a blank run skips exactly the samples a
            real run skips and the two evaluate the same samples with the same prompts.
        max_new_tokens: generation budget (default ``DEFAULT_MAX_NEW_TOKENS[task]``).
        prompt: caption instruction (default: the training default, ``DEFAULT_CAPTION_PROMPT``);
            must match what the model was trained with.
        progress: show a tqdm progress bar.

    Samples that cannot be used (undecodable image, bad json, missing question/answer/caption, an
    empty reference answer or caption — training skips those too —, a tiling error) are skipped,
    counted and listed in ``EvalResult.skipped``; nothing in the data makes this raise. Raises
    ValueError for bad arguments and when no sample at all could be evaluated.
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown eval task {task!r}; expected one of {', '.join(EVAL_TASKS)}")
    _positive("batch_size", batch_size)
    _positive("max_samples", max_samples, allow_none=True)
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
    _positive("max_new_tokens", max_new_tokens)
    if prompt is not None and task != "caption":
        raise ValueError("prompt applies to the caption task only (VQA prompts are the questions)")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"prompt must be a non-empty string or None (the training default), got {prompt!r}")
    vision = getattr(getattr(model, "image", None), "vision_cfg", None)
    if vision is None or not hasattr(vision, "tile_size"):
        raise ValueError(
            f"evaluate needs an image model (a MultimodalLlama with an image modality), got {type(model).__name__}; "
            "load it with mm_llama.image_chat.load_image_model"
        )

    reader = EvalShardReader(shards)
    transform = ImageTransform(tile_size=vision.tile_size, max_tiles=vision.max_tiles)
    media = MediaTokens(model.text_cfg.vocab_size)
    # a tokenizer that does not fit the model fails here, once, instead of skipping every sample
    prompt_ids(tokenizer, media, task, {"question": "?"} if task == "vqa" else ({"prompt": prompt} if prompt else {}))
    gen = GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=max_new_tokens, temperature=0.0)
    device = next(model.parameters()).device
    dtype = next(model.image.projector.parameters()).dtype
    was_training = model.training
    model.eval()

    total = reader.count_samples() if progress else None  # only the progress bar needs it
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    bar = tqdm(total=total, unit="sample", desc=f"eval {task}{' (blank)' if blank_images else ''}",
               disable=not progress, dynamic_ncols=True)
    items: list[_Item] = []
    predictions: list[str] = []
    pending: list[_Item] = []

    def flush() -> None:
        batch = collate_images([[item.tiled] for item in pending], max_tiles=vision.max_tiles).to(device, dtype=dtype)
        outputs = generate(model, [item.prompt for item in pending], gen, prefill_inputs={"images": batch})
        for item, out in zip(pending, outputs):
            items.append(item)
            predictions.append(tokenizer.decode(out.tokens, skip_special=True).strip())
        bar.update(len(pending))
        pending.clear()

    counted_skips = 0  # skipped samples already shown on the progress bar
    empty_references = 0  # of the skipped samples: records whose reference is empty (as training skips them)

    try:
        for sample in reader:
            if max_samples is not None and len(items) + len(pending) >= max_samples:
                break
            try:
                item = _make_item(sample, task, tokenizer, media, transform, prompt=prompt,
                                  blank_images=blank_images, max_seq_len=model.max_seq_len)
            except ValueError as e:  # missing fields / prompt too long / tiling: skip the sample, keep going
                reader.skip(sample["shard"], sample["key"], str(e))
                empty_references += isinstance(e, EmptyReferenceError)
            else:
                pending.append(item)
            bar.update(reader.samples_skipped - counted_skips)
            counted_skips = reader.samples_skipped
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    finally:
        bar.close()
        model.train(was_training)

    skipped = [s.as_dict() for s in reader.skipped]
    counts = {
        "samples": len(items),
        "skipped_samples": reader.samples_skipped,
        "damaged_shards": len(reader.skipped) - reader.samples_skipped,
        "shards": len(reader.urls),
        "empty_references": empty_references,
    }
    if not items:
        first = f"; first problem: {reader.skipped[0]}" if reader.skipped else ""
        raise ValueError(
            f"no sample of the {len(reader.urls)} shard(s) could be evaluated for task {task!r} "
            f"({counts['skipped_samples']} skipped, {counts['damaged_shards']} damaged shards){first}"
        )
    settings = {
        "task": task,
        "shards": list(reader.urls),
        "batch_size": batch_size,
        "max_samples": max_samples,
        "blank_images": blank_images,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "tile_size": vision.tile_size,
        "max_tiles": vision.max_tiles,
    }
    if task == "caption":
        settings["prompt"] = items[0].text
        return _caption_result(items, predictions, counts, settings, skipped)
    return _vqa_result(items, predictions, counts, settings, skipped)


def _caption_result(items: list[_Item], predictions: list[str], counts: dict[str, int], settings: dict[str, Any],
                    skipped: list[dict[str, Any]]) -> EvalResult:
    references = [item.references for item in items]
    corpus, per_caption = cider_scores(predictions, references)
    records = []
    for item, pred, score in zip(items, predictions, per_caption):
        answer = normalize_answer(pred)
        records.append({
            "key": item.key, "shard": item.shard, "prompt": item.text, "prediction": pred,
            "references": item.references, "cider": score,
            "exact_match": float(any(normalize_answer(r) == answer for r in item.references)),
        })
    metrics = {"cider": corpus, "exact_match": exact_match(predictions, references)}
    return EvalResult("caption", metrics, counts, settings, records, skipped)


def _vqa_result(items: list[_Item], predictions: list[str], counts: dict[str, int], settings: dict[str, Any],
                skipped: list[dict[str, Any]]) -> EvalResult:
    references = [item.references for item in items]
    questions = [item.text for item in items]
    types = _question_types(questions, [item.qtype for item in items])
    scores = [vqa_score(p, r) for p, r in zip(predictions, references)]
    majority = _majority_answers(types, references)
    records = []
    for item, qtype, pred, score in zip(items, types, predictions, scores):
        answer = normalize_answer(pred)
        records.append({
            "key": item.key, "shard": item.shard, "image_key": item.image_key, "question": item.text, "type": qtype,
            "prediction": pred, "references": item.references, "score": score,
            "exact_match": float(any(normalize_answer(r) == answer for r in item.references)),
        })
    metrics = {
        "vqa_accuracy": sum(scores) / len(scores),
        "exact_match": exact_match(predictions, references),
        "majority_baseline": majority_baseline(questions, references, key=types),
    }
    by_type: dict[str, dict[str, Any]] = {}
    if any(item.qtype is not None for item in items):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(types):
            groups[t].append(i)
        for t, rows in groups.items():
            by_type[t] = {
                "samples": len(rows),
                "vqa_accuracy": sum(scores[i] for i in rows) / len(rows),
                "majority_baseline": sum(vqa_score(majority[t], references[i]) for i in rows) / len(rows),
                "majority_answer": majority[t],
            }
    settings["majority_baseline_groups"] = "type field" if by_type else "normalised question text"
    return EvalResult("vqa", metrics, counts, settings, records, skipped, by_type)
