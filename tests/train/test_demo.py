"""`mm-llama demo` end to end with `DemoSettings.quick()` (one run per module), resume, settings and the CLI."""

from __future__ import annotations

import base64
import html
import json
import re
import time
from pathlib import Path

import pytest
import torch

from mm_llama.cli import build_parser, main
from mm_llama.train.demo import AdapterStage, DemoError, DemoResult, DemoSettings, override_args, run_demo
from mm_llama.train.recipe import load_recipe

PNG = b"\x89PNG\r\n\x1a\n"
TRAINING_STAGES = ("lm", "encoder", "vision")
EVALS = ("eval-vqa", "eval-vqa-blank", "eval-caption", "eval-caption-blank")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine OpenMP spinning slows them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, _one_thread) -> tuple[DemoResult, float]:
    out = tmp_path_factory.mktemp("demo") / "run"
    start = time.perf_counter()
    result = run_demo(DemoSettings.quick(), out, device="cpu", progress=False, log=lambda line: None)
    return result, time.perf_counter() - start


def _outputs(out: Path) -> list[Path]:
    return [out / "tokenizer" / "tokenizer.json", out / "tokenizer" / "tokenizer.model",
            out / "lm" / "model" / "config.json", out / "lm" / "model" / "model.safetensors",
            out / "encoder" / "encoder.safetensors", out / "vision" / "adapter.safetensors",
            *(out / "eval" / f"{name}.json" for name in EVALS)]


def test_quick_demo_writes_every_stage_output(demo) -> None:
    result, _ = demo
    out = result.out
    for path in _outputs(out):
        assert path.is_file(), path
    for layout in ("image-caption", "image-qa", "image-chat"):
        assert {p.name.split("-")[0] for p in (out / "data" / layout).glob("*.tar")} == {"test", "train"}
    assert (out / "data" / "text" / "train-corpus.txt").is_file()
    config = load_recipe(out / "lm" / "config.yaml")
    assert config.data.options == {"allow_special": True} and config.train.steps == 3
    adapter = load_recipe(out / "vision" / "config.yaml")
    assert adapter.data.task == "vqa"  # each image's questions and caption as one conversation
    assert {Path(s).parent.name for s in adapter.data.shards} == {"image-chat"}
    for name in EVALS:
        data = json.loads((out / "eval" / f"{name}.json").read_text())
        assert data["settings"]["blank_images"] == name.endswith("blank") and data["records"]
    # the demo's images are square (DemoSettings.square_images): one tile, no letterbox padding
    assert json.loads((out / "data" / "synth-shapes-train.json").read_text())["options"] == {"square": True}


