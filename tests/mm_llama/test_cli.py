"""The `mm-llama` console script: help everywhere, generate end to end, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mm_llama.checkpoints import load_llama
from mm_llama.cli import build_parser, main
from mm_llama.generation import GenerationConfig, generate
from mm_llama.tiny_checkpoint import write_tiny_checkpoint
from mm_llama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_console_script_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "mm_llama.cli", "--help"], capture_output=True, text=True, check=True)
    for name in _subcommands():
        assert name in out.stdout


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: mm-llama {name}" in capsys.readouterr().out


def test_generate_prints_what_the_library_generates(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--checkpoint", str(tiny_dir), "--prompt", "A red circle", "--prompt", "A blue star is",
                 "--max-new-tokens", "6", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    tokenizer = Tokenizer.from_dir(tiny_dir)
    model = load_llama(tiny_dir)
    prompts = [tokenizer.encode(p, bos=True) for p in ("A red circle", "A blue star is")]
    expected = generate(model, prompts, GenerationConfig(max_new_tokens=6, stop_ids=tokenizer.stop_ids))
    assert [r["tokens"] for r in rows] == [e.tokens for e in expected]
    assert [r["text"] for r in rows] == [tokenizer.decode(e.tokens) for e in expected]


def test_generate_takes_an_lm_run_directory_with_model_or_checkpoint(tiny_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run / "model")  # what an lm_pretrain run exports
    outputs = []
    for argv in (["--checkpoint", str(tiny_dir)], ["--model", str(run)], ["--checkpoint", str(run)]):
        assert main(["generate", *argv, "--prompt", "A red circle", "--max-new-tokens", "5", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) > 0


def test_generate_chat_uses_the_chat_template(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--checkpoint", str(tiny_dir), "--prompt", "hi", "--chat", "--max-new-tokens", "3",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["tokens"]
    tokenizer = Tokenizer.from_dir(tiny_dir)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    expected = generate(load_llama(tiny_dir), [prompt], GenerationConfig(max_new_tokens=3, stop_ids=tokenizer.stop_ids))
    assert got == expected[0].tokens


def test_generate_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "mm-llama generate: error:" in err and "nope" in err


def test_generate_rejects_a_prompt_longer_than_the_model(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--checkpoint", str(tiny_dir), "--prompt", "red " * 400]) == 2
    assert "256" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "meta"])
def test_unknown_device_is_one_line(tiny_dir: Path, device: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--checkpoint", str(tiny_dir), "--prompt", "hi", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unknown device '{device}'" in err and "use cpu, cuda" in err


def test_an_unexpected_error_is_one_line_unless_the_traceback_is_asked_for(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from mm_llama.commands import generate as generate_command

    def broken(*args, **kwargs):
        raise RuntimeError("something\ninside broke")

    monkeypatch.setattr(generate_command, "load_llama", broken)
    argv = ["generate", "--checkpoint", str(tiny_dir), "--prompt", "hi"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "mm-llama generate: internal error: RuntimeError: something inside broke" in err and "MM_LLAMA_TRACEBACK=1" in err
    monkeypatch.setenv("MM_LLAMA_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="inside broke"):
        main(argv)


def test_an_os_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").mkdir()  # a folder where the config file should be
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mm-llama generate: error:")


def test_every_command_that_loads_a_model_takes_model_and_its_checkpoint_alias() -> None:
    """One vocabulary across commands (issue 17): `--model PATH`, with `--checkpoint` as its alias."""
    import argparse

    from mm_llama.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    taking = {name: [a.option_strings for a in sub._actions if a.dest == "model"]
              for name, sub in subparsers.choices.items()}
    taking = {name: strings for name, strings in taking.items() if strings}
    assert {"generate", "caption", "vqa", "eval", "ask", "transcribe", "translate", "video-qa"} <= set(taking)
    assert all(strings == [["--model", "--checkpoint"]] for strings in taking.values()), taking


@pytest.mark.parametrize("flag, want", [([], None), (["--compile"], True), (["--no-compile"], False)])
def test_compile_flags_reach_the_generation_config(tiny_dir: Path, flag: list[str], want: bool | None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mm_llama.commands.generate as command
    from mm_llama.commands.image_commands import _generation

    seen: list[GenerationConfig] = []
    monkeypatch.setattr(command, "generate", lambda model, prompts, gen: seen.append(gen) or [])
    assert main(["generate", "--checkpoint", str(tiny_dir), "--prompt", "hi", *flag]) == 0
    assert [g.compile for g in seen] == [want]
    parser = build_parser()
    for argv in (["caption", "--model", "m", "a.png"], ["vqa", "--model", "m", "--image", "a.png", "--question", "?"]):
        args = parser.parse_args([*argv, *flag])
        assert _generation(args, Tokenizer.from_dir(tiny_dir)).compile is want
