"""Issue 11: plainly bad input to `mm-llama train` / `mm-llama eval` is one clear error, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm_llama.commands import train
from mm_llama.train.recipe import RecipeError, load_recipe


def test_out_that_is_a_file_is_a_value_error(tmp_path: Path) -> None:
    from mm_llama.train.run_dir import RunDirError, prepare_run_dir

    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(RunDirError, match=r"notes\.txt' is an existing file, not a directory"):
        prepare_run_dir(file)
    with pytest.raises(RunDirError, match=r"notes\.txt' is a file, not a directory"):
        prepare_run_dir(file / "run")
    assert prepare_run_dir(tmp_path / "a" / "b").is_dir()


def test_train_command_reports_a_file_as_out_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("x")
    code = train.main(["tiny_lm_pretrain", "data.shards=[x.txt]", "--out", str(file)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("mm-llama train: error: --out") and "is an existing file" in err
    assert "Traceback" not in err and file.read_text() == "x"


def test_recipe_files_that_cannot_be_read_are_recipe_errors(tmp_path: Path) -> None:
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(RecipeError, match=r"weights\.yaml is not UTF-8 text"):
        load_recipe(binary)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping of sections, got a list"):
        load_recipe(listing)
    with pytest.raises(RecipeError, match="neither a file nor a built-in recipe"):
        load_recipe("no_such_recipe")


def test_eval_result_path_is_checked_before_evaluating(tmp_path: Path) -> None:
    from mm_llama.train.evaluation import check_result_path

    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(ValueError, match="f' is a file, not a folder"):
        check_result_path(file / "eval.json")
    with pytest.raises(ValueError, match="is a directory"):
        check_result_path(tmp_path)
    assert check_result_path(tmp_path / "new" / "eval.json").parent.is_dir()


def test_eval_command_refuses_a_bad_out_before_loading_the_model(tmp_path: Path) -> None:
    import argparse

    from mm_llama.commands import evaluate

    file = tmp_path / "f"
    file.write_text("x")
    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", str(tmp_path), "--shards", "a.tar", "--task", "vqa",
                              "--out", str(file / "eval.json")])
    with pytest.raises(ValueError, match="--out: result path .* is a file, not a folder"):
        args.run(args)  # tmp_path holds no model: the --out check comes first
