"""`mm-llama eval --task video_qa | video_caption` on synthetic moving-shapes shards with a tiny random image +
video adapter run: the result file's fields, predictions equal to a no-cache greedy decode of the training
prompt, the question styles, and `--blank-video` feeding the clip's first frame K times."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from mm_llama.cli import main
from mm_llama.data.decoders import decode_video
from mm_llama.data.prompts import prompt_ids
from mm_llama.data.synth import write_synth
from mm_llama.generation import GenerationConfig
from mm_llama.image_chat import load_image_model
from mm_llama.media_tokens import MediaTokens
from mm_llama.train import evaluation
from tests.mm_llama.test_video_commands import TRANSFORM, _one_thread, video_input, write_tiny_run  # noqa: F401
from tests.train.test_speech_stage import _greedy_without_cache


@pytest.fixture(scope="module")
def video_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("video-run"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moving-shapes")
    write_synth("moving-shapes", out, n=3, seed=1, split="test", samples_per_shard=4)
    return out


class _Spy:
    """Wraps `generate` in the evaluation loop and keeps each batch's prompts and video pixels."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prompts: list[list[int]] = []
        self.pixels: list[torch.Tensor] = []
        real = evaluation.generate

        def spy(model, prompts, gen, *, prefill_inputs=None, **kwargs):
            video = prefill_inputs["media"]["video"]
            self.prompts += prompts
            self.pixels += list(video.frames.pixels.clone())
            assert bool(video.frame_mask.all())  # every clip has its num_frames frames
            return real(model, prompts, gen, prefill_inputs=prefill_inputs, **kwargs)

        monkeypatch.setattr(evaluation, "generate", spy)


def _eval(run: Path, shards: Path, task: str, *extra: str) -> int:
    return main(["eval", "--model", str(run), "--shards", str(shards / task.replace("_", "-")), "--task", task,
                 "--batch-size", "3", "--no-progress", "--device", "cpu", *extra])


def _clip_frames(shard_dir: Path, key: str, num_frames: int) -> torch.Tensor:
    """The frames of sample `key` decoded here from its shard member."""
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            if f"{key}.mp4" in tar.getnames():
                return decode_video(tar.extractfile(f"{key}.mp4").read(), key, num_frames)
    raise KeyError(key)


def test_video_qa_result_fields_and_predictions(video_run: Path, shards: Path, capsys) -> None:
    assert _eval(video_run, shards, "video_qa", "--max-samples", "5", "--max-new-tokens", "3", "--num-frames", "8") == 0
    out = capsys.readouterr().out
    assert "VQA accuracy" in out and "type moves" in out and f"results: {video_run / 'eval-video_qa.json'}" in out
    data = json.loads((video_run / "eval-video_qa.json").read_text())
    assert data["task"] == "video_qa"
    assert set(data["metrics"]) == {"vqa_accuracy", "exact_match", "majority_baseline"}
    assert data["counts"]["samples"] == len(data["records"]) == 5
    settings = data["settings"]
    assert (settings["num_frames"], settings["question_style"], settings["blank_video"]) == (8, "plain", False)
    assert sum(t["samples"] for t in data["by_type"].values()) == 5
    first = data["records"][0]
    assert {"key", "shard", "video_key", "question", "type", "prediction", "references", "score"} <= set(first)
    assert first["video_key"] == first["key"].rsplit("-q", 1)[0]

    # independent expectation: the question as written, the frames decoded and tiled here, no-cache greedy
    model, tok = load_image_model(video_run, dtype=torch.float32, device="cpu")
    ids = prompt_ids(tok, MediaTokens(model.text_cfg.vocab_size), "video_qa", {"question": first["question"]})
    frames = _clip_frames(shards / "video-qa", first["key"], 8)
    stop = GenerationConfig.for_tokenizer(tok).stop_ids
    tokens = _greedy_without_cache(model, ids, {"video": video_input(frames)}, stop, 3)
    assert first["prediction"] == tok.decode(tokens, skip_special=True).strip()


