"""One step function per task family: batch → summed loss in fp32 + how many tokens / samples it covered.

| task family | batch | model call | loss |
|---|---|---|---|
| `lm` | `PackedBatch` (data.packed_text) | `LlamaDecoder(input_ids, document_ids=…)` | shifted cross-entropy, summed over labelled tokens |
| `image_text` (`caption`, `vqa`) | `ImageTextBatch` | `MultimodalLlama(input_ids, images=…, attention_mask=…)` | shifted cross-entropy, summed over labelled tokens |
| `contrastive` | `ImageTextBatch` (captions) | `ContrastiveModel(pixels, captions)` | symmetric InfoNCE × samples |

Labels are aligned with the inputs (`mm_llama.data.prompts`): the logits at `t − 1` predict
`labels[t]`. Each step returns the loss *summed* over its units (labelled tokens, or samples for
contrastive) together with the unit count, so the trainer can normalise by the count over all
micro-batches and ranks — gradient accumulation and data parallelism then give exactly the gradient of
one large batch. The loss is computed in fp32; bf16 autocast is used only on CUDA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.adapters.speech_adapter import ENCODER_STACK
from mm_llama.data.prompts import IGNORE_INDEX
from mm_llama.data.tasks import TASKS
from mm_llama.modalities.speech import EncodedSpeech
from mm_llama.train.optim import unwrap
from mm_llama.train.speech_ctc import SpeechCtc, embedding_ctc_loss, response_targets


@dataclass
class StepResult:
    """What a step function returns.

    loss_sum: fp32 scalar, the loss summed over `units` (keeps the graph for `backward`).
    units: what the loss is averaged over: labelled tokens (lm, image_text) or samples (contrastive).
    tokens: input tokens processed (real, non-padding), for tokens/s. samples: rows in the batch.
    metrics: further per-batch numbers (e.g. contrastive retrieval accuracy), averaged by the trainer.
    """

    loss_sum: torch.Tensor
    units: int
    tokens: int
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def autocast(device: torch.device, precision: str = "auto") -> ContextManager[Any]:
    """bf16 autocast on CUDA (`precision` auto or bf16); nothing on CPU or with fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("train.precision=bf16 needs CUDA (bf16 autocast is used only on GPUs); "
                         "use train.precision=auto or fp32 on CPU")
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`(loss summed in fp32, labelled positions)` for `logits [B, T, V]` and aligned `labels [B, T]`
    (−100 = ignored): position `t − 1` predicts `labels[t]`."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    target = labels[:, 1:]
    pred = logits[:, :-1].float()
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((target != IGNORE_INDEX).sum())


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool `[B, T]`: the positions whose logits a loss on aligned `labels [B, T]` scores (position t
    predicts `labels[t + 1]`; the last predicts nothing). Pass it as the model's `logits_at`."""
    return F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


def selected_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What `shifted_cross_entropy` gives, from logits `[N, V]` at only `predicting_positions(labels)`
    (row-major order, as `logits_at=` returns them): `(loss summed in fp32, N)`."""
    target = labels[:, 1:]
    target = target[target != IGNORE_INDEX]
    if logits.ndim != 2 or logits.shape[0] != target.numel():
        raise ValueError(f"logits {tuple(logits.shape)} are not one row per labelled position ({target.numel()}); "
                         "pass logits_at=predicting_positions(labels) to the model")
    return F.cross_entropy(logits.float(), target, reduction="sum"), int(target.numel())


def label_count(labels: torch.Tensor) -> int:
    """Positions `shifted_cross_entropy` scores for aligned `labels [B, T]`."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------------ tasks
class Task:
    """A task family: how to count a batch's loss units, move it to a device and run one step."""

    name = ""

    def __init__(self, device: torch.device, precision: str = "auto") -> None:
        self.device = device
        self.precision = precision

    def units(self, batch: Any) -> int:
        """What the loss of `batch` is averaged over (known before the forward pass)."""
        raise NotImplementedError

    def to_device(self, batch: Any) -> Any:
        return batch.to(self.device, non_blocking=self.device.type == "cuda")

    def step(self, model: nn.Module, batch: Any) -> StepResult:
        """Forward `batch` (already on the device) and return the summed loss."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: Any) -> StepResult:
        with autocast(self.device, self.precision):
            return self.step(model, batch)


class LMTask(Task):
    """Packed text (`PackedBatch`) through a `LlamaDecoder`; attention stays within documents."""

    name = "lm"

    def units(self, batch: Any) -> int:
        return label_count(batch.labels)

    def step(self, model: nn.Module, batch: Any) -> StepResult:
        logits = model(batch.input_ids, document_ids=batch.document_ids,
                       logits_at=predicting_positions(batch.labels))
        loss, units = selected_cross_entropy(logits, batch.labels)
        return StepResult(loss, units, int(batch.input_ids.numel()), int(batch.input_ids.shape[0]))


class ImageTextTask(Task):
    """Captioning / VQA (`ImageTextBatch`) through a `MultimodalLlama`; loss on the response tokens."""

    name = "image_text"

    def media(self, batch: Any) -> dict[str, Any]:
        """The batch's media by modality, as `MultimodalLlama(media=…)` takes them."""
        return {"image": batch.images}

    def units(self, batch: Any) -> int:
        return label_count(batch.text.labels)

    def step(self, model: nn.Module, batch: Any) -> StepResult:
        return self.answer_step(model, batch.text, self.media(batch))

    @staticmethod
    def answer_step(model: nn.Module, text: Any, media: dict[str, Any]) -> StepResult:
        """The response tokens' loss of `text` (a `TextBatch`) with `media` (`MultimodalLlama(media=…)`)."""
        logits = model(text.input_ids, media=media, attention_mask=text.attention_mask,
                       logits_at=predicting_positions(text.labels))
        loss, units = selected_cross_entropy(logits, text.labels)
        return StepResult(loss, units, int(text.attention_mask.sum()), int(text.input_ids.shape[0]))


