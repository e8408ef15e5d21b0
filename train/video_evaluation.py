"""Evaluation of a video model on clip shards: ``video_caption`` (CIDEr, exact match) and ``video_qa`` (VQA
accuracy, per question type), through the loop image evaluation uses
(:func:`~mm_llama.train.evaluation.run_evaluation`).

Each clip is decoded to ``num_frames`` frames spread uniformly over it (as the training loader samples
them), every frame tiled with the image modality's settings; prompts are the training templates, the
question as written in the shard unless ``question_style`` asks for the paper's evaluation wording
(``short`` / ``choice``). ``blank_video=True`` is the frozen-frame control: every frame is replaced by
the clip's first, so the content stays and the motion goes; what a model still answers then, it answers
from one frame.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mm_llama.data.tasks import TASKS
from mm_llama.train.eval_reader import EvalShardReader
from mm_llama.train.eval_result import EvalResult
from mm_llama.train.evaluation import MediaEval, check_eval_arguments, check_image_model, run_evaluation
from mm_llama.video_chat import (
    DEFAULT_NUM_FRAMES, QUESTION_STYLES, check_video_model, first_frame_clip, styled_question, video_batch,
    video_transform,
)

if TYPE_CHECKING:
    from mm_llama.multimodal import MultimodalLlama
    from mm_llama.tokenizer import Tokenizer

__all__ = ["VIDEO_EVAL_TASKS", "evaluate_video"]

VIDEO_EVAL_TASKS = tuple(name for name, spec in TASKS.items() if spec.modality == "video" and spec.prompted)
"""Tasks :func:`evaluate_video` knows (``video_caption``, ``video_qa``)."""


@torch.no_grad()
def evaluate_video(
    model: MultimodalLlama,
    tokenizer: Tokenizer,
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    task: str,
    *,
    batch_size: int = 8,
    max_samples: int | None = None,
    blank_video: bool = False,
    num_frames: int = DEFAULT_NUM_FRAMES,
    question_style: str = "plain",
    max_new_tokens: int | None = None,
    prompt: str | None = None,
    progress: bool = True,
    compile: bool | None = None,
) -> EvalResult:
    """Generate greedily for every clip of ``shards`` (video-caption layout for ``video_caption``, video-qa for
    ``video_qa``) and score the outputs as :func:`~mm_llama.train.evaluation.evaluate` scores images (same
    metrics, result fields and per-type breakdown; qa records carry the json's ``video_key``).

    ``num_frames``: frames per clip. ``question_style`` (``video_qa``): ``plain`` sends the question as
    written (as training reads it), ``short`` / ``choice`` the paper's evaluation wordings
    (:func:`~mm_llama.video_chat.styled_question`). ``blank_video``: every frame replaced by the clip's
    first (the frozen-frame control; the same samples and prompts as a real run). ``prompt``: the
    ``video_caption`` instruction (default: the training default). Skips and errors as ``evaluate``.
    """
    max_new_tokens = check_eval_arguments(task, VIDEO_EVAL_TASKS, batch_size=batch_size, max_samples=max_samples,
                                          max_new_tokens=max_new_tokens, prompt=prompt)
    if question_style not in QUESTION_STYLES:
        raise ValueError(f"question_style must be one of {', '.join(QUESTION_STYLES)}, got {question_style!r}")
    if question_style != "plain" and task != "video_qa":
        raise ValueError(f"question_style applies to video_qa only, got {question_style!r} for {task}")
    vision = check_image_model(model, "evaluate_video")
    check_video_model(model)
    clip = video_transform(model)
    settings: dict[str, Any] = {"blank_video": blank_video, "num_frames": num_frames, "tile_size": vision.tile_size,
                                "max_tiles": vision.max_tiles}
    if task == "video_qa":
        settings["question_style"] = question_style

    def video_key(sample: Mapping[str, Any], record: Any) -> dict[str, Any]:
        value = sample["json"].get("video_key")
        return {"video_key": value if isinstance(value, str) else None}

    how = MediaEval(
        tiled=lambda sample: clip(first_frame_clip(sample["video"]) if blank_video else sample["video"]),
        prefill=lambda clips: {"media": {"video": video_batch(model, clips)}},
        question=lambda question: styled_question(question, question_style),
        extra=video_key,
        settings=settings,
        control="first frame only" if blank_video else None,
    )
    reader = EvalShardReader(shards, media="video", num_frames=num_frames)
    return run_evaluation(model, tokenizer, reader, task, how, batch_size=batch_size, max_samples=max_samples,
                          max_new_tokens=max_new_tokens, prompt=prompt, progress=progress, compile=compile)