def test_question_style_short_sends_the_papers_wording(video_run: Path, shards: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    assert _eval(video_run, shards, "video_qa", "--max-samples", "2", "--max-new-tokens", "2", "--num-frames", "4",
                 "--question-style", "short", "--out", str(tmp_path / "r.json")) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    model, tok = load_image_model(video_run, dtype=torch.float32, device="cpu")
    media = MediaTokens(model.text_cfg.vocab_size)
    expected = [prompt_ids(tok, media, "video_qa",
                           {"question": f"Answer the question using a single word or phrase. {r['question']}"})
                for r in data["records"]]
    assert spy.prompts == expected and data["settings"]["question_style"] == "short"


def test_blank_video_feeds_the_first_frame_k_times(video_run: Path, shards: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    spy = _Spy(monkeypatch)
    common = ("--max-samples", "3", "--max-new-tokens", "2", "--num-frames", "6")
    assert _eval(video_run, shards, "video_qa", *common, "--out", str(tmp_path / "real.json")) == 0
    real_prompts, real_pixels = list(spy.prompts), list(spy.pixels)
    spy.prompts.clear()
    spy.pixels.clear()
    assert _eval(video_run, shards, "video_qa", *common, "--blank-video") == 0
    assert "--blank-video" in capsys.readouterr().out
    blank = json.loads((video_run / "eval-video_qa-blank.json").read_text())
    real = json.loads((tmp_path / "real.json").read_text())
    assert blank["settings"]["blank_video"] is True
    assert [r["key"] for r in blank["records"]] == [r["key"] for r in real["records"]]
    assert spy.prompts == real_prompts  # same samples, same prompts: only the frames change
    for record, pixels, moving in zip(blank["records"], spy.pixels, real_pixels):
        first = TRANSFORM.tile_tensor(_clip_frames(shards / "video-qa", record["key"], 6)[0])
        expected = torch.zeros_like(pixels[0])
        expected[:first.num_tiles] = first.tiles
        assert all(torch.equal(frame, expected) for frame in pixels)  # K copies of the decoded first frame
        assert torch.equal(moving[0], expected) and not torch.equal(moving[-1], expected)  # the real clip moves


def test_video_caption_scores_cider_with_the_training_instruction(video_run: Path, shards: Path, capsys) -> None:
    assert _eval(video_run, shards, "video_caption", "--max-new-tokens", "4", "--num-frames", "4") == 0
    data = json.loads((video_run / "eval-video_caption.json").read_text())
    assert set(data["metrics"]) == {"cider", "exact_match"} and data["metrics"]["cider"] >= 0
    assert data["counts"]["samples"] == 3 and data["settings"]["prompt"] == "Describe this video in one sentence."
    assert all(r["prompt"] == "Describe this video in one sentence." for r in data["records"])
    assert "question_style" not in data["settings"]


@pytest.mark.parametrize("argv, message", [
    (["--task", "vqa", "--blank-video"], "--blank-video that of video_caption / video_qa"),
    (["--task", "video_caption", "--question-style", "short"], "--question-style applies to --task video_qa only"),
    (["--task", "video_qa", "--blank-images"], "--blank-images is the control of caption / vqa"),
    (["--task", "caption", "--num-frames", "4"], "--num-frames applies to the video tasks only"),
])
def test_options_of_other_tasks_are_refused(video_run: Path, shards: Path, argv: list[str], message: str,
                                            capsys) -> None:
    assert main(["eval", "--model", str(video_run), "--shards", str(shards), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_model_without_video_is_refused(tmp_path: Path, shards: Path, capsys) -> None:
    run = write_tiny_run(tmp_path, video=False)
    assert _eval(run, shards, "video_qa") == 2
    assert "reads ['image'], not video" in capsys.readouterr().err