class VideoTextTask(ImageTextTask):
    """Video captioning / QA (`VideoTextBatch`: frames + frame mask) through a `MultimodalLlama` with a video
    modality; loss on the response tokens."""

    name = "video_text"

    def media(self, batch: Any) -> dict[str, Any]:
        return {"video": batch}


class AudioTextTask(ImageTextTask):
    """ASR / AST (`AudioTextBatch`: log-mel features + lengths) through a `MultimodalLlama` with a speech
    modality; loss on the response tokens, plus the CTC aid's (`mm_llama.train.speech_ctc`) when ``ctc`` is set."""

    name = "audio_text"

    def __init__(self, device: torch.device, precision: str = "auto", ctc: SpeechCtc | None = None) -> None:
        super().__init__(device, precision)
        self.ctc = ctc

    def media(self, batch: Any) -> dict[str, Any]:
        return {"speech": batch}

    def step(self, model: nn.Module, batch: Any) -> StepResult:
        if self.ctc is None:
            return super().step(model, batch)
        inner = unwrap(model)
        encoded = EncodedSpeech(*inner.speech.encode(batch))  # once: the answer and the aid both read it
        answer = self.answer_step(model, batch.text, {"speech": encoded})
        targets, target_lengths = response_targets(batch.text.labels)
        ctc = embedding_ctc_loss(encoded.embeds, encoded.lengths, inner.decoder.tok_embeddings.weight, targets,
                                 target_lengths, blank=self.ctc.blank_id, scale=self.ctc.scale)
        units = max(answer.units, 1)
        answer.metrics = {"answer_loss": float(answer.loss_sum.detach()) / units, "ctc_loss": float(ctc.detach()) / units}
        answer.loss_sum = answer.loss_sum + self.ctc.weight * ctc  # both summed; the trainer divides by the answer tokens
        return answer


class BestRqTask(Task):
    """Speech-encoder pretraining (`AudioBatch`) through a `BestRqModel`. The units are the real 40 ms
    steps (known before the forward pass, which draws the mask); each batch's masked-step cross-entropy is
    scaled to them, so the logged loss is the mean cross-entropy on masked steps."""

    name = "speech_pretrain"

    def units(self, batch: Any) -> int:
        return int((-(-batch.feature_lengths // ENCODER_STACK)).sum())

    def step(self, model: nn.Module, batch: Any) -> StepResult:
        out = model(batch.features, batch.feature_lengths)
        units = self.units(batch)
        masked = int(out["masked"])
        loss = out["loss_sum"] * (units / masked) if masked else out["loss_sum"] * 0.0
        return StepResult(loss, units, units, int(batch.features.shape[0]),
                          {"accuracy": float(out["accuracy"]), "perplexity": float(out["perplexity"]),
                           "masked_fraction": masked / max(units, 1)})


class ContrastiveTask(Task):
    """Image–caption pairs (`ImageTextBatch`) through a `ContrastiveModel`; loss = InfoNCE × samples."""

    name = "contrastive"

    def units(self, batch: Any) -> int:
        return int(batch.text.input_ids.shape[0])

    def step(self, model: nn.Module, batch: Any) -> StepResult:
        from mm_llama.train.contrastive import caption_tokens

        captions, mask = caption_tokens(batch.text, pad_id=0)
        out = model(batch.images, captions, mask)
        n = int(captions.shape[0])
        return StepResult(out["loss"] * n, n, int(mask.sum()), n,
                          {"accuracy": float(out["accuracy"]), "temperature": float(out["temperature"])})


TASK_FAMILIES: dict[str, Callable[..., Task]] = {
    "text": LMTask, "image_text": ImageTextTask, "video_text": VideoTextTask, "audio_text": AudioTextTask, "speech_pretrain": BestRqTask,
    "contrastive": ContrastiveTask,
}
"""The step function of each task family (`mm_llama.data.tasks`) that can train yet."""


def task_for(name: str, device: torch.device, precision: str = "auto", *, speech_ctc: SpeechCtc | None = None) -> Task:
    """The step function of `data.task` (its family's: `lm`; `caption`, `vqa`, `caption_vqa`; `asr`, `ast`;
    `contrastive`); ``speech_ctc``: the CTC aid of an `asr` / `ast` stage (`model.speech.ctc`)."""
    spec = TASKS.get(name)
    if spec is None or spec.family not in TASK_FAMILIES:
        trainable = [n for n, s in TASKS.items() if s.family in TASK_FAMILIES]
        raise ValueError(f"no training step for data.task={name!r}; known: {sorted(trainable)}")
    if speech_ctc is None:
        return TASK_FAMILIES[spec.family](device, precision)
    if spec.family != AudioTextTask.name:
        raise ValueError(f"model.speech.ctc is an aid of the speech tasks (asr, ast), not of data.task={name!r}; "
                         "remove it")
    return AudioTextTask(device, precision, ctc=speech_ctc)


__all__ = [
    "AudioTextTask", "BestRqTask", "VideoTextTask", "ContrastiveTask", "ImageTextTask", "LMTask", "StepResult", "TASK_FAMILIES", "Task", "autocast",
    "label_count", "predicting_positions", "selected_cross_entropy", "shifted_cross_entropy", "task_for",
]
