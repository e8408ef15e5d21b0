"""Tiny real shards (the project's own synth writers) and hand-made evaluation results that point at them,
shared by the report tests.

Each ``*_evals`` function writes one kind's test split (``n`` samples, seed 0) under ``root`` and the result
files of that modality in the `EvalResult.to_dict()` format, with predictions the tests choose: the records
carry the shard path and key, so the report reads the media back as it does after a real evaluation.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mm_llama.data.synth import write_synth
from mm_llama.train.eval_result import EvalResult, write_result
from mm_llama.train.report import ImageEvals, SpeechEvals, VideoEvals
from mm_llama.train.speech_evaluation import word_error_rate

INJECTION = "<script>alert(1)</script>"
"""A prediction that would run if the report did not escape it."""


def shard_samples(shard: Path) -> list[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of every sample of a tar shard, in order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member)
            assert data is not None
            samples.setdefault(key, {})[ext] = data.read()
    return list(samples.items())


def _only_shard(folder: Path) -> Path:
    (shard,) = sorted(folder.glob("*.tar"))
    return shard


def _by_type(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The per-type stats `evaluate` stores (majority answer: the most common reference, its baseline)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["type"]].append(r)
    out = {}
    for name, rows in groups.items():
        answers = [r["references"][0] for r in rows]
        top = max(sorted(set(answers)), key=answers.count)
        out[name] = {"samples": len(rows), "vqa_accuracy": sum(r["score"] for r in rows) / len(rows),
                     "majority_baseline": answers.count(top) / len(rows), "majority_answer": top}
    return out


def _qa_result(task: str, records: list[dict[str, Any]], settings: dict[str, Any]) -> EvalResult:
    by_type = _by_type(records)
    n = len(records)
    metrics = {"vqa_accuracy": sum(r["score"] for r in records) / n,
               "exact_match": sum(r["exact_match"] for r in records) / n,
               "majority_baseline": sum(t["majority_baseline"] * t["samples"] for t in by_type.values()) / n}
    return EvalResult(task, metrics, {"samples": n}, settings, records, [], by_type)


def _qa_records(shard: Path, answer: Callable[[int, dict[str, Any]], str], image: bool) -> list[dict[str, Any]]:
    records = []
    for i, (key, members) in enumerate(shard_samples(shard)):
        meta = json.loads(members["json"])
        prediction = answer(i, meta)
        score = float(prediction == meta["answer"])
        media = {"image_key": meta["image_key"]} if image else {"video_key": meta["video_key"]}
        records.append({"key": key, "shard": str(shard), **media, "question": meta["question"], "type": meta["type"],
                        "prediction": prediction, "references": [meta["answer"]], "score": score,
                        "exact_match": score})
    return records


def image_evals(root: Path, n: int = 2) -> ImageEvals:
    """Shapes shards; VQA right except the first answer (an `INJECTION`); blank images answer ``grey & co``."""
    write_synth("shapes", root / "shapes", n=n, seed=0, split="test")
    qa_shard, cap_shard = _only_shard(root / "shapes" / "image-qa"), _only_shard(root / "shapes" / "image-caption")
    vqa = _qa_records(qa_shard, lambda i, m: INJECTION if i == 0 else m["answer"], image=True)
    blank = _qa_records(qa_shard, lambda i, m: "grey & co", image=True)
    captions = [{"key": key, "shard": str(cap_shard), "prompt": "Describe.", "prediction": "A <red> square & more",
                 "references": [m["txt"].decode()], "cider": 1.5, "exact_match": 0.0}
                for key, m in shard_samples(cap_shard)]
    results = {
        "vqa": _qa_result("vqa", vqa, {"blank_images": False}),
        "vqa_blank": _qa_result("vqa", blank, {"blank_images": True}),
        "caption": EvalResult("caption", {"cider": 1.5, "exact_match": 0.0}, {"samples": len(captions)}, {}, captions),
        "caption_blank": EvalResult("caption", {"cider": 0.25, "exact_match": 0.0}, {"samples": len(captions)}, {},
                                    [{**c, "prediction": ""} for c in captions]),
    }
    return ImageEvals(**{name: write_result(r, root / f"eval-{name}.json") for name, r in results.items()})


def video_evals(root: Path, n: int = 2) -> VideoEvals:
    """Moving-shapes shards; the model answers every question right except ``count`` (an `INJECTION`); the
    frozen-frame run answers only ``count`` and ``start_colour`` right (``still & <b>`` otherwise)."""
    write_synth("moving-shapes", root / "moving", n=n, seed=0, split="test")
    shard = _only_shard(root / "moving" / "video-qa")
    qa = _qa_records(shard, lambda i, m: INJECTION if m["type"] == "count" else m["answer"], image=False)
    frozen = _qa_records(shard, lambda i, m: m["answer"] if m["type"] in ("count", "start_colour") else "still & <b>",
                         image=False)
    return VideoEvals(qa=write_result(_qa_result("video_qa", qa, {"blank_video": False}), root / "eval-video-qa.json"),
                      qa_frozen=write_result(_qa_result("video_qa", frozen, {"blank_video": True}),
                                             root / "eval-video-qa-frozen.json"))


SILENCE_PREDICTIONS = ("", "uh", "red circle")
"""Predictions on silence, per utterance in turn: no word, a filler (no word after normalisation), 2 words."""


def speech_evals(root: Path, n: int = 3) -> SpeechEvals:
    """Speech shards (espeak-ng): utterance 0 is transcribed right, utterance 1 loses its first word, the
    others are an `INJECTION`; silence predictions cycle through `SILENCE_PREDICTIONS`."""
    write_synth("speech", root / "speech", n=n, seed=0, split="test")
    shard = _only_shard(root / "speech" / "speech")
    records, silent = [], []
    for i, (key, members) in enumerate(shard_samples(shard)):
        reference = json.loads(members["json"])["text"]
        prediction = {0: reference, 1: " ".join(reference.split()[1:])}.get(i, INJECTION)
        records.append({"key": key, "shard": str(shard), "reference": reference, "prediction": prediction})
        silent.append({**records[-1], "prediction": SILENCE_PREDICTIONS[i % len(SILENCE_PREDICTIONS)]})

    def result(rows: list[dict[str, Any]], blank: bool) -> EvalResult:
        wer = word_error_rate([r["prediction"] for r in rows], [r["reference"] for r in rows])
        return EvalResult("asr", {"wer": wer}, {"samples": len(rows)}, {"blank_audio": blank}, rows)

    return SpeechEvals(asr=write_result(result(records, False), root / "eval-asr.json"),
                       asr_silence=write_result(result(silent, True), root / "eval-asr-silence.json"))


def loss_run(root: Path, name: str = "lm") -> Path:
    """A run folder whose metrics.jsonl has two finite losses, an eval line, a NaN and a torn last line."""
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 3.0}\n{"step": 10, "eval": {"loss": 2.0}}\n'
                                       '{"step": 20, "loss": NaN}\n{"step": 30, "loss": 1.5}\n{"step": 4')
    (run / "config.yaml").write_text("name: tiny_lm_pretrain\n")
    return run


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of an image's bytes (Pillow)."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).size
