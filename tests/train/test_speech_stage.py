"""The speech stage end to end on a tiny model (CPU): `tiny_speech_sft` trains the Conformer and the
speech adapter on synthetic espeak-ng ASR with the LM frozen, normalises features with the data's
statistics, exports only speech weights, and the export loads back to the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm_llama.checkpoints.loading import load_llama
from mm_llama.checkpoints.multimodal_loading import ADAPTER_FILE, load_multimodal
from mm_llama.data.synth import write_synth
from mm_llama.train.recipe import load_recipe
from mm_llama.train.trainer import make_source, run_training
from tests.train.test_trainer_setup import Assets, assets  # noqa: F401


def _overrides(a: Assets, speech: Path, steps: int) -> list[str]:
    values = {"model.base_lm": str(a.base_lm), "data.shards": [str(speech / "speech" / "train-*.tar")],
              "data.batch_size": 8, "train.steps": steps, "train.device": "cpu", "schedule.warmup_steps": 5,
              "checkpoint.every": 100, "logging.every": 1, "logging.progress": False, "logging.tensorboard": False,
              "optim.lr": 3e-3}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.fixture(scope="module")
def speech_run(assets: Assets, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    data = tmp_path_factory.mktemp("speech-data")
    write_synth("speech", data, n=24, seed=0, split="train")
    cfg = load_recipe("tiny_speech_sft", _overrides(assets, data, steps=40))
    return run_training(cfg, tmp_path_factory.mktemp("speech-run")), cfg


def test_speech_training_learns_and_keeps_the_lm_frozen(speech_run, assets: Assets) -> None:  # noqa: F811
    result, cfg = speech_run
    first, last = sum(result.history[:5]) / 5, sum(result.history[-5:]) / 5
    assert last < first - 0.05, result.history  # wiring: the loss moves (learning targets: the demo issue)
    assert list(result.model.parameter_groups()) == ["speech.encoder", "speech.adapter", "decoder"]
    from mm_llama.train.stages import build

    fresh = build(cfg).model  # the same seed: the weights the run started from
    for name in ("speech.encoder.input.weight", "speech.adapter.conv.weight", "speech.adapter.proj.weight"):
        assert not torch.equal(result.model.state_dict()[name], fresh.state_dict()[name]), name
    base = load_llama(assets.base_lm).state_dict()
    decoder = result.model.decoder.state_dict()
    assert all(torch.equal(decoder[k], v) for k, v in base.items())
    encoder = result.model.speech.encoder
    assert not torch.allclose(encoder.feature_mean, torch.zeros(80))  # the data's statistics, not 0 / 1
    assert float(encoder.feature_std.min()) > 0


def test_the_export_holds_speech_weights_only_and_loads_back(speech_run) -> None:
    result, cfg = speech_run
    exported = load_file(str(result.run_dir / ADAPTER_FILE))
    assert exported and all(k.startswith(("speech.", "decoder.tok_embeddings.media.speech.")) for k in exported)
    assert "speech.encoder.feature_mean" in exported
    loaded = load_multimodal(result.run_dir)
    from mm_llama.train.stages import Built
    from mm_llama.train.build import load_recipe_tokenizer

    tok, tok_dir = load_recipe_tokenizer(cfg)
    source = make_source(cfg, Built(result.model, tok, tok_dir, "adapter"), list(cfg.data.shards), rank=0,
                         world_size=1, evaluation=True)
    batch = next(source.iter_epoch(0, 0))
    model = result.model.eval()
    with torch.no_grad():
        text = batch.text
        expected = model(text.input_ids, media={"speech": batch}, attention_mask=text.attention_mask)
        got = loaded(text.input_ids, media={"speech": batch}, attention_mask=text.attention_mask)
    assert torch.equal(got, expected)


def test_an_image_run_and_a_speech_run_load_onto_one_lm(speech_run, assets: Assets,  # noqa: F811
                                                         tmp_path: Path) -> None:
    from mm_llama.checkpoints.multimodal_loading import modalities_from_fields, read_adapter_run_config
    from mm_llama.data.prompts import build_example
    from mm_llama.media_tokens import MediaTokens
    from mm_llama.multimodal import MultimodalLlama
    from mm_llama.train.build import load_adapter_weights
    from tests.train.test_adapter_union import _images
    from tests.train.test_trainer_setup import mm_overrides

    speech_result, speech_cfg = speech_run
    image_dir = tmp_path / "image-run"
    run_training(load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=2)), image_dir)
    lm = load_llama(assets.base_lm)
    fields = {**read_adapter_run_config(image_dir), "modalities": ["image", "speech"],
              "speech": read_adapter_run_config(speech_result.run_dir)["speech"]}
    both = MultimodalLlama(lm, modalities_from_fields(lm.cfg, fields)).eval()
    load_adapter_weights(both, [image_dir, speech_result.run_dir])

    from mm_llama.train.build import load_recipe_tokenizer
    from mm_llama.train.stages import Built

    tok, tok_dir = load_recipe_tokenizer(speech_cfg)
    source = make_source(speech_cfg, Built(speech_result.model, tok, tok_dir, "adapter"),
                         list(speech_cfg.data.shards), rank=0, world_size=1, evaluation=True)
    audio = next(source.iter_epoch(0, 0))
    media = MediaTokens(lm.cfg.vocab_size)
    image_tokens = torch.tensor([[1, media.image, 5, 9, 7]])
    with torch.no_grad():
        assert torch.equal(both(image_tokens, images=_images(1)),
                           load_multimodal(image_dir)(image_tokens, images=_images(1)))
        text = audio.text
        assert torch.equal(both(text.input_ids, media={"speech": audio}, attention_mask=text.attention_mask),
                           load_multimodal(speech_result.run_dir)(text.input_ids, media={"speech": audio},
                                                                  attention_mask=text.attention_mask))
        # one prompt with an image and a spoken question: the image token first, then the speech span
        spoken = build_example(tok, media, "asr", {"text": "x", "language": "en",
                                                   "n_speech_tokens": int((text.input_ids[0] == media.speech).sum())})
        ids = [spoken.input_ids[0], media.image] + spoken.input_ids[1:]
        one = type(audio)(audio.text, audio.features[:1], audio.feature_lengths[:1], audio.durations[:1])
        logits = both(torch.tensor([ids]), media={"image": _images(2), "speech": one})
    assert torch.isfinite(logits).all()
