"""`mm-llama video-qa` and `mm-llama ask --video` end to end on a tiny random image + video adapter run saved
by the test: answers equal a no-cache greedy decode of the training prompt, the question wordings are the
paper's verbatim, unreadable clips are named and skipped, and a model without video is refused."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm_llama import LlamaDecoder, preset
from mm_llama.adapters.perceiver import PerceiverConfig
from mm_llama.checkpoints.hf import save_hf
from mm_llama.checkpoints.multimodal_loading import save_adapter
from mm_llama.cli import main
from mm_llama.data.decoders import decode_video
from mm_llama.data.image_transform import ImageTransform, collate_images
from mm_llama.data.prompts import prompt_ids
from mm_llama.data.synth.moving_shapes import make_moving_shapes_sample
from mm_llama.encoders.mllama_vision import VisionConfig
from mm_llama.generation import GenerationConfig
from mm_llama.image_chat import load_image_model
from mm_llama.media_tokens import MediaTokens
from mm_llama.modalities import ImageModality, VideoModality
from mm_llama.multimodal import MultimodalLlama
from mm_llama.tiny_checkpoint import sample_sentences
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer
from tests.train.test_speech_stage import _greedy_without_cache

VISION = VisionConfig(tile_size=28, patch_size=14, width=32, heads=4, mlp_dim=64, n_local_layers=2,
                      n_global_layers=1, max_tiles=4, taps=(1,))
AGGREGATOR = PerceiverConfig(depth=1, n_heads=2, head_dim=16, n_latents=4, ffn_mult=2, group_size=8)


@dataclass
class Clip:
    """A clip as the test reads it: the frames `[K, 3, H, W]` uint8 `decode_video` gives."""

    path: Path
    frames: torch.Tensor


@dataclass
class Frames:
    """What the video modality reads, built here: frames tiled as images, `[1, K, T, 3, H, W]`."""

    frames: object
    frame_mask: torch.Tensor


TRANSFORM = ImageTransform(tile_size=VISION.tile_size, max_tiles=VISION.max_tiles)


def video_input(frames: torch.Tensor) -> Frames:
    """One clip `[K, 3, H, W]` uint8, each frame tiled by `ImageTransform`, as the model's video input."""
    pixels = collate_images([[TRANSFORM.tile_tensor(f) for f in frames]], max_tiles=VISION.max_tiles)
    return Frames(pixels, pixels.aspect_ratio_ids > 0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tiny_run(root: Path, *, video: bool = True, seed: int = 0) -> Path:
    """A tiny random LM (tokenizer beside it) and an image (+ video) adapter run on it, gates open so the
    media move the logits; returns the run directory."""
    lm_dir = root / "lm"
    train_llama3_tokenizer(sample_sentences(), 300, lm_dir)
    text = preset("tiny", vocab_size=Tokenizer.from_dir(lm_dir).vocab_size, n_layers=4)
    torch.manual_seed(seed)
    lm = LlamaDecoder(text)
    save_hf(lm, lm_dir)
    image = ImageModality(text, VISION, fusion_layers=(1, 3))
    modalities = [image, VideoModality(text, image, AGGREGATOR)] if video else [image]
    model = MultimodalLlama(lm, modalities)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.6)
    return save_adapter(model, root / "run", base_lm=lm_dir)


@pytest.fixture(scope="module")
def video_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("video-run"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Clip]:
    folder = tmp_path_factory.mktemp("clips")
    out = []
    for i in range(2):
        path = folder / f"clip{i}.mp4"
        path.write_bytes(make_moving_shapes_sample(seed=3, split="test", index=i).mp4)
        out.append(Clip(path, decode_video(path.read_bytes(), str(path), 16)))
    return out