def test_metrics_json_has_every_number_in_range(demo) -> None:
    result, _ = demo
    data = json.loads(result.metrics_file.read_text())
    assert data == result.metrics
    m = data["metrics"]
    for key in ("vqa_accuracy", "vqa_exact_match", "majority_baseline", "blank_vqa_accuracy", "caption_exact_match",
                "blank_caption_exact_match"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["caption_cider"] >= 0.0 and m["blank_caption_cider"] >= 0.0
    assert data["samples"] == {"vqa": 8, "caption": 4}
    assert set(data["vqa_by_type"]) <= {"count", "colour", "shape", "position", "size", "exists"}
    assert all(0.0 <= t["vqa_accuracy"] <= 1.0 and 0.0 <= t["blank_vqa_accuracy"] <= 1.0
               for t in data["vqa_by_type"].values())
    assert list(data["stage_seconds"]) == ["data", "tokenizer", *TRAINING_STAGES, *EVALS]
    assert all(s > 0 for s in data["stage_seconds"].values())
    assert data["total_seconds"] == pytest.approx(sum(data["stage_seconds"].values()), abs=0.01)
    assert data["settings"] == DemoSettings.quick().to_dict()


def test_report_shows_images_predictions_metrics_and_curves(demo) -> None:
    result, _ = demo
    page = result.report.read_text()
    caption = json.loads((result.out / "eval" / "eval-caption.json").read_text())
    vqa = json.loads((result.out / "eval" / "eval-vqa.json").read_text())
    shown = caption["records"][: DemoSettings.quick().report_images]
    for record in shown:
        assert f'alt="{html.escape(record["key"])}"' in page
        assert html.escape(record["prediction"]) in page and html.escape(record["references"][0]) in page
    for record in vqa["records"]:
        if any(record["key"].startswith(s["key"] + "-q") for s in shown):
            assert html.escape(record["question"]) in page and html.escape(record["prediction"]) in page
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(shown) + len(TRAINING_STAGES)
    assert all(base64.b64decode(b)[:8] == PNG for b in images)
    for label in ("VQA accuracy", "VQA accuracy, blank images", "majority-answer baseline", "caption CIDEr",
                  "caption CIDEr, blank images", "wall time: lm"):
        assert f"<td>{html.escape(label)}" in page, label
    for stage in TRAINING_STAGES:
        assert (result.out / f"loss-{stage}.png").read_bytes()[:8] == PNG
    assert "| VQA accuracy" in result.table and "| majority-answer baseline" in result.table


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
    assert json.loads(result.metrics_file.read_text())["metrics"] == result.metrics["metrics"]
    printed = capsys.readouterr().out
    assert "[demo] lm: already complete" in printed and "[demo] vision: already complete" in printed
    assert "| VQA accuracy" in printed


def test_settings_are_validated_and_their_overrides_fit_the_recipes() -> None:
    for settings in (DemoSettings(), DemoSettings.quick()):
        assert settings.problems() == []
        load_recipe("tiny_lm_pretrain", override_args(settings.lm))
        load_recipe("tiny_image_encoder_pretrain", override_args(settings.encoder))
        for stage in settings.adapter_stages:
            load_recipe(stage.recipe, override_args(stage.overrides))
    two = DemoSettings(adapter_stages=[AdapterStage("vqa"), AdapterStage("caption", "caption", init_from="vqa")])
    assert two.problems() == [] and two.training_stages == ["lm", "encoder", "vqa", "caption"]
    bad = DemoSettings(train_images=0, vocab_size=100, lm={"train.steps=3": 1},
                       square_images="yes",  # type: ignore[arg-type]
                       adapter_stages=[AdapterStage("lm"), AdapterStage("b", "captions", init_from="c"),
                                       AdapterStage("d", layouts=("image-chats",))])
    problems = "\n".join(bad.problems())
    for text in ("train_images must be a positive integer, got 0", "vocab_size must be an integer >= 257",
                 "'train.steps=3' is not a dotted recipe key", "name is taken",
                 "task must be one of ['caption', 'vqa', 'caption_vqa'], got 'captions'",
                 "init_from 'c' is not an earlier adapter stage", "square_images must be true or false, got 'yes'",
                 "layouts must be shapes layouts ['image-caption', 'image-qa', 'image-chat'], got ('image-chats',)"):
        assert text in problems
    with pytest.raises(DemoError, match="invalid demo settings"):
        run_demo(bad, "unused")
    assert override_args({"data.shards": ["a b/{0..1}.tar"], "optim.lr": 1e-4, "x.y": None}) == [
        'data.shards=["a b/{0..1}.tar"]', "optim.lr=0.0001", "x.y=null"]


def test_help_lists_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--resume", "--overwrite", "--quick", "--device", "--threads", "--no-progress"):
        assert option in text
    assert "meaningless numbers" in text


def test_the_tokenizer_learns_answers_as_they_follow_the_assistant_header() -> None:
    """The chat shards go into tokenizer training with their special-token text cut out, so a one-word
    answer stands right after a line break there, as it does after the assistant header."""
    from mm_llama.data.synth.text import chat_turn
    from mm_llama.train.demo import SPECIAL_TOKEN_TEXT

    stripped = SPECIAL_TOKEN_TEXT.sub("\n", chat_turn("What colour is the circle?", "red"))
    assert "<|" not in stripped and "\nred\n" in stripped and "What colour is the circle?" in stripped
