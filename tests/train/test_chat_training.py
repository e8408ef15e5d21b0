"""A tiny adapter run on LLaVA ``conversations`` and chat ``messages`` shards written by `mm-llama shards`:
it trains with no skipped sample, and evaluation asks each first question the way training built it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mm_llama.data.manifest import write_shards
from mm_llama.data.prompts import build_example
from mm_llama.data.tasks import get_task
from mm_llama.media_tokens import MediaTokens
from mm_llama.tokenizer import Tokenizer
from mm_llama.train import evaluation
from mm_llama.train.metrics import read_metrics
from mm_llama.train.recipe import load_recipe
from mm_llama.train.trainer import run_training
from tests.data.test_chat_records import LLAVA, MESSAGES
from tests.data.test_decoders import make_image
from tests.train.test_trainer_setup import Assets, assets, mm_overrides  # noqa: F401

COLOURS = ("red", "blue", "green", "white")


def chat_shards(root: Path) -> Path:
    """One shard of 8 conversations: the LLaVA and the messages record on each of four tiny PNGs."""
    (root / "media").mkdir(parents=True)
    lines = []
    for i, colour in enumerate(COLOURS):
        (root / "media" / f"{colour}.png").write_bytes(make_image("PNG", size=(36, 28), color=(60 * i, 40, 200 - 40 * i)))
        lines += [{**LLAVA, "image": f"media/{colour}.png", "key": f"llava-{colour}"},
                  {**MESSAGES, "image": f"media/{colour}.png", "key": f"chat-{colour}"}]
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    stats = write_shards(root / "manifest.jsonl", root / "shards", progress=False)
    assert (stats["samples"], stats["skipped"]) == (8, 0), stats["skipped_samples"]
    return root / "shards"


def test_a_few_steps_on_llava_and_messages_shards_skip_nothing_and_evaluate_as_trained(
        assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    shards = chat_shards(tmp_path / "data")
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=3, data__task="vqa",
                                                           data__shards=[str(shards / "*.tar")]))
    result = run_training(cfg, tmp_path / "run")
    logged = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert result.steps == 3 and len(logged) == 3
    assert all(r["skipped_samples"] == 0 and math.isfinite(r["loss"]) for r in logged)

    tok = Tokenizer.from_dir(assets.base_lm)
    media = MediaTokens(result.model.text_cfg.vocab_size)  # as evaluation and the loader number them
    prompts: list[list[int]] = []
    real_prompt_ids = evaluation.prompt_ids
    monkeypatch.setattr(evaluation, "prompt_ids", lambda *a: prompts.append(real_prompt_ids(*a)) or prompts[-1])
    scored = evaluation.evaluate(result.model, tok, shards, "vqa", batch_size=8, max_new_tokens=2, progress=False)
    assert scored.counts["samples"] == 8 and scored.counts["skipped_samples"] == 0
    by_key = {r["key"]: r for r in scored.records}
    assert by_key["llava-red"]["references"] == ["A red circle."] and by_key["chat-red"]["references"] == ["A circle."]
    assert by_key["llava-red"]["question"] == "Look at this picture:\n<image>\nWhat is it?"
    asked = prompts[-len(scored.records):]  # one per sample, in reading order (after a probe of the wording)
    for record, prompt in zip(scored.records, asked):  # the first answer's prompt, system turn and image place
        meta = LLAVA if record["key"].startswith("llava") else MESSAGES
        trained = build_example(tok, media, "vqa", get_task("vqa").read(None, meta).fields)
        assert trained.input_ids[:len(prompt)] == prompt and trained.labels[len(prompt)] == trained.input_ids[len(prompt)]
