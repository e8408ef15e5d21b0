"""Evaluation metrics, all pure Python (no Java):

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
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

__all__ = [
    "VQA_FULL_CREDIT", "References", "caption_tokens", "cider", "cider_scores", "exact_match", "majority_baseline",
    "normalize_answer", "question_type", "vqa_accuracy", "vqa_score",
]

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
