"""`mm-llama eval` end to end: a tiny random Llama 3.2 Vision checkpoint on synthetic shapes test shards."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

from mm_llama.commands import evaluate
from mm_llama.data.synth import write_synth
from mm_llama.tiny_checkpoint import sample_sentences
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer
from mm_llama.train.eval_reader import CorruptSampleWarning
from tests.reference.hf_mllama import save_hf_mllama, tiny_hf_mllama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning
    threads make them orders of magnitude slower; run this module single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mllama")
    train_llama3_tokenizer(sample_sentences(), 300, path)
    save_hf_mllama(tiny_hf_mllama(vocab=Tokenizer.from_dir(path).vocab_size), path)
    return path


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth("shapes", out, n=2, seed=1, split="test", samples_per_shard=4)
    return out


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    evaluate.add_parser(sub)
    args = p.parse_args(["eval", *argv])
    return args.run(args)


def test_vqa_writes_the_default_result_file_and_prints_a_table(model_dir: Path, synth_dir: Path, capsys) -> None:
    code = _run(["--model", str(model_dir), "--shards", str(synth_dir / "image-qa"), "--task", "vqa",
                 "--max-samples", "5", "--batch-size", "4", "--max-new-tokens", "2", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "VQA accuracy" in out and "majority-answer baseline" in out and "samples" in out
    path = model_dir / "eval-vqa.json"
    assert f"results: {path}" in out
    data = json.loads(path.read_text())
    assert set(data["metrics"]) == {"vqa_accuracy", "exact_match", "majority_baseline"}
    assert all(0.0 <= v <= 1.0 for v in data["metrics"].values())
    assert data["counts"]["samples"] == len(data["records"]) == 5
    assert data["settings"]["model"] == str(model_dir) and data["settings"]["dtype"] == "float32"
    assert data["settings"]["blank_images"] is False and data["settings"]["batch_size"] == 4
    assert {"key", "question", "prediction", "references"} <= set(data["records"][0])


def test_blank_images_control_goes_to_its_own_file(model_dir: Path, synth_dir: Path, capsys) -> None:
    assert _run(["--model", str(model_dir), "--shards", str(synth_dir / "image-qa"), "--task", "vqa",
                 "--max-samples", "3", "--max-new-tokens", "2", "--blank-images", "--no-progress"]) == 0
    assert "blank images" in capsys.readouterr().out
    data = json.loads((model_dir / "eval-vqa-blank.json").read_text())
    assert data["settings"]["blank_images"] is True and data["counts"]["samples"] == 3


def test_caption_with_explicit_output_and_shard_list(model_dir: Path, synth_dir: Path, tmp_path: Path, capsys) -> None:
    shards = sorted(str(p) for p in (synth_dir / "image-caption").glob("*.tar"))
    out = tmp_path / "results" / "caption.json"
    assert _run(["--model", str(model_dir), "--shards", *shards, "--task", "caption", "--max-new-tokens", "4",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert "CIDEr" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["metrics"]["cider"] >= 0.0 and 0.0 <= data["metrics"]["exact_match"] <= 1.0
    assert data["counts"]["samples"] == len(data["records"]) == 2
    assert data["settings"]["shards"] == shards


def _predictions(path: Path) -> list[tuple[str, str, str]]:
    return [(r["key"], r["question"], r["prediction"]) for r in json.loads(path.read_text())["records"]]


def test_shards_take_training_specs_pipe_commands_and_brace_patterns(model_dir: Path, synth_dir: Path,
                                                                     tmp_path: Path) -> None:
    """`--shards` takes what training's expand_shards takes: `pipe:` commands and brace patterns give the
    same samples, in the same order, as the plain paths."""
    qa = synth_dir / "image-qa"
    first_two = [str(qa / "test-000000.tar"), str(qa / "test-000001.tar")]
    common = ["--model", str(model_dir), "--task", "vqa", "--max-new-tokens", "2", "--no-progress"]
    outs = {name: tmp_path / f"{name}.json" for name in ("plain", "pipe", "brace")}
    assert _run([*common, "--shards", *first_two, "--out", str(outs["plain"])]) == 0
    assert _run([*common, "--shards", *(f"pipe:cat {p}" for p in first_two), "--out", str(outs["pipe"])]) == 0
    assert _run([*common, "--shards", str(qa / "test-{000000..000001}.tar"), "--out", str(outs["brace"])]) == 0
    plain = _predictions(outs["plain"])
    assert len(plain) == 8  # 4 questions in each of the two shards
    assert _predictions(outs["pipe"]) == plain and _predictions(outs["brace"]) == plain
    settings = json.loads(outs["pipe"].read_text())["settings"]
    assert settings["shards"] == [f"pipe:cat {p}" for p in first_two]
    assert json.loads(outs["brace"].read_text())["settings"]["shards"] == first_two


def test_a_failing_pipe_shard_is_a_damaged_shard(model_dir: Path, synth_dir: Path, tmp_path: Path) -> None:
    good = str(synth_dir / "image-qa" / "test-000000.tar")
    out = tmp_path / "pipe.json"
    with pytest.warns(CorruptSampleWarning, match=r"shard pipe:cat .*missing\.tar: the shard is truncated"):
        code = _run(["--model", str(model_dir), "--task", "vqa", "--max-new-tokens", "2", "--no-progress",
                     "--shards", f"pipe:cat {tmp_path / 'missing.tar'}", good, "--out", str(out)])
    assert code == 1
    data = json.loads(out.read_text())
    assert data["counts"]["damaged_shards"] == 1 and data["counts"]["samples"] == 4
    assert "Pipe object" not in data["skipped"][0]["reason"]


def test_corrupt_samples_are_counted_and_exit_status_is_1(model_dir: Path, synth_dir: Path, tmp_path: Path,
                                                          capsys) -> None:
    shard = sorted((synth_dir / "image-qa").glob("*.tar"))[0]
    bad = tmp_path / "bad.tar"
    with tarfile.open(shard) as src, tarfile.open(bad, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith("-q0.png"):
                data = data[:40]  # truncated image
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    out = tmp_path / "bad.json"
    with pytest.warns(CorruptSampleWarning, match=r"bad\.tar"):
        code = _run(["--model", str(model_dir), "--shards", str(bad), "--task", "vqa", "--max-new-tokens", "2",
                     "--out", str(out), "--no-progress"])
    assert code == 1
    assert "1 sample(s) skipped" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["counts"]["skipped_samples"] == 1 and data["counts"]["samples"] == 3
    assert data["skipped"][0]["key"].endswith("-q0") and data["skipped"][0]["shard"] == str(bad)


def test_usage_errors(model_dir: Path, synth_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"reads \['image'\], not video"):
        _run(["--model", str(model_dir), "--shards", str(synth_dir), "--task", "video_qa"])
    with pytest.raises(ValueError, match=r"needs a model with a speech modality, got \['image'\]"):
        _run(["--model", str(model_dir), "--shards", str(synth_dir), "--task", "asr"])
    with pytest.raises(SystemExit):
        _run(["--model", str(model_dir), "--shards", str(synth_dir), "--task", "vqa", "--batch-size", "0"])
    with pytest.raises(ValueError, match="not a directory"):
        _run(["--model", str(tmp_path / "missing"), "--shards", str(synth_dir), "--task", "vqa"])
    with pytest.raises(ValueError, match="does not exist"):
        _run(["--model", str(model_dir), "--shards", str(tmp_path / "nope.tar"), "--task", "vqa"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        with pytest.raises(ValueError, match="no sample"):  # QA shards hold no captions
            _run(["--model", str(model_dir), "--shards", str(synth_dir / "image-qa"), "--task", "caption",
                  "--no-progress"])


def test_parser_defaults() -> None:
    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", "m", "--shards", "a.tar", "b.tar", "--task", "caption"])
    assert args.shards == ["a.tar", "b.tar"] and args.batch_size == 8 and args.max_new_tokens is None
    assert args.out is None and args.blank_images is False and args.run is evaluate.run
