"""`mm-llama train`: arguments, help, recipe validation errors, and a run through the command."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mm_llama.commands import train
from tests.train.test_trainer_setup import Assets, assets, lm_overrides  # noqa: F401


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm-llama")
    train.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_every_option_has_help() -> None:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    for action in sub._actions:
        assert action.help, f"{action.dest} has no help"
    text = sub.format_help()
    assert "--resume" in text and "--out" in text and "torchrun" in text


def test_options_may_follow_the_overrides() -> None:
    args = _parser().parse_args(["train", "tiny_lm_pretrain", "train.steps=3", "--out", "runs/x", "a.b=1", "--resume"])
    train.split_options(args)
    assert args.overrides == ["train.steps=3", "a.b=1"] and args.out == Path("runs/x") and args.resume
    args = _parser().parse_args(["train", "--out=runs/y", "tiny_lm_pretrain", "train.steps=3"])
    train.split_options(args)
    assert args.out == Path("runs/y") and args.overrides == ["train.steps=3"] and not args.resume
    args = _parser().parse_args(["train", "tiny_lm_pretrain", "--bogus"])
    with pytest.raises(ValueError, match="unknown option '--bogus'"):
        train.split_options(args)


def test_unknown_recipe_keys_are_rejected_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("inherit: " + str(train_recipes() / "tiny_lm_pretrain.yaml") + "\noptim:\n  learning_rate: 1.0\n")
    code = train.main([str(recipe), "train.stepz=3", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "optim.learning_rate" in err and "train.stepz (from an override)" in err
    assert not (tmp_path / "run").exists()


def test_unknown_recipe_name_lists_the_built_in_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["no_such_recipe", "--out", str(tmp_path)]) == 2
    assert "tiny_vision_pretrain" in capsys.readouterr().err


def test_a_run_through_the_command(assets: Assets, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert train.main(["tiny_lm_pretrain", *lm_overrides(assets, steps=2)]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out
    run_dir = tmp_path / "runs" / "tiny_lm_pretrain"  # the default --out
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "config.yaml").is_file()
    assert train.main(["tiny_lm_pretrain", *lm_overrides(assets, steps=2)]) == 2  # exists: needs --resume
    assert "--resume" in capsys.readouterr().err


def train_recipes() -> Path:
    from mm_llama.train.recipe import RECIPES_DIR

    return RECIPES_DIR
