"""One entry point for the generation-based evaluation of any task, shared by `mm-llama eval` and the
trainer's periodic evaluation (so the metric a run logs is the number `mm-llama eval` gives).

* :func:`evaluate_task` dispatches to :func:`~mm_llama.train.evaluation.evaluate` (``caption``, ``vqa``),
  :func:`~mm_llama.train.video_evaluation.evaluate_video` (``video_caption``, ``video_qa``; frames and
  question style default to what the run in ``model_dir`` trained with) or
  :func:`~mm_llama.train.speech_evaluation.evaluate_speech` (``asr``, ``ast``), with the command's defaults.
* :class:`MetricEvaluation` is what `train.eval_metric_samples` turns on: every evaluation step of a run,
  the first N samples of `data.eval_shards` are evaluated with :func:`evaluate_task` on the model in
  memory; the model's train / eval mode (module by module) and every RNG state are put back afterwards,
  so training continues exactly as it would have without it. The full result (every prediction) is
  written to ``RUN/eval/TASK-step-NNNNNN.json``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from mm_llama.train.eval_result import EvalResult, write_result
from mm_llama.train.recipe_sections import METRIC_TASKS

if TYPE_CHECKING:
    from mm_llama.multimodal import MultimodalLlama
    from mm_llama.tokenizer import Tokenizer
    from mm_llama.train.recipe_sections import RecipeConfig

__all__ = ["METRIC_TASKS", "MetricEvaluation", "evaluate_task", "metric_result_path", "preserved_training_state"]

SPEECH_MAX_NEW_TOKENS = 128
"""`mm-llama eval`'s generation budget for ``asr`` / ``ast``."""


def evaluate_task(
    model: MultimodalLlama,
    tokenizer: Tokenizer,
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    task: str,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    blank: bool = False,
    max_new_tokens: int | None = None,
    prompt: str | None = None,
    language: str | None = None,
    question_style: str | None = None,
    num_frames: int | None = None,
    progress: bool = True,
    compile: bool | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``shards`` for ``task`` (one of :data:`METRIC_TASKS`) as `mm-llama eval` does.

    ``blank``: the task's control (blank images, frozen frames, silence). ``language``: asr: the language of
    records without one; ast: the target language of records without one. ``question_style`` /
    ``num_frames`` (video tasks): default to the run's (``model_dir``'s ``config.yaml``: ``data.prompt``,
    ``data.num_frames``), else ``plain`` and ``DEFAULT_NUM_FRAMES``. ``compile``: the decode path
    (`GenerationConfig.compile`; None: compiled on CUDA, eager elsewhere). Raises ValueError for an unknown task
    and whatever the evaluation raises (bad arguments, no sample could be evaluated).
    """
    if task not in METRIC_TASKS:
        raise ValueError(f"unknown eval task {task!r}; expected one of {', '.join(METRIC_TASKS)}")
    common: dict[str, Any] = {"batch_size": batch_size, "max_samples": max_samples, "progress": progress,
                              "compile": compile}
    if task in ("asr", "ast"):
        from mm_llama.data.prompts import language_name
        from mm_llama.train.speech_evaluation import evaluate_speech

        name = language_name(language) if language else None
        return evaluate_speech(
            model, tokenizer, shards, task, blank_audio=blank, max_new_tokens=max_new_tokens or SPEECH_MAX_NEW_TOKENS,
            default_language=name if task == "asr" else None, target_language=name if task == "ast" else None,
            **common,
        )
    if task in ("video_caption", "video_qa"):
        from mm_llama.train.video_evaluation import evaluate_video
        from mm_llama.video_chat import DEFAULT_NUM_FRAMES, run_video_settings

        frames, style = run_video_settings(model_dir) if model_dir is not None else (None, None)
        return evaluate_video(
            model, tokenizer, shards, task, blank_video=blank, num_frames=num_frames or frames or DEFAULT_NUM_FRAMES,
            question_style=question_style or (style if task == "video_qa" else None) or "plain",
            max_new_tokens=max_new_tokens, prompt=prompt, **common,
        )
    from mm_llama.train.evaluation import evaluate

    return evaluate(model, tokenizer, shards, task, blank_images=blank, max_new_tokens=max_new_tokens, prompt=prompt,
                    **common)


@contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Run the body, then put back ``model``'s train / eval flag of every submodule (an evaluation sets them
    all at once) and the Python, NumPy, torch and CUDA RNG states (nothing drawn inside leaks into training)."""
    from mm_llama.train.checkpointing import capture_rng, restore_rng

    modes = [(module, module.training) for module in model.modules()]
    rng = capture_rng()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        restore_rng(rng)


def metric_result_path(run_dir: str | os.PathLike[str], task: str, step: int) -> Path:
    """Where the periodic evaluation at ``step`` keeps its full result: ``RUN/eval/TASK-step-NNNNNN.json``."""
    return Path(run_dir) / "eval" / f"{task}-step-{step:06d}.json"


class MetricEvaluation:
    """The task metric on the first ``train.eval_metric_samples`` samples of ``data.eval_shards`` (see the
    module docstring). Built once per run; :meth:`__call__` evaluates the model at one step."""

    def __init__(self, cfg: RecipeConfig, tokenizer: Tokenizer, run_dir: str | os.PathLike[str], *,
                 write: bool = True) -> None:
        self.task = cfg.data.task  # one of METRIC_TASKS: RecipeConfig.problems checks it
        self.headline = METRIC_TASKS[self.task]
        self.shards = list(cfg.data.eval_shards)
        self.samples = cfg.train.eval_metric_samples
        self.batch_size = cfg.data.batch_size
        self.tokenizer = tokenizer
        self.run_dir = Path(run_dir)
        self.write = write

    def __call__(self, model: MultimodalLlama, step: int) -> dict[str, float]:
        """The metrics of the model at ``step`` (``{"vqa_accuracy": …, "exact_match": …, …, "metric_samples":
        n}``); the full result goes to :func:`metric_result_path` when ``write``. Training state is untouched."""
        with preserved_training_state(model):
            result = evaluate_task(model, self.tokenizer, self.shards, self.task, model_dir=self.run_dir,
                                   batch_size=self.batch_size, max_samples=self.samples, progress=False,
                                   compile=False)  # eager: a wrapped (DDP / FSDP) model, no compile per eval size
        if self.write:
            write_result(result, metric_result_path(self.run_dir, self.task, step), settings={"step": step})
        return {**{k: float(v) for k, v in result.metrics.items()}, "metric_samples": float(result.counts["samples"])}
