"""The video path learns (issue 15): `tiny_video_pretrain` (only the perceiver and the video blocks train;
the image encoder is frozen and random here) fits a dozen moving-shapes clips onto a frozen tiny LM that
has read questions and answers about other clips (so it knows the wording, not these clips' answers): every
direction-of-motion answer and most answers overall are right on them."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest

from mm_llama.data.synth import write_synth
from mm_llama.image_chat import load_image_model
from mm_llama.tokenizer_training import train_llama3_tokenizer
from mm_llama.train.recipe import load_recipe
from mm_llama.train.trainer import run_training
from mm_llama.train.video_evaluation import evaluate_video

WORDING = "Answer the question using a single word or phrase. {}"
CHANGE = ("turn", "end_colour")  # answers that only later frames hold (printed beside the frozen-frame run)


def _exchanges(shard_dir: Path) -> list[tuple[str, str]]:
    out = []
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    record = json.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
                    out.append((record["question"], record["answer"]))
    return out


def _chat_shard(path: Path, exchanges: list[tuple[str, str]]) -> None:
    """Each question in the recipe's wording with its answer, as the LM will see it, without the clip."""
    with tarfile.open(path, "w") as tar:
        for i, (q, a) in enumerate(exchanges):
            data = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{WORDING.format(q)}<|eot_id|>"
                    f"<|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|>").encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _args(values: dict[str, object]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _by_type(result, types: tuple[str, ...]) -> float:
    rows = [r for r in result.records if r["type"] in types]
    return sum(r["score"] for r in rows) / len(rows)


@pytest.mark.slow
def test_tiny_video_pretrain_overfits_a_dozen_clips(tmp_path: Path) -> None:
    write_synth("moving-shapes", tmp_path / "data", n=12, seed=0, split="train")
    write_synth("moving-shapes", tmp_path / "other", n=96, seed=0, split="val")
    # the LM reads questions and answers about OTHER clips: it knows the wording and the answers' vocabulary,
    # not which answer goes with these clips' questions (that would leave nothing for the video to supply)
    exchanges = _exchanges(tmp_path / "other" / "video-qa")
    texts = [f"{q} {a}" for q, a in exchanges] + [WORDING]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus gives fewer merges than asked
        train_llama3_tokenizer(texts * 20, 400, tmp_path / "tok")
    _chat_shard(tmp_path / "lm-text.tar", exchanges)
    qa = str(tmp_path / "data" / "video-qa" / "train-*.tar")  # one question per record: as evaluated
    common = {"logging.progress": False, "logging.tensorboard": False, "train.device": "cpu"}
    run_training(load_recipe("tiny_lm_pretrain", _args({
        **common, "data.shards": [str(tmp_path / "lm-text.tar")], "data.tokenizer": str(tmp_path / "tok"),
        "data.batch_size": 8, "data.options.allow_special": True, "model.text.max_seq_len": 512,
        "train.steps": 300})), tmp_path / "lm")
    run_training(load_recipe("tiny_video_pretrain", _args({
        **common, "model.base_lm": str(tmp_path / "lm"), "model.init_from": None,  # a random image encoder, frozen
        "data.shards": [qa], "data.batch_size": 8,
        "data.num_frames": 4, "model.video": {"aggregator": {"preset": "tiny", "group_size": 4}},
        "optim.lr": 4e-3, "train.steps": 400})), tmp_path / "video")
    model, tok = load_image_model(tmp_path / "video", dtype="float32", device="cpu")
    seen = evaluate_video(model, tok, qa, "video_qa", num_frames=4, question_style="short", progress=False)
    frozen = evaluate_video(model, tok, qa, "video_qa", num_frames=4, question_style="short", progress=False,
                            blank_video=True)
    print(f"accuracy on the training clips {seen.metrics['vqa_accuracy']:.3f}, frozen frames "
          f"{frozen.metrics['vqa_accuracy']:.3f}; by type {json.dumps(seen.by_type)}")
    print(f"colour change {_by_type(seen, CHANGE):.3f}, frozen frames {_by_type(frozen, CHANGE):.3f}")
    # Measured (2026-12-05, CPU): 12 clips, 400 steps at lr 4e-3 get every direction answer (5 or 6 of 5-6) and
    # 80-100 % overall (majority 46 %) for model seeds 0-5 and two other data seeds; 300 steps miss one direction
    # answer on 2 of 8 seeds. Two dozen clips took 900 steps for the same (11 of 11, 82.5 %): fitting clips through
    # a random frozen encoder is slow, not impossible.
    # Frozen frames are no control on training clips: the first frame identifies the clip, and a fitted model
    # answers from that; that the video path reads change over time is measured held out (README: turn
    # 42.5 % against 4.6 % frozen).
    direction = [r for r in seen.records if r["type"] == "direction"]
    assert len(direction) >= 4
    assert all(r["score"] == 1.0 for r in direction), direction
    assert seen.metrics["vqa_accuracy"] >= 0.75
