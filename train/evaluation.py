"""Evaluation of an image model on shards: captioning (CIDEr, exact match) and VQA (VQA accuracy).

The metrics are in :mod:`mm_llama.train.eval_metrics`, the result type and its file / table in
:mod:`mm_llama.train.eval_result` (both re-exported here).

:func:`evaluate` runs a model over evaluation shards (read in a fixed order by
:class:`~mm_llama.train.eval_reader.EvalShardReader`) with greedy decoding and the SAME prompt
templates as training (:func:`mm_llama.data.prompts.prompt_ids`; the VQA question is used as written
in the shard, as the training pipeline does), images going through the model's own tiling settings
(``model.image.vision_cfg.tile_size`` / ``max_tiles``). ``blank_images=True`` swaps every image for a
mid-grey one of the same size: the control that shows how much of the score comes from the image.
:func:`write_result` stores an :class:`EvalResult` as JSON.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from tqdm import tqdm

from mm_llama.data.image_transform import ImageTransform, TiledImage
from mm_llama.data.prompts import DEFAULT_CAPTION_PROMPT, prompt_ids
from mm_llama.data.records import EmptyReferenceError, Record
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

EVAL_TASKS = tuple(name for name, spec in TASKS.items() if spec.evaluated and spec.modality == "image")
"""Tasks :func:`evaluate` knows."""

DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"caption": 48, "vqa": 10}
"""Generation budget per task when none is given (captions are one sentence, answers a word or two)."""

BLANK_GREY = (128, 128, 128)
"""The colour of the blank images of the control run."""

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
    transform = image_transform(model)
    media = MediaTokens(model.text_cfg.vocab_size)
    # a tokenizer that does not fit the model fails here, once, instead of skipping every sample
    prompt_ids(tokenizer, media, task, {"question": "?"} if task == "vqa" else ({"prompt": prompt} if prompt else {}))
    gen = GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=max_new_tokens, temperature=0.0)
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
        batch = image_batch(model, [item.tiled for item in pending])
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
