"""Evaluation of a speech model on audio shards: ASR by corpus word error rate after Whisper's English
normalisation (as the Llama 3 paper scores), AST by corpus sacreBLEU.

Samples are read in order (`EvalShardReader(media="audio")`), prompted with the training templates
(`data.prompts.prompt_ids`, task ``asr`` / ``ast``, the record read by the same reader training uses) and
decoded greedily. ``blank_audio=True`` replaces each utterance by silence of the same length: the control
that shows how much of the score comes from the audio (what the LM guesses from the prompt alone).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jiwer
import sacrebleu
import torch
from tqdm import tqdm

from mm_llama.adapters.speech_adapter import speech_token_count
from mm_llama.data.prompts import prompt_ids
from mm_llama.data.records import EmptyReferenceError
from mm_llama.data.tasks import get_task
from mm_llama.encoders.audio_features import log_mel
from mm_llama.generation import GenerationConfig, generate
from mm_llama.media_tokens import MediaTokens
from mm_llama.speech_chat import speech_batch
from mm_llama.train.eval_reader import EvalShardReader
from mm_llama.train.eval_result import EvalResult

if TYPE_CHECKING:
    from mm_llama.multimodal import MultimodalLlama
    from mm_llama.tokenizer import Tokenizer

__all__ = ["SPEECH_TASKS", "bleu", "evaluate_speech", "normalize_english", "word_error_rate"]

SPEECH_TASKS = ("asr", "ast")


@lru_cache(maxsize=1)
def _english_normalizer() -> Any:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_english(text: str) -> str:
    """Whisper's English text normalisation (lower case, punctuation and filler words removed, numbers
    and British spellings standardised)."""
    return _english_normalizer()(text)


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER (word edits over all reference words) after `normalize_english` on both sides."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"word_error_rate needs one prediction per reference, got {len(predictions)} / {len(references)}")
    refs = [normalize_english(r) for r in references]
    if not any(r.split() for r in refs):
        raise ValueError("the references hold no words after normalisation")
    hyps = [normalize_english(p) for p in predictions]
    kept = [(r, h) for r, h in zip(refs, hyps) if r.split()]  # a reference without words scores nothing
    return float(jiwer.wer([r for r, _ in kept], [h for _, h in kept]))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus sacreBLEU (its default 13a tokenisation) of `predictions` against one reference each."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"bleu needs one prediction per reference, got {len(predictions)} / {len(references)}")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


@torch.no_grad()
def evaluate_speech(
    model: MultimodalLlama,
    tokenizer: Tokenizer,
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    task: str,
    *,
    batch_size: int = 8,
    max_samples: int | None = None,
    blank_audio: bool = False,
    max_new_tokens: int = 128,
    default_language: str | None = None,
    target_language: str | None = None,
    progress: bool = True,
    compile: bool | None = None,
) -> EvalResult:
    """Transcribe (``asr``) or translate (``ast``) every utterance of ``shards`` and score the outputs:
    ``{"wer": …}`` or ``{"bleu": …}``. Records are read as training reads them (ASR: ``text`` +
    ``language``, else `default_language`; AST: ``translation`` into ``target_language``); a sample
    that cannot be used (undecodable audio, missing fields, an empty reference, a prompt that does not
    fit ``max_seq_len``) is skipped and counted. Raises ValueError when nothing could be evaluated."""
    if task not in SPEECH_TASKS:
        raise ValueError(f"unknown speech eval task {task!r}; expected one of {', '.join(SPEECH_TASKS)}")
    if "speech" not in getattr(model, "modality_names", ()):
        raise ValueError(f"evaluate_speech needs a model with a speech modality, got {list(getattr(model, 'modality_names', []))}")
    reader = EvalShardReader(shards, media="audio")
    media = MediaTokens(model.text_cfg.vocab_size)
    options = {"default_language": default_language} if task == "asr" else {"target_language": target_language}
    gen = GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=max_new_tokens, temperature=0.0, compile=compile)
    was_training = model.training
    model.eval()
    items: list[dict[str, Any]] = []
    predictions: list[str] = []
    pending: list[tuple[dict[str, Any], torch.Tensor, list[int]]] = []
    empty = 0
    bar = tqdm(unit="sample", desc=f"eval {task}{' (silence)' if blank_audio else ''}", disable=not progress)

    def flush() -> None:
        audio = speech_batch(model, [f for _, f, _ in pending])
        outputs = generate(model, [p for _, _, p in pending], gen, prefill_inputs={"media": {"speech": audio}})
        for (item, _, _), out in zip(pending, outputs):
            items.append(item)
            predictions.append(tokenizer.decode(out.tokens, skip_special=True).strip())
        bar.update(len(pending))
        pending.clear()

    try:
        for sample in reader:
            if max_samples is not None and len(items) + len(pending) >= max_samples:
                break
            try:
                record = get_task(task).read(sample.get("txt"), sample["json"], **options)
                wave = torch.zeros_like(sample["audio"]) if blank_audio else sample["audio"]
                features = log_mel(wave)
                fields = {k: v for k, v in record.fields.items() if k != get_task(task).response_field}
                ids = prompt_ids(tokenizer, media, task, {**fields, "n_speech_tokens": speech_token_count(len(features))})
                if len(ids) + 1 >= model.max_seq_len:
                    raise ValueError(f"the prompt of {len(ids)} tokens (the utterance's speech span included) leaves "
                                     f"no room to answer within max_seq_len {model.max_seq_len}")
            except ValueError as e:
                reader.skip(sample["shard"], sample["key"], str(e))
                empty += isinstance(e, EmptyReferenceError)
                continue
            pending.append(({"key": sample["key"], "shard": sample["shard"], "reference": record.references[0]},
                            features, ids))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    finally:
        bar.close()
        model.train(was_training)
    counts = {"samples": len(items), "skipped_samples": reader.samples_skipped,
              "damaged_shards": len(reader.skipped) - reader.samples_skipped, "shards": len(reader.urls),
              "empty_references": empty}
    if not items:
        first = f"; first problem: {reader.skipped[0]}" if reader.skipped else ""
        raise ValueError(f"no utterance of the {len(reader.urls)} shard(s) could be evaluated for task {task!r}{first}")
    references = [item["reference"] for item in items]
    metrics = ({"wer": word_error_rate(predictions, references)} if task == "asr"
               else {"bleu": bleu(predictions, references)})
    records = [{**item, "prediction": p} for item, p in zip(items, predictions)]
    settings = {"task": task, "shards": list(reader.urls), "batch_size": batch_size, "max_samples": max_samples,
                "blank_audio": blank_audio, "max_new_tokens": max_new_tokens}
    return EvalResult(task, metrics, counts, settings, records, [s.as_dict() for s in reader.skipped])
