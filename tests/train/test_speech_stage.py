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


def _args(values: dict[str, object]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _overrides(a: Assets, speech: Path, steps: int, more: dict[str, object] | None = None) -> list[str]:
    """Each key once (a key given twice is refused): `more` replaces these defaults."""
    return _args({"model.base_lm": str(a.base_lm), "data.shards": [str(speech / "speech" / "train-*.tar")],
                  "data.batch_size": 8, "train.steps": steps, "train.device": "cpu", "schedule.warmup_steps": 5,
                  "checkpoint.every": 100, "logging.every": 1, "logging.progress": False,
                  "logging.tensorboard": False, "optim.lr": 3e-3, **(more or {})})


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


@pytest.fixture(scope="module")
def image_speech_run(speech_run, assets: Assets, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """An image run (2 steps), then a run with both modalities that loads it and the speech run
    (`model.init_from: [image_run, speech_run]`) and trains only the speech adapter for 2 steps."""
    from mm_llama.checkpoints.multimodal_loading import read_adapter_run_config
    from tests.train.test_trainer_setup import mm_overrides

    speech_result, speech_cfg = speech_run
    image_dir = tmp_path_factory.mktemp("image-run")
    run_training(load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=2)), image_dir)
    image = read_adapter_run_config(image_dir)
    values = {"model.modalities": ["image", "speech"], "model.encoder": image["encoder"], "model.vision": image["vision"],
              "model.fusion_layers": image["fusion_layers"], "model.train": ["speech.adapter"],
              "model.init_from": [str(image_dir), str(speech_result.run_dir)], "schedule.warmup_steps": 1}
    speech_data = Path(speech_cfg.data.shards[0]).parent.parent
    cfg = load_recipe("tiny_speech_sft", _overrides(assets, speech_data, steps=2, more=values))
    return run_training(cfg, tmp_path_factory.mktemp("image-speech-run")), image_dir, speech_result.run_dir


def test_a_run_from_an_image_run_and_a_speech_run_exports_both(image_speech_run) -> None:
    result, image_dir, speech_dir = image_speech_run
    exported = load_file(str(result.run_dir / ADAPTER_FILE))
    image, speech = load_file(str(image_dir / ADAPTER_FILE)), load_file(str(speech_dir / ADAPTER_FILE))
    assert set(exported) == set(image) | set(speech)  # the loaded image adapter too, though this run froze it
    assert all(torch.equal(exported[k], v) for k, v in image.items())
    assert all(torch.equal(exported[k], v) for k, v in speech.items() if k.startswith("speech.encoder."))  # frozen
    assert not torch.equal(exported["speech.adapter.proj.weight"], speech["speech.adapter.proj.weight"])
    from mm_llama.media_tokens import MediaTokens
    from tests.train.test_adapter_union import _images

    loaded = load_multimodal(result.run_dir)
    assert loaded.modality_names == ("image", "speech")
    tokens = torch.tensor([[1, MediaTokens(loaded.text_cfg.vocab_size).image, 5, 9, 7]])
    with torch.no_grad():  # the image path answers as the image run alone does
        assert torch.equal(loaded(tokens, images=_images(1)), load_multimodal(image_dir)(tokens, images=_images(1)))


def _greedy_without_cache(model, ids: list[int], media: dict, stop: frozenset[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step: no KV cache, no prefill media cache."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + out]), media=media)[0, -1].argmax())
            if token in stop:
                break
            out.append(token)
    return out


def test_ask_answers_a_spoken_question_about_an_image(image_speech_run, tmp_path: Path, capsys) -> None:
    import numpy as np
    import soundfile
    from PIL import Image

    from mm_llama.cli import main
    from mm_llama.generation import GenerationConfig
    from mm_llama.image_chat import load_image_model
    from mm_llama.media_chat import media_prompt
    from mm_llama.media_tokens import MediaTokens

    result, _, _ = image_speech_run
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    t = np.arange(int(1.3 * 44100)) / 44100  # 1.3 s, 44.1 kHz stereo: resampled and mixed down
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    soundfile.write(tmp_path / "q.wav", np.stack([wave, 0.5 * wave], axis=1), 44100)
    soundfile.write(tmp_path / "r.wav", 0.1 * rng.standard_normal((16000, 2)), 16000)

    assert main(["ask", "--model", str(result.run_dir), "--image", str(tmp_path / "a.png"), "--audio",
                 str(tmp_path / "q.wav"), "--question", "and?", "--max-new-tokens", "6", "--json",
                 "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model, tok = load_image_model(result.run_dir, dtype=torch.float32, device="cpu")
    prompt = media_prompt(model, tok, image=str(tmp_path / "a.png"), audio=str(tmp_path / "q.wav"), text="and?")
    ids, media_ids = prompt.ids, MediaTokens(model.text_cfg.vocab_size)
    at = ids.index(media_ids.image)  # <|image|>, then the speech span, then the typed text
    assert ids[at + 1] == media_ids.speech_start and ids.count(media_ids.speech_end) == 1
    assert ids[ids.index(media_ids.speech_end) + 1:][:len(tok.encode("and?"))] == tok.encode("and?")
    expected = _greedy_without_cache(model, ids, prompt.media, GenerationConfig.for_tokenizer(tok).stop_ids, 6)
    assert printed["answer"] == tok.decode(expected).strip()
    with torch.no_grad():  # both inputs reach the answer: another image, or other speech, moves its logits
        first = model(torch.tensor([ids]), media=prompt.media)[0, -1]
        other_image = media_prompt(model, tok, image=str(tmp_path / "b.png"), audio=str(tmp_path / "q.wav"),
                                   text="and?")
        other_audio = media_prompt(model, tok, image=str(tmp_path / "a.png"), audio=str(tmp_path / "r.wav"),
                                   text="and?")
        assert not torch.allclose(model(torch.tensor([other_image.ids]), media=other_image.media)[0, -1], first)
        assert not torch.allclose(model(torch.tensor([other_audio.ids]), media=other_audio.media)[0, -1], first)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give an image, audio or both"),
    ({"image": "unread.png"}, "ask a question"),
])
def test_ask_says_what_is_missing(image_speech_run, kwargs: dict, message: str, tmp_path: Path) -> None:
    from mm_llama.image_chat import load_image_model
    from mm_llama.media_chat import media_prompt

    result, _, speech_dir = image_speech_run
    model, tok = load_image_model(result.run_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=message):
        media_prompt(model, tok, **kwargs)
    speech_only, tok = load_image_model(speech_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"reads \['speech'\], not image"):
        media_prompt(speech_only, tok, image="x.png", text="what?")
