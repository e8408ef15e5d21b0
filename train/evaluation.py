"""Evaluation of an image model on shards: captioning (CIDEr, exact match) and VQA (VQA accuracy), and the
loop video evaluation (:mod:`mm_llama.train.video_evaluation`) shares (:func:`run_evaluation`).

The metrics are in :mod:`mm_llama.train.eval_metrics`, the result type and its file / table in
:mod:`mm_llama.train.eval_result` (both re-exported here).

:func:`evaluate` runs a model over evaluation shards (read in a fixed order by
:class:`~mm_llama.train.eval_reader.EvalShardReader`) with greedy decoding and the SAME prompt
templates as training (:func:`mm_llama.data.prompts.prompt_ids`; the VQA question is used as written
in the shard, as the training pipeline does, with a chat record's system message and image place), images
going through the model's own tiling settings (``model.image.vision_cfg.tile_size`` / ``max_tiles``).
``blank_images=True`` swaps every image for a mid-grey one of the same size: the control that shows how
much of the score comes from the image.
:func:`write_result` stores an :class:`EvalResult` as JSON.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from tqdm import tqdm

from mm_llama.data.image_transform import TiledImage
from mm_llama.data.prompts import prompt_ids
from mm_llama.data.records import IMAGE_MARKER, IMAGE_SLOT, EmptyReferenceError, Record
from mm_llama.data.tasks import TASKS, get_task
from mm_llama.generation import GenerationConfig, generate
from mm_llama.image_chat import image_batch, image_transform
from mm_llama.media_tokens import MediaTokens
from mm_llama.train.eval_metrics import (
    _majority_answers, _question_types, caption_tokens, cider, cider_scores,
    exact_match, majority_baseline, normalize_answer, question_type, vqa_accuracy, vqa_score,
)
from mm_llama.train.eval_reader import EvalShardReader
from mm_llama.train.eval_result import EvalResult, check_result_path, format_metrics, write_result

if TYPE_CHECKING:
    from mm_llama.multimodal import MultimodalLlama
    from mm_llama.tokenizer import Tokenizer

__all__ = [
    "BLANK_GREY",
    "DEFAULT_MAX_NEW_TOKENS",
    "EVAL_TASKS",
    "EmptyReferenceError",
    "EvalResult",
    "MediaEval",
    "caption_tokens",
    "check_eval_arguments",
    "check_image_model",
    "check_result_path",
    "cider",
    "cider_scores",
    "evaluate",
    "exact_match",
    "format_metrics",
    "majority_baseline",
    "normalize_answer",
    "question_type",
    "run_evaluation",
    "vqa_accuracy",
    "vqa_score",
    "write_result",
]

EVAL_TASKS = tuple(name for name, spec in TASKS.items() if spec.evaluated and spec.modality == "image")
"""Tasks :func:`evaluate` knows."""

DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"caption": 48, "vqa": 10, "video_caption": 48, "video_qa": 10}
"""Generation budget per task when none is given (captions are one sentence, answers a word or two)."""

BLANK_GREY = (128, 128, 128)
"""The colour of the blank images of the control run."""

# --------------------------------------------------------------------------------------------------
# the eval loop (shared by image and video evaluation)


@dataclass
class _Item:
    """One sample ready for generation."""

    key: str
    shard: str
    prompt: list[int]
    media: Any  # the model input of one sample: a TiledImage (image tasks), a clip's tiled frames (video tasks)
    references: list[str]
    text: str  # the question as written in the shard (qa) or the instruction (caption)
    qtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-record facts kept in the result (qa: image_key)


@dataclass(frozen=True)
class MediaEval:
    """What one modality adds to the shared loop.

    tiled: a sample of the reader → the model input of that sample (raises ValueError to skip it).
    prefill: the inputs of a batch → ``generate``'s ``prefill_inputs``.
    question: the question as written → the question as sent (video_qa's ``--question-style``).
    extra: a sample and its record → facts kept in each qa record of the result.
    settings: entries of the result's settings (tiling, the control, ...).
    control: the name of the control run in the progress bar, when it is one.
    """

    tiled: Callable[[Mapping[str, Any]], Any]
    prefill: Callable[[list[Any]], dict[str, Any]]
    question: Callable[[str], str] = str
    extra: Callable[[Mapping[str, Any], Record], dict[str, Any]] = lambda sample, record: {}
    settings: dict[str, Any] = field(default_factory=dict)
    control: str | None = None


def _references(task: str, sample: Mapping[str, Any]) -> Record:
    """The record as training reads it (`mm_llama.data.records`); a caption must also have words to score."""
    record = get_task(task).read(sample.get("txt"), sample["json"])
    if _is_caption(task) and not any(caption_tokens(r) for r in record.references):
        raise ValueError(f"the caption {record.references[0]!r:.80} has no words")
    return record


def _is_caption(task: str) -> bool:
    return get_task(task).response_field == "caption"


def _prompt_fields(task: str, prompt: str | None, question: str | None) -> dict[str, Any]:
    """The prompt fields of a caption (the instruction, when not the default) or of a question."""
    if _is_caption(task):
        return {"prompt": prompt} if prompt is not None else {}
    return {"question": question}


def _make_item(sample: Mapping[str, Any], task: str, tokenizer: Tokenizer, media: MediaTokens, how: MediaEval,
               *, prompt: str | None, max_seq_len: int) -> _Item:
    record = _references(task, sample)
    question = None if _is_caption(task) else record.fields["question"]  # as written in the shard
    sent = None if question is None else how.question(question)
    system = {"system": record.fields["system"]} if "system" in record.fields else {}  # a chat record's own
    ids = prompt_ids(tokenizer, media, task, {**_prompt_fields(task, prompt, sent), **system})
    if len(ids) >= max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, leaving no room to answer within the model's "
                         f"max_seq_len of {max_seq_len}")
    text = (question or prompt or str(get_task(task).user_default)).replace(IMAGE_SLOT, IMAGE_MARKER)
    return _Item(key=sample["key"], shard=sample["shard"], prompt=ids, media=how.tiled(sample),
                 references=list(record.references), text=text, qtype=record.qtype, extra=how.extra(sample, record))


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


def check_eval_arguments(task: str, tasks: Sequence[str], *, batch_size: int, max_samples: int | None,
                         max_new_tokens: int | None, prompt: str | None) -> int:
    """ValueError for a bad argument of an evaluation; returns the generation budget (the task's default
    when ``max_new_tokens`` is None)."""
    if task not in tasks:
        raise ValueError(f"unknown eval task {task!r}; expected one of {', '.join(tasks)}")
    _positive("batch_size", batch_size)
    _positive("max_samples", max_samples, allow_none=True)
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
    _positive("max_new_tokens", max_new_tokens)
    if prompt is not None and not _is_caption(task):
        raise ValueError(f"prompt applies to the caption task only (caption, video_caption; {task} prompts are "
                         "the questions)")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"prompt must be a non-empty string or None (the training default), got {prompt!r}")
    return max_new_tokens


def check_image_model(model: Any, caller: str) -> Any:
    """The vision config of ``model``'s image modality; ValueError when it has none."""
    vision = getattr(getattr(model, "image", None), "vision_cfg", None)
    if vision is None or not hasattr(vision, "tile_size"):
        raise ValueError(
            f"{caller} needs an image model (a MultimodalLlama with an image modality), got {type(model).__name__}; "
            "load it with mm_llama.image_chat.load_image_model"
        )
    return vision


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
    compile: bool | None = None,
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
    max_new_tokens = check_eval_arguments(task, EVAL_TASKS, batch_size=batch_size, max_samples=max_samples,
                                          max_new_tokens=max_new_tokens, prompt=prompt)
    vision = check_image_model(model, "evaluate")
    transform = image_transform(model)

    def tiled(sample: Mapping[str, Any]) -> TiledImage:
        image: Image.Image = sample["image"]
        if blank_images:
            image = Image.new("RGB", image.size, BLANK_GREY)
        return transform(image, source=sample.get("image_name"))

    how = MediaEval(
        tiled=tiled,
        prefill=lambda inputs: {"images": image_batch(model, inputs)},
        extra=lambda sample, record: {"image_key": record.extra.get("image_key")},
        settings={"blank_images": blank_images, "tile_size": vision.tile_size, "max_tiles": vision.max_tiles},
        control="blank" if blank_images else None,
    )
    return run_evaluation(model, tokenizer, EvalShardReader(shards), task, how, batch_size=batch_size,
                          max_samples=max_samples, max_new_tokens=max_new_tokens, prompt=prompt, progress=progress,
                          compile=compile)


def run_evaluation(model: MultimodalLlama, tokenizer: Tokenizer, reader: EvalShardReader, task: str, how: MediaEval, *,
                   batch_size: int, max_samples: int | None, max_new_tokens: int, prompt: str | None,
                   progress: bool, compile: bool | None = None) -> EvalResult:
    """The loop every media evaluation shares: read ``reader``'s samples in order, prompt them as training
    does, generate greedily in batches of ``batch_size``, skip and count what cannot be used, and score
    (a caption task by CIDEr, a qa task by VQA accuracy); ``compile``: the decode path
    (`GenerationConfig.compile`, None: compiled on CUDA). Arguments are checked by the caller."""
    media = MediaTokens(model.text_cfg.vocab_size)
    # a tokenizer that does not fit the model fails here, once, instead of skipping every sample
    prompt_ids(tokenizer, media, task, _prompt_fields(task, prompt, "?"))
    gen = GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=max_new_tokens, temperature=0.0, compile=compile)
    was_training = model.training
    model.eval()

    total = reader.count_samples() if progress else None  # only the progress bar needs it
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    bar = tqdm(total=total, unit="sample", desc=f"eval {task}{f' ({how.control})' if how.control else ''}",
               disable=not progress, dynamic_ncols=True)
    items: list[_Item] = []
    predictions: list[str] = []
    pending: list[_Item] = []

    def flush() -> None:
        prefill = how.prefill([item.media for item in pending])
        outputs = generate(model, [item.prompt for item in pending], gen, prefill_inputs=prefill)
        for item, out in zip(pending, outputs):
            item.media = None  # the pixels are not needed any more
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
                item = _make_item(sample, task, tokenizer, media, how, prompt=prompt, max_seq_len=model.max_seq_len)
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
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        **how.settings,
    }
    if _is_caption(task):
        settings["prompt"] = items[0].text
        return _caption_result(task, items, predictions, counts, settings, skipped)
    return _vqa_result(task, items, predictions, counts, settings, skipped)


def _caption_result(task: str, items: list[_Item], predictions: list[str], counts: dict[str, int],
                    settings: dict[str, Any], skipped: list[dict[str, Any]]) -> EvalResult:
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
    return EvalResult(task, metrics, counts, settings, records, skipped)


def _vqa_result(task: str, items: list[_Item], predictions: list[str], counts: dict[str, int],
                settings: dict[str, Any], skipped: list[dict[str, Any]]) -> EvalResult:
    references = [item.references for item in items]
    questions = [item.text for item in items]
    types = _question_types(questions, [item.qtype for item in items])
    scores = [vqa_score(p, r) for p, r in zip(predictions, references)]
    majority = _majority_answers(types, references)
    records = []
    for item, qtype, pred, score in zip(items, types, predictions, scores):
        answer = normalize_answer(pred)
        records.append({
            "key": item.key, "shard": item.shard, **item.extra, "question": item.text, "type": qtype,
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
    return EvalResult(task, metrics, counts, settings, records, skipped, by_type)