def _expected(run: Path, frames: torch.Tensor, question: str | None, n: int, task: str = "video_qa") -> str:
    """The answer computed here: the training prompt with the question as given, each frame tiled by
    `ImageTransform`, greedy decoding that recomputes the whole sequence at every step."""
    model, tok = load_image_model(run, dtype=torch.float32, device="cpu")
    media = MediaTokens(model.text_cfg.vocab_size)
    ids = prompt_ids(tok, media, task, {} if question is None else {"question": question})
    stop = GenerationConfig.for_tokenizer(tok).stop_ids
    return tok.decode(_greedy_without_cache(model, ids, {"video": video_input(frames)}, stop, n)).strip()


def test_video_qa_answers_as_a_no_cache_greedy_decode_of_the_short_answer_prompt(video_run: Path, clips: list[Clip],
                                                                                 capsys) -> None:
    question = "Which way does the red circle move?"
    assert main(["video-qa", "--model", str(video_run), "--video", str(clips[0].path), "--video", str(clips[1].path),
                 "--question", question, "--max-new-tokens", "5", "--json", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    sent = f"Answer the question using a single word or phrase. {question}"
    assert [r["video"] for r in rows] == [str(c.path) for c in clips]
    assert all(r["question"] == sent for r in rows)
    expected = [_expected(video_run, c.frames, sent, 5) for c in clips]
    assert [r["answer"] for r in rows] == expected
    assert expected[0]  # a random model still says something: the comparison is not between empty strings


def test_video_qa_without_a_question_captions_with_the_training_instruction(video_run: Path, clips: list[Clip],
                                                                            capsys) -> None:
    assert main(["video-qa", "--model", str(video_run), "--video", str(clips[1].path), "--max-new-tokens", "4",
                 "--json", "--num-frames", "6", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["question"] == "Describe this video in one sentence."
    frames = decode_video(clips[1].path.read_bytes(), "clip", 6)
    assert row["answer"] == _expected(video_run, frames, None, 4, task="video_caption")


@pytest.mark.parametrize("style, sent", [
    ("short", "Answer the question using a single word or phrase. Does the square move?"),
    ("choice", "Select the correct answer from the following options: Does the square move? (A) yes (B) no. "
               "Answer with the correct option letter and nothing else"),
    ("plain", "Does the square move?"),
])
def test_question_styles_send_the_papers_wordings_verbatim(video_run: Path, clips: list[Clip], style: str, sent: str,
                                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import mm_llama.media_chat as media_chat

    prompts: list[list[int]] = []
    real = media_chat.generate

    def spy(model, ids, gen, **kwargs):
        prompts.extend(ids)
        return real(model, ids, gen, **kwargs)

    monkeypatch.setattr(media_chat, "generate", spy)
    question = "Does the square move?" + (" (A) yes (B) no" if style == "choice" else "")
    assert main(["video-qa", "--model", str(video_run), "--video", str(clips[0].path), "--question", question,
                 "--style", style, "--max-new-tokens", "2", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["question"] == sent
    tok = Tokenizer.from_dir(video_run.parent / "lm")
    media = MediaTokens(preset("tiny", vocab_size=tok.vocab_size).vocab_size)
    assert prompts == [prompt_ids(tok, media, "video_qa", {"question": sent})]
    assert prompts[0].count(media.video) == 1 and media.image not in prompts[0]


def test_an_unreadable_clip_is_named_and_skipped_while_the_good_one_is_answered(video_run: Path, clips: list[Clip],
                                                                                tmp_path: Path, capsys) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(clips[0].path.read_bytes()[:300])  # a truncated mp4
    missing = tmp_path / "missing.mp4"
    code = main(["video-qa", "--model", str(video_run), "--video", str(corrupt), "--video", str(clips[0].path),
                 "--video", str(missing), "--question", "How many shapes are there?", "--max-new-tokens", "3",
                 "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"skipped {corrupt}: cannot decode {corrupt}" in err and f"skipped {missing}: cannot read {missing}" in err
    assert "2 of 3 clip(s) could not be read" in err
    sent = "Answer the question using a single word or phrase. How many shapes are there?"
    assert out.splitlines() == [f"{clips[0].path}: {_expected(video_run, clips[0].frames, sent, 3)}"]


def test_a_model_without_video_is_refused_in_one_line(tmp_path: Path, clips: list[Clip], capsys) -> None:
    run = write_tiny_run(tmp_path, video=False)
    assert main(["video-qa", "--model", str(run), "--video", str(clips[0].path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reads ['image'], not video" in err


def test_ask_with_an_image_and_a_video_uses_both(video_run: Path, clips: list[Clip], tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / name)
    question = "Is the object in the photo the one that moves in the clip?"
    assert main(["ask", "--model", str(video_run), "--image", str(tmp_path / "a.png"), "--video", str(clips[0].path),
                 "--question", question, "--max-new-tokens", "5", "--json", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["video"] == str(clips[0].path) and printed["image"] == str(tmp_path / "a.png")

    model, tok = load_image_model(video_run, dtype=torch.float32, device="cpu")
    media = MediaTokens(model.text_cfg.vocab_size)
    ids = [tok.bos_id, *tok.encode_header("user"), media.image, media.video, *tok.encode(question), tok.eot_id,
           *tok.encode_header("assistant")]

    def inputs(image: str, frames: torch.Tensor) -> dict:
        return {"image": collate_images([[TRANSFORM(image)]], max_tiles=VISION.max_tiles), "video": video_input(frames)}

    both = inputs(str(tmp_path / "a.png"), clips[0].frames)
    stop = GenerationConfig.for_tokenizer(tok).stop_ids
    assert printed["answer"] == tok.decode(_greedy_without_cache(model, ids, both, stop, 5)).strip()
    with torch.no_grad():  # each input reaches the answer: another image, or another clip, moves its logits
        first = model(torch.tensor([ids]), media=both)[0, -1]
        other_image = model(torch.tensor([ids]), media=inputs(str(tmp_path / "b.png"), clips[0].frames))[0, -1]
        other_clip = model(torch.tensor([ids]), media=inputs(str(tmp_path / "a.png"), clips[1].frames))[0, -1]
    assert not torch.allclose(first, other_image) and not torch.allclose(first, other_clip)


def test_a_run_is_asked_as_it_was_trained(tmp_path: Path) -> None:
    import yaml

    from mm_llama.video_chat import run_video_settings

    def run(data: dict) -> tuple:
        directory = tmp_path / str(len(list(tmp_path.iterdir())))
        directory.mkdir()
        (directory / "config.yaml").write_text(yaml.safe_dump({"model": {}, "data": data}))
        return run_video_settings(directory)

    short = "Answer the question using a single word or phrase. {question}"
    assert run({"task": "video_qa", "num_frames": 8, "prompt": short}) == (8, "short")
    assert run({"task": "video_qa", "num_frames": 4, "prompt": None}) == (4, "plain")
    assert run({"task": "video_qa", "prompt": "Say it: {question}"}) == (None, None)  # not a wording we can name
    assert run({"task": "vqa", "num_frames": 8}) == (None, None)
    assert run_video_settings(tmp_path / "missing") == (None, None)


def test_a_clip_shorter_than_the_frame_count_repeats_its_frames(video_run: Path, clips: list[Clip], capsys) -> None:
    """16 frames asked for 40: each decoded frame is used two or three times, in order (uniform sampling
    over the clip's duration), so the model still sees 40 frames, the last group padded and masked."""
    frames = decode_video(clips[0].path.read_bytes(), "clip", 40)
    assert frames.shape[0] == 40
    distinct = [0] + [i for i in range(1, 40) if not torch.equal(frames[i], frames[i - 1])]
    assert len(distinct) <= 16 and all(b - a <= 3 for a, b in zip(distinct, distinct[1:] + [40]))
    assert main(["video-qa", "--model", str(video_run), "--video", str(clips[0].path), "--question", "Does it move?",
                 "--num-frames", "40", "--max-new-tokens", "4", "--json", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out)
    sent = "Answer the question using a single word or phrase. Does it move?"
    assert row["answer"] == _expected(video_run, frames, sent, 4)
