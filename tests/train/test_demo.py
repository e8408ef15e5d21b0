"""`mm-llama demo` end to end with `DemoSettings.quick()` (one run per module: speech alone, then resumed with
every modality), resume, settings and the CLI."""

from __future__ import annotations

import html
import json
import tarfile
from pathlib import Path

import pytest
import torch

from mm_llama.cli import build_parser, main
from mm_llama.commands.demo import MODALITIES as CLI_MODALITIES
from mm_llama.train.demo import (
    MODALITIES, AdapterStage, DemoError, DemoResult, DemoSettings, override_args, run_demo,
)
from mm_llama.train.recipe import load_recipe

PNG = b"\x89PNG\r\n\x1a\n"
TRAINING_STAGES = ("lm", "encoder", "shape", "vision", "video", "speech-encoder", "speech")
IMAGE_EVALS = ("eval-vqa", "eval-vqa-blank", "eval-caption", "eval-caption-blank")
EVALS = (*IMAGE_EVALS, "eval-video_qa", "eval-video_qa-blank", "eval-asr", "eval-asr-blank")
STAGES = ("data-text", "tokenizer", "lm", "data-image", "encoder", "shape", "vision", *IMAGE_EVALS, "data-video", "video",
          "eval-video_qa", "eval-video_qa-blank", "data-speech", "speech-encoder", "speech", "eval-asr",
          "eval-asr-blank")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine OpenMP spinning slows them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def speech_first(tmp_path_factory: pytest.TempPathFactory, _one_thread) -> tuple[DemoResult, list[str]]:
    """The quick demo with ``modalities=["speech"]``: the shared stages and the speech ones only."""
    out = tmp_path_factory.mktemp("demo") / "run"
    lines: list[str] = []
    return run_demo(DemoSettings.quick(), out, modalities=["speech"], device="cpu", progress=False,
                    log=lines.append), lines


@pytest.fixture(scope="module")
def demo(speech_first) -> tuple[DemoResult, list[str]]:
    """The same folder resumed with every modality: the shared and speech stages are reused."""
    first, _ = speech_first
    lines: list[str] = []
    result = run_demo(DemoSettings.quick(), first.out, resume=True, device="cpu", progress=False, log=lines.append)
    return result, lines


def _outputs(out: Path) -> list[Path]:
    return [out / "tokenizer" / "tokenizer.json", out / "tokenizer" / "tokenizer.model",
            out / "lm" / "model" / "config.json", out / "lm" / "model" / "model.safetensors",
            out / "encoder" / "encoder.safetensors", out / "shape" / "adapter.safetensors",
            out / "vision" / "adapter.safetensors",
            out / "video" / "adapter.safetensors", out / "speech-encoder" / "speech_encoder.safetensors",
            out / "speech" / "adapter.safetensors", *(out / "eval" / f"{name}.json" for name in EVALS)]


def test_a_subset_runs_only_its_stages_and_a_resume_adds_the_others(speech_first, demo) -> None:
    first, first_lines = speech_first
    ran = [line.split(":")[0].removeprefix("[demo] ") for line in first_lines
           if ": done in " in line and not line.startswith("[demo] report")]
    assert ran == ["data-text", "tokenizer", "lm", "data-speech", "speech-encoder", "speech", "eval-asr",
                   "eval-asr-blank"]
    assert set(first.metrics) >= {"speech"} and not {"image", "video"} & set(first.metrics)
    _, lines = demo
    for shared in ("data-text", "tokenizer", "lm", "speech", "eval-asr"):
        assert f"[demo] {shared}: already complete" in "\n".join(lines), shared
    assert any(line.startswith("[demo] video: done in") for line in lines)


