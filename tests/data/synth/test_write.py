"""Writing shards: byte-identical for a seed, the `synth` command, and its errors."""

from __future__ import annotations

import argparse
import json

import pytest

from mm_llama.commands import synth
from mm_llama.data.synth import KINDS, write_synth
from tests.data.synth.helpers import load_json, read_shards, tree_bytes

SMALL_N = {"shapes": 6, "glyphs": 6, "objects": 6, "moving-shapes": 3, "speech": 3, "text": 10}


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_seed_gives_byte_identical_shards(kind: str, tmp_path) -> None:
    opts = {"noise_prob": 0.5} if kind == "speech" else {}
    a = write_synth(kind, tmp_path / "a", n=SMALL_N[kind], seed=11, split="train", samples_per_shard=4, **opts)
    b = write_synth(kind, tmp_path / "b", n=SMALL_N[kind], seed=11, split="train", samples_per_shard=4, **opts)
    files_a, files_b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert files_a == files_b
    assert a.manifest() == b.manifest()
    assert any(name.endswith(".tar") for name in files_a)
    c = write_synth(kind, tmp_path / "c", n=SMALL_N[kind], seed=12, split="train", samples_per_shard=4, **opts)
    files_c = tree_bytes(tmp_path / "c")
    shards = [k for k in files_a if k.endswith(".tar")]
    assert any(files_a[k] != files_c.get(k) for k in shards)
    assert c.seed == 12


def test_layouts_hold_the_standard_members(tmp_path) -> None:
    write_synth("shapes", tmp_path, n=3, seed=0, split="val")
    caption = read_shards(tmp_path / "image-caption", "val")
    assert list(caption) == ["val-00000000", "val-00000001", "val-00000002"]
    assert all(set(s) == {"png", "txt", "json"} for s in caption.values())
    qa = read_shards(tmp_path / "image-qa", "val")
    assert all(set(s) == {"png", "json"} and {"question", "answer"} <= set(load_json(s["json"])) for s in qa.values())
    write_synth("speech", tmp_path, n=2, seed=0, split="val")
    speech = read_shards(tmp_path / "speech", "val")
    for s in speech.values():
        assert set(s) == {"flac", "json"}
        assert {"text", "language", "duration", "sample_rate", "voice"} <= set(load_json(s["json"]))
    manifest = json.loads((tmp_path / "synth-speech-val.json").read_text())
    assert manifest["kind"] == "speech" and manifest["layouts"]["speech"]["samples"] == 2


def test_existing_shards_need_overwrite(tmp_path) -> None:
    write_synth("text", tmp_path, n=2, seed=0, split="train")
    with pytest.raises(ValueError, match="earlier run"):
        write_synth("text", tmp_path, n=2, seed=0, split="train")
    write_synth("text", tmp_path, n=3, seed=0, split="train", overwrite=True)
    assert len(read_shards(tmp_path / "text", "train")) == 3
    write_synth("text", tmp_path, n=2, seed=0, split="test")  # another split shares the folder


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic kind 'pictures'"):
        write_synth("pictures", tmp_path, n=1)
    with pytest.raises(ValueError, match="no option"):
        write_synth("shapes", tmp_path, n=1, noise_prob=0.1)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        write_synth("shapes", tmp_path, n=1, split="dev")
    with pytest.raises(ValueError, match="n must be"):
        write_synth("shapes", tmp_path, n=0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    synth.add_parser(sub)
    return p


def test_command_writes_and_reports(tmp_path, capsys) -> None:
    p = _parser()
    args = p.parse_args(["synth", "shapes", str(tmp_path), "--n", "4", "--seed", "3", "--split", "test",
                         "--samples-per-shard", "2", "--no-progress"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "wrote 4 shapes samples" in out and "image-caption" in out and "image-qa" in out
    assert sorted(p.name for p in (tmp_path / "image-caption").glob("*.tar")) == ["test-000000.tar", "test-000001.tar"]
    args = p.parse_args(["synth", "speech", str(tmp_path), "--n", "2", "--noise-prob", "0.5", "--no-progress"])
    assert args.run(args) == 0
    args = p.parse_args(["synth", "text", str(tmp_path), "--n", "2", "--noise-prob", "0.5"])
    with pytest.raises(ValueError, match="speech kind only"):
        args.run(args)


def test_command_rejects_bad_options(capsys) -> None:
    p = _parser()
    for argv in (["synth", "pictures", "out"], ["synth", "shapes", "out", "--n", "0"],
                 ["synth", "speech", "out", "--noise-prob", "2"], ["synth", "text", "out", "--split", "dev"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
    with pytest.raises(SystemExit):
        p.parse_args(["synth", "--help"])
    help_text = capsys.readouterr().out
    for option in ("KIND", "OUTDIR", "--n", "--seed", "--split", "--samples-per-shard", "--max-shard-mb",
                   "--noise-prob", "--workers", "--overwrite", "--no-progress", "moving-shapes"):
        assert option in help_text
