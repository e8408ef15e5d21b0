"""The video stage end to end on a tiny model (CPU): `tiny_video_pretrain` starts from an image run, trains
only the perceiver and the video block on synthetic moving-shapes clips, leaves the image adapter and the
LM bit-identical, exports image ∪ video, and the export loads back to the same outputs; a killed run
resumes to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm_llama.checkpoints.loading import load_llama
from mm_llama.checkpoints.multimodal_loading import ADAPTER_FILE, load_multimodal, read_adapter_run_config
from mm_llama.data.synth import write_synth
from mm_llama.train.recipe import RecipeError, load_recipe
from mm_llama.train.stages import Built
from mm_llama.train.build import load_recipe_tokenizer
from mm_llama.train.trainer import make_source, run_training
from tests.train.test_trainer_setup import Assets, assets, mm_overrides  # noqa: F401

WORDING = "Answer the question using a single word or phrase. {question}"


def _overrides(a: Assets, image_dir: Path, clips: Path, steps: int, **more: object) -> list[str]:
    image = read_adapter_run_config(image_dir)
    values: dict[str, object] = {
        "model.base_lm": str(a.base_lm), "model.init_from": str(image_dir), "model.encoder": image["encoder"],
        "model.vision": image["vision"], "model.fusion_layers": image["fusion_layers"],
        "data.shards": [str(clips / "video-qa" / "train-*.tar")], "data.batch_size": 4, "data.num_frames": 4,
        "data.shuffle_buffer": 8, "train.steps": steps, "train.device": "cpu", "schedule.warmup_steps": 1,
        "checkpoint.every": 2, "checkpoint.keep_last": 2, "logging.every": 1, "logging.progress": False,
        "logging.tensorboard": False, "model.video": {"aggregator": {"preset": "tiny", "group_size": 4}},
        "model.fusion_gate_init": 0.5,
    }
    values.update(more)
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("clips")
    write_synth("moving-shapes", data, n=6, seed=0, split="train")
    return data


@pytest.fixture(scope="module")
def image_run(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    image_dir = tmp_path_factory.mktemp("image-run")
    run_training(load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=2)), image_dir)
    return image_dir


@pytest.fixture(scope="module")
def video_run(assets: Assets, image_run: Path, clips: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    cfg = load_recipe("tiny_video_pretrain", _overrides(assets, image_run, clips, steps=4))
    return run_training(cfg, tmp_path_factory.mktemp("video-run")), cfg


def test_video_training_moves_only_video_weights(video_run, image_run: Path, assets: Assets) -> None:  # noqa: F811
    result, cfg = video_run
    model = result.model
    assert cfg.data.prompt == WORDING and cfg.model.train == ["video.aggregator", "video.fusion"]
    assert model.modality_names == ("image", "video")
    image = load_file(str(image_run / ADAPTER_FILE))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in image.items())  # the image adapter, bit for bit
    base = load_llama(assets.base_lm).state_dict()
    decoder = model.decoder.state_dict()
    assert all(torch.equal(decoder[k], v) for k, v in base.items())
    from mm_llama.train.stages import build

    fresh = build(cfg).model
    for name in ("video.aggregator.latents", "video.aggregator.time_embed", "decoder.tok_embeddings.media.video.weight"):
        assert not torch.equal(state[name], fresh.state_dict()[name]), name


def test_the_export_holds_image_and_video_and_loads_back(video_run, image_run: Path) -> None:
    result, cfg = video_run
    exported = load_file(str(result.run_dir / ADAPTER_FILE))
    image = load_file(str(image_run / ADAPTER_FILE))
    video = {k for k in exported if k.startswith("video.") or ".video." in k}
    assert set(exported) == set(image) | video and video
    loaded = load_multimodal(result.run_dir)
    assert loaded.modality_names == ("image", "video")
    tok, tok_dir = load_recipe_tokenizer(cfg)
    source = make_source(cfg, Built(result.model, tok, tok_dir, "adapter"), list(cfg.data.shards), rank=0,
                         world_size=1, evaluation=True)
    batch = next(source.iter_epoch(0, 0))
    assert batch.frames.pixels.shape[1] == 4  # data.num_frames reaches the loader
    question = tok.decode([t for t in batch.text.input_ids[0].tolist() if t < tok.vocab_size])
    assert "Answer the question using a single word or phrase." in question  # data.prompt wording
    model = result.model.eval()
    with torch.no_grad():
        text = batch.text
        expected = model(text.input_ids, media={"video": batch}, attention_mask=text.attention_mask)
        got = loaded(text.input_ids, media={"video": batch}, attention_mask=text.attention_mask)
    assert torch.equal(got, expected)


class _Killed(Exception):
    pass


def test_a_killed_video_run_resumes_to_the_same_weights(assets: Assets, image_run: Path, clips: Path,  # noqa: F811
                                                         tmp_path: Path) -> None:
    cfg = load_recipe("tiny_video_pretrain", _overrides(assets, image_run, clips, steps=4))
    whole = run_training(cfg, tmp_path / "whole")

    def kill_after_step_3(step: int, info: dict) -> None:  # past the step-2 checkpoint: step 3 is redone
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        run_training(cfg, tmp_path / "cut", on_step_end=kill_after_step_3)
    resumed = run_training(cfg, tmp_path / "cut", resume=True)
    assert resumed.steps == 4 and resumed.history == whole.history[2:]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_question_wording_without_its_slot_is_refused(assets: Assets, image_run: Path, clips: Path,  # noqa: F811
                                                       tmp_path: Path) -> None:
    cfg = load_recipe("tiny_video_pretrain", _overrides(assets, image_run, clips, steps=1,
                                                        **{"data.prompt": "Answer briefly."}))
    with pytest.raises((RecipeError, ValueError), match=r"has no \{question\} slot"):
        run_training(cfg, tmp_path / "run")
    with pytest.raises(RecipeError, match=r"video without image"):
        load_recipe("tiny_video_pretrain", _overrides(assets, image_run, clips, steps=1,
                                                      **{"model.modalities": ["video"]}))


def test_a_video_run_without_an_image_run_exports_the_encoder_it_reads_frames_with(
        assets: Assets, image_run: Path, clips: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = load_recipe("tiny_video_pretrain", _overrides(assets, image_run, clips, steps=1, **{"model.init_from": None}))
    result = run_training(cfg, tmp_path / "run")
    exported = load_file(str(result.run_dir / ADAPTER_FILE))
    assert any(k.startswith("image.encoder.") for k in exported) and any(k.startswith("video.") for k in exported)
    loaded = load_multimodal(result.run_dir)
    state = result.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