def test_quick_demo_writes_every_stage_output(demo) -> None:
    result, _ = demo
    out = result.out
    for path in _outputs(out):
        assert path.is_file(), path
    for layout in ("image-caption", "image-qa", "image-chat", "video-qa", "video-chat", "speech"):
        assert {p.name.split("-")[0] for p in (out / "data" / layout).glob("[!o]*.tar")} == {"test", "train"}, layout
    assert [p.name for p in (out / "data" / "image-caption").glob("objects-*.tar")] == ["objects-train-000000.tar"]
    assert (out / "data" / "text" / "train-corpus.txt").is_file()
    config = load_recipe(out / "lm" / "config.yaml")
    assert config.data.options == {"allow_special": True} and config.train.steps == 3
    assert {Path(s).parent.name for s in config.data.shards} == {"text", "asr-text"}
    encoder = load_recipe(out / "encoder" / "config.yaml")  # the objects captions, on the settings' backbone
    assert [Path(s).name for s in encoder.data.shards] == ["objects-train-000000.tar"]
    backbone = {k.removeprefix("model.vision."): v for k, v in DemoSettings().vision.items()}
    shape = load_recipe(out / "shape" / "config.yaml")  # shape and colour questions, the encoder frozen
    assert shape.data.options == {"question_types": ["shape", "colour"]} and shape.model.train == ["image.fusion"]
    assert {Path(s).parent.name for s in shape.data.shards} == {"image-qa"}
    adapter = load_recipe(out / "vision" / "config.yaml")
    assert adapter.data.task == "vqa"  # each image's questions and caption as one conversation
    assert {Path(s).parent.name for s in adapter.data.shards} == {"image-chat"}
    assert Path(adapter.model.init_from) == out / "shape" and adapter.model.train == ["image.fusion"]
    for run in (encoder, shape, adapter):
        assert {k: run.model.vision[k] for k in backbone} == backbone
    video = load_recipe(out / "video" / "config.yaml")
    assert Path(video.model.init_from) == out / "vision" and video.data.prompt is None
    speech = load_recipe(out / "speech" / "config.yaml")
    assert Path(speech.model.speech["encoder_checkpoint"]) == out / "speech-encoder"
    assert {Path(s).parent.name for s in speech.data.shards} == {"speech", "speech-silence"}
    controls = {"vqa": "blank_images", "caption": "blank_images", "video_qa": "blank_video", "asr": "blank_audio"}
    for name in EVALS:
        data = json.loads((out / "eval" / f"{name}.json").read_text())
        task = name.removeprefix("eval-").removesuffix("-blank")
        assert data["settings"][controls[task]] == name.endswith("blank") and data["records"], name
    # the demo's images are square (DemoSettings.square_images): one tile, no letterbox padding
    assert json.loads((out / "data" / "synth-shapes-train.json").read_text())["options"] == {"square": True}


def test_the_lm_reads_each_speech_training_transcript_stretched_over_the_user_turn(demo) -> None:
    from mm_llama.data.packed_text import read_documents
    from mm_llama.data.synth.speech_span_text import FILLER
    from mm_llama.train.demo_data import SILENCE_TRANSCRIPT

    out = demo[0].out
    exchanges = [t for shard in sorted((out / "data" / "asr-text").glob("*.tar")) for t in read_documents(shard)]
    spoken = []
    for shard in sorted((out / "data" / "speech").glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            spoken += [json.loads(tar.extractfile(m).read())["text"] for m in tar if m.name.endswith(".json")]  # type: ignore[union-attr]
    settings = DemoSettings.quick()
    copies, silent = settings.asr_text_copies, settings.speech_silent_clips * settings.asr_text_copies
    assert len(spoken) == settings.speech_train_utterances and len(exchanges) == copies * len(spoken) + silent
    for index, exchange in enumerate(exchanges):
        text = spoken[index // copies] if index < copies * len(spoken) else SILENCE_TRANSCRIPT
        head, user, answer = exchange.split("<|start_header_id|>")[1:]
        assert head == "system<|end_header_id|>\n\nRepeat after me in English:<|eot_id|>"
        assert answer == f"assistant<|end_header_id|>\n\n{text}<|eot_id|>"
        span = user.removeprefix("user<|end_header_id|>\n\n").removesuffix("<|eot_id|>")
        assert span.startswith(FILLER) and span.replace(FILLER, "") == text
    assert len(set(exchanges[:copies])) == copies  # each copy stretched its own way
    speech = load_recipe(out / "speech" / "config.yaml")
    assert speech.model.speech["ctc"]["blank"] == FILLER


def test_metrics_json_has_every_number_in_range(demo) -> None:
    result, _ = demo
    data = json.loads(result.metrics_file.read_text())
    assert data == result.metrics
    m = data["image"]["metrics"]
    for key in ("vqa_accuracy", "vqa_exact_match", "majority_baseline", "blank_vqa_accuracy", "caption_exact_match",
                "blank_caption_exact_match"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["caption_cider"] >= 0.0 and m["blank_caption_cider"] >= 0.0
    assert data["image"]["samples"] == {"vqa": 8, "caption": 4}
    assert set(data["image"]["vqa_by_type"]) <= {"count", "colour", "shape", "position", "size", "exists"}
    assert all(0.0 <= t["vqa_accuracy"] <= 1.0 and 0.0 <= t["blank_vqa_accuracy"] <= 1.0
               for t in data["image"]["vqa_by_type"].values())
    video = data["video"]["metrics"]
    assert all(0.0 <= video[k] <= 1.0 for k in ("vqa_accuracy", "majority_baseline", "frozen_vqa_accuracy"))
    assert data["video"]["samples"]["questions"] == 4
    assert data["speech"]["samples"]["utterances"] == 2 and data["speech"]["metrics"]["wer"] >= 0.0
    assert list(data["stage_seconds"]) == list(STAGES)
    assert all(s > 0 for s in data["stage_seconds"].values())
    assert data["total_seconds"] == pytest.approx(sum(data["stage_seconds"].values()), abs=0.01)
    assert data["settings"] == {**DemoSettings.quick().to_dict(), "modalities": list(MODALITIES)}


def test_report_shows_samples_predictions_metrics_and_curves(demo) -> None:
    result, _ = demo
    page = result.report.read_text()
    caption = json.loads((result.out / "eval" / "eval-caption.json").read_text())
    vqa = json.loads((result.out / "eval" / "eval-vqa.json").read_text())
    shown = caption["records"][: DemoSettings.quick().report_samples]
    for record in shown:
        assert f'alt="{html.escape(record["key"])}"' in page
        assert html.escape(record["prediction"]) in page and html.escape(record["references"][0]) in page
    for record in vqa["records"]:
        if any(record["key"].startswith(s["key"] + "-q") for s in shown):
            assert html.escape(record["question"]) in page and html.escape(record["prediction"]) in page
    asr = json.loads((result.out / "eval" / "eval-asr.json").read_text())
    for record in asr["records"]:
        assert html.escape(record["reference"]) in page
    assert page.count("<audio") == len(asr["records"])
    assert page.count("data:image/gif;base64,") >= 1  # the clips, animated
    for label in ("VQA accuracy", "VQA accuracy, blank images", "majority-answer baseline", "caption CIDEr",
                  "caption CIDEr, blank images", "video QA accuracy, frozen frame", "ASR word error rate, silence",
                  "wall time: lm"):
        assert f"<td>{html.escape(label)}" in page, label
    for stage in TRAINING_STAGES:
        assert (result.out / f"loss-{stage}.png").read_bytes()[:8] == PNG
    assert "| VQA accuracy" in result.table and "| ASR word error rate" in result.table


def test_existing_runs_need_a_flag_and_the_same_settings(demo, tmp_path) -> None:
    result, _ = demo
    with pytest.raises(DemoError, match="--resume to continue it, --overwrite"):
        run_demo(DemoSettings.quick(), result.out, log=lambda line: None)
    changed = DemoSettings.quick()
    changed.train_images = 9
    with pytest.raises(DemoError, match="settings changed.*train_images: 8 -> 9"):
        run_demo(changed, result.out, resume=True, log=lambda line: None)
    with pytest.raises(DemoError, match="exclude each other"):
        run_demo(DemoSettings.quick(), result.out, resume=True, overwrite=True)
    (tmp_path / "data").mkdir()  # not a demo folder: never written over, even with --overwrite
    with pytest.raises(DemoError, match="not a demo run folder"):
        run_demo(DemoSettings.quick(), tmp_path, overwrite=True)
    assert (tmp_path / "data").is_dir()


def test_resume_after_a_finished_run_retrains_nothing_and_rewrites_the_report(demo, capsys) -> None:
    result, _ = demo
    out = result.out
    before = {p: p.stat().st_mtime_ns for p in _outputs(out)}
    checkpoints = sorted(p.name for p in (out / "lm").glob("ckpt-*"))
    result.report.unlink()
    result.metrics_file.unlink()
    code = main(["demo", "--quick", "--out", str(out), "--resume", "--device", "cpu", "--threads", "1",
                 "--no-progress"])
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in _outputs(out)} == before
    assert sorted(p.name for p in (out / "lm").glob("ckpt-*")) == checkpoints
    assert result.report.is_file()
    assert json.loads(result.metrics_file.read_text())["image"] == result.metrics["image"]
    printed = capsys.readouterr().out
    for stage in ("lm", "vision", "video", "speech", "eval-asr-blank"):
        assert f"[demo] {stage}: already complete" in printed, stage
    assert "| VQA accuracy" in printed


def test_settings_are_validated_and_their_overrides_fit_the_recipes() -> None:
    for settings in (DemoSettings(), DemoSettings.quick()):
        assert settings.problems() == []
        load_recipe("tiny_lm_pretrain", override_args(settings.lm))
        load_recipe("tiny_image_encoder_pretrain", override_args({**settings.vision, **settings.encoder}))
        for stage in settings.adapter_stages:
            load_recipe(stage.recipe, override_args({**settings.vision, **stage.overrides}))
        load_recipe("tiny_video_pretrain", override_args({**settings.vision, **settings.video}))
        load_recipe("tiny_speech_sft", override_args(settings.speech))
        if settings.speech_pretrain is not None:
            load_recipe("tiny_speech_bestrq", override_args(settings.speech_pretrain))
    two = DemoSettings(adapter_stages=[AdapterStage("vqa"), AdapterStage("caption", "caption", init_from="vqa")])
    assert two.problems() == []
    bad = DemoSettings(train_images=0, encoder_images=-1, vocab_size=100, lm={"train.steps=3": 1},
                       vision={"model.vision.stem_pixel_path": "mean", "model.fusion_layers": [0]},
                       square_images="yes", asr_text_copies=-2,  # type: ignore[arg-type]
                       adapter_stages=[AdapterStage("lm"), AdapterStage("b", "captions", init_from="c"),
                                       AdapterStage("d", layouts=("image-chats",))])
    problems = "\n".join(bad.problems())
    for text in ("train_images must be a positive integer, got 0", "encoder_images must be a positive integer, got -1",
                 "vision: key 'model.fusion_layers' is not under model.vision.",
                 "vocab_size must be an integer >= 257",
                 "'train.steps=3' is not a dotted recipe key", "name is taken",
                 "task must be one of ['caption', 'vqa', 'caption_vqa'], got 'captions'",
                 "init_from 'c' is not an earlier adapter stage", "square_images must be true or false, got 'yes'",
                 "asr_text_copies must be a non-negative integer, got -2",
                 "layouts must be shapes layouts ['image-caption', 'image-qa', 'image-chat'], got ('image-chats',)"):
        assert text in problems
    with pytest.raises(DemoError, match="invalid demo settings"):
        run_demo(bad, "unused")
    with pytest.raises(DemoError, match="non-empty subset of image, video, speech, got sound"):
        run_demo(DemoSettings.quick(), "unused", modalities=["sound"])
    with pytest.raises(DemoError, match="got nothing"):
        run_demo(DemoSettings.quick(), "unused", modalities=[])
    assert override_args({"data.shards": ["a b/{0..1}.tar"], "optim.lr": 1e-4, "x.y": None}) == [
        'data.shards=["a b/{0..1}.tar"]', "optim.lr=0.0001", "x.y=null"]


def test_help_lists_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--modality", "--resume", "--overwrite", "--quick", "--device", "--threads",
                   "--no-progress"):
        assert option in text
    assert "meaningless numbers" in text


def test_the_modality_option_reads_a_comma_list(capsys) -> None:
    assert CLI_MODALITIES == MODALITIES  # the CLI keeps its own copy so that --help does not import torch
    args = build_parser().parse_args(["demo", "--modality", "speech, image,speech"])
    assert args.modality == ("speech", "image")
    assert build_parser().parse_args(["demo"]).modality == MODALITIES
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--modality", "image,sound"])
    assert exit_info.value.code == 2
    assert "expected a comma-separated list of image, video, speech, got 'image,sound'" in capsys.readouterr().err


def test_the_tokenizer_learns_answers_as_they_follow_the_assistant_header() -> None:
    """The chat shards go into tokenizer training with their special-token text cut out, so a one-word
    answer stands right after a line break there, as it does after the assistant header."""
    from mm_llama.data.synth.text import chat_turn
    from mm_llama.train.demo import SPECIAL_TOKEN_TEXT

    stripped = SPECIAL_TOKEN_TEXT.sub("\n", chat_turn("What colour is the circle?", "red"))
    assert "<|" not in stripped and "\nred\n" in stripped and "What colour is the circle?" in stripped
